"""Operator families from the core registry, and parameterised settings added as bandit arms."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.api.deps import get_store
from service.api.schemas import ArmIn, ArmOut, OperatorOut
from service.auth import require_scope
from service.store import Store
from simmerge.errors import NotFoundError

router = APIRouter(prefix="/operators", tags=["operators"])


def _families() -> dict[str, Any]:
    """Name → operator, from `simmerge.operators.list_operators()` (names or operator objects)."""
    from simmerge import operators

    found: dict[str, Any] = {}
    for item in operators.list_operators():
        op = operators.get_operator(item) if isinstance(item, str) else item
        found[op.name] = op
    return found


def _family(name: str) -> Any:
    families = _families()
    if name not in families:
        raise NotFoundError(f"no operator family {name!r} (known: {', '.join(sorted(families))})")
    return families[name]


def _arm_out(arm: Any) -> dict:
    return {"name": arm.name, "family": arm.family, "parameters": arm.parameters}


def _operator_out(op: Any, arms: list[Any]) -> dict:
    """What the operator declares about itself (`MergeOperator.describe`), with its arms."""
    return {**op.describe(), "arms": [_arm_out(a) for a in arms if a.family == op.name]}


@router.get("", response_model=list[OperatorOut])
def list_operator_families(
    store: Annotated[Store, Depends(get_store)], _: Annotated[str, Depends(require_scope("read"))]
) -> list[dict]:
    arms = store.list_arms()
    return [_operator_out(op, arms) for op in _families().values()]


@router.get("/{family}", response_model=OperatorOut)
def get_operator_family(
    family: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return _operator_out(_family(family), store.list_arms(family))


@router.post("/{family}/arms", response_model=ArmOut, status_code=201)
def add_operator_arm(
    family: str,
    body: ArmIn,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    """Validate the setting with the operator itself (filling defaults), then store it as a new arm: a
    candidate of every recommendation and catalog scoring from the next request on."""
    op = _family(family)
    n_models = op.max_models if op.max_models is not None and op.max_models < 2 else max(op.min_models, 2)
    # an arm is a method-level setting; models get mergekit's customary weight 1 unless it sets one
    model_names = {p.name for p in op.model_params}
    per_model = {"weight": 1.0} if "weight" in model_names and "weight" not in body.parameters else {}
    params, _model_params = op.validate(
        dict(body.parameters), [dict(per_model) for _ in range(n_models)], n_models, op.needs_base
    )
    # per-model values given at method level (a shared `weight`) are part of the setting too
    setting = {**params, **{k: v for k, v in body.parameters.items() if k not in params}}
    return _arm_out(store.add_arm(family, setting, body.name))


@router.get("/{family}/arms", response_model=list[ArmOut])
def list_operator_arms(
    family: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> list[dict]:
    _family(family)
    return [_arm_out(a) for a in store.list_arms(family)]
