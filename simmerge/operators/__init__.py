"""The merge-operator registry: family name → operator.

Adding a family is one small module with a MergeOperator subclass and one ``register(...)`` line
below. Families mergekit has and SimMerge does not implement are delegated to mergekit's in-memory
API, and listed only when mergekit is importable.
"""

from __future__ import annotations

from simmerge.operators.base import REQUIRED, TRAITS, MergeOperator, Param, UnknownOperatorError
from simmerge.operators.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from simmerge.operators.dare import DareLinear, DareTies
from simmerge.operators.linear import Linear
from simmerge.operators.slerp import Slerp
from simmerge.operators.task_arithmetic import TaskArithmetic
from simmerge.operators.ties import Ties

__all__ = [
    "REQUIRED",
    "TRAITS",
    "MergeOperator",
    "Param",
    "UnknownOperatorError",
    "get_operator",
    "list_operators",
    "native_operators",
    "register",
    "registered_families",
]

_NATIVE: dict[str, MergeOperator] = {}
_DELEGATED: dict[str, MergeOperator] | None = None  # filled on first need: importing mergekit is slow


def register(operator: MergeOperator) -> MergeOperator:
    """Make an operator available by its name; a second operator of the same name is an error."""
    if not operator.name:
        raise ValueError(f"{operator!r} has no name")
    if operator.name in _NATIVE:
        raise ValueError(f"merge operator {operator.name!r} is already registered")
    _NATIVE[operator.name] = operator
    return operator


register(Linear())
register(Slerp())
register(TaskArithmetic())
register(Ties())
register(DareLinear())
register(DareTies())
register(Breadcrumbs())
register(BreadcrumbsTies())


def _delegated() -> dict[str, MergeOperator]:
    """mergekit's methods that have no native operator, wrapped; {} without mergekit."""
    global _DELEGATED
    if _DELEGATED is None:
        from simmerge.operators.delegate import MergekitDelegate, mergekit_methods

        found: dict[str, MergeOperator] = {}
        for name, method in mergekit_methods().items():
            if name in _NATIVE:
                continue
            try:
                found[name] = MergekitDelegate(method)
            except ValueError:  # a parameter we cannot express as a scalar: leave the method out
                continue
        _DELEGATED = found
    return _DELEGATED


def registered_families() -> list[str]:
    """Native family names in registration order (the order selection's descriptor columns list them)."""
    return list(_NATIVE)


def native_operators() -> list[MergeOperator]:
    """The operators SimMerge implements itself, by name."""
    return [_NATIVE[name] for name in sorted(_NATIVE)]


def list_operators() -> list[MergeOperator]:
    """Every available operator by name: native ones, plus mergekit's others when it is installed."""
    every = {**_delegated(), **_NATIVE}
    return [every[name] for name in sorted(every)]


def get_operator(name: str) -> MergeOperator:
    """The operator called ``name``; UnknownOperatorError (a PlanError and a KeyError) names it if absent."""
    if name in _NATIVE:
        return _NATIVE[name]
    delegated = _delegated()
    if name in delegated:
        return delegated[name]
    known = ", ".join(op.name for op in list_operators())
    raise UnknownOperatorError(f"unknown merge method {name!r} (known: {known})")
