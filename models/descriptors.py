"""Operator descriptors: a merge plan's operator choice as a fixed-length numeric vector.

The predictor and the bandit see an operator through these numbers, never through its name alone:
besides the family one-hot there are behavioural flags (sign election, random drop, magnitude
trimming, ...) and the numeric parameters with mergekit's defaults filled in, so that a family the
predictor has never seen (an arm added online) still lands near the families it resembles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from simmerge.errors import PlanError
from simmerge.plan import Plan

FAMILIES = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "other",
)
KINDS = ("pair", "kway", "fold", "cross_family")

# Numeric parameters and the value an omitted one means (mergekit 0.1.5 semantics; density 1 = keep all).
PARAM_DEFAULTS: dict[str, float] = {
    "weight": 1.0,
    "density": 1.0,
    "lambda": 1.0,
    "t": 0.5,
    "gamma": 0.0,
    "epsilon": 0.0,
    "normalize": 1.0,
    "rescale": 1.0,
}
# Per-family defaults that differ from PARAM_DEFAULTS (the operator registry, after mergekit 0.1.5).
_FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "linear": {"normalize": 1.0, "rescale": 0.0},
    "slerp": {"normalize": 0.0, "rescale": 0.0},
    "task_arithmetic": {"normalize": 0.0, "rescale": 0.0},
    "ties": {"normalize": 1.0, "rescale": 0.0},
    "dare_linear": {"normalize": 0.0, "rescale": 1.0},
    "dare_ties": {"normalize": 0.0, "rescale": 1.0},
    "breadcrumbs": {"normalize": 0.0, "rescale": 0.0, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": 0.0, "rescale": 0.0, "gamma": 0.01},
    "other": {},
}

# Behaviour shared across families: what lets a new family borrow from known ones.
_FLAGS: dict[str, dict[str, float]] = {
    "linear": {"uses_base": 0, "sign_election": 0, "random_drop": 0, "magnitude_trim": 0, "spherical": 0},
    "slerp": {"uses_base": 1, "sign_election": 0, "random_drop": 0, "magnitude_trim": 0, "spherical": 1},
    "task_arithmetic": {
        "uses_base": 1,
        "sign_election": 0,
        "random_drop": 0,
        "magnitude_trim": 0,
        "spherical": 0,
    },
    "ties": {"uses_base": 1, "sign_election": 1, "random_drop": 0, "magnitude_trim": 1, "spherical": 0},
    "dare_linear": {
        "uses_base": 1,
        "sign_election": 0,
        "random_drop": 1,
        "magnitude_trim": 0,
        "spherical": 0,
    },
    "dare_ties": {"uses_base": 1, "sign_election": 1, "random_drop": 1, "magnitude_trim": 0, "spherical": 0},
    "breadcrumbs": {
        "uses_base": 1,
        "sign_election": 0,
        "random_drop": 0,
        "magnitude_trim": 1,
        "spherical": 0,
    },
    "breadcrumbs_ties": {
        "uses_base": 1,
        "sign_election": 1,
        "random_drop": 0,
        "magnitude_trim": 1,
        "spherical": 0,
    },
    "other": {"uses_base": 1, "sign_election": 0, "random_drop": 0, "magnitude_trim": 0, "spherical": 0},
}
FLAG_NAMES = ("uses_base", "sign_election", "random_drop", "magnitude_trim", "spherical")


@dataclass(frozen=True, eq=False)
class OperatorSetting:
    """One operator with its parameters, e.g. `ties(density=0.5)`: what a pair plan varies."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OperatorSetting) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @cached_property
    def key(self) -> str:
        """Canonical text of the setting, computed once: plan search hashes settings thousands of times
        per request (settings are never mutated after construction)."""
        return f"{self.method}{json.dumps(dict(self.params), sort_keys=True)}"

    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({inner})" if inner else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params)}


# The grid `score-catalog` and `recommend` search when no labels say otherwise (~10 settings).
DEFAULT_SETTINGS: tuple[OperatorSetting, ...] = (
    OperatorSetting("linear", {}),
    OperatorSetting("slerp", {"t": 0.5}),
    OperatorSetting("task_arithmetic", {"lambda": 1.0}),
    OperatorSetting("task_arithmetic", {"lambda": 0.5}),
    OperatorSetting("ties", {"density": 0.5}),
    OperatorSetting("ties", {"density": 0.2}),
    OperatorSetting("dare_linear", {"density": 0.5}),
    OperatorSetting("dare_ties", {"density": 0.5}),
    OperatorSetting("breadcrumbs", {"density": 0.9, "gamma": 0.01}),
    OperatorSetting("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01}),
)


def preserves_identity(setting: OperatorSetting, n_inputs: int) -> bool:
    """Whether merging `n_inputs` copies of one checkpoint under `setting` returns it unchanged (brief §2).

    Weighted averages (linear, normalised) and slerp do; task arithmetic does when lambda × Σ weights is
    one (base + λ·Σwᵢ·τ = base + τ); TIES, DARE and breadcrumbs trim or rescale the task vector, so they
    do not. Recommendations use this for inputs whose signatures are identical (`models.recommend`).
    """
    params = setting.params
    weights = float(params.get("weight", 1.0)) * n_inputs
    if setting.method == "slerp":
        return True
    if setting.method == "linear":
        return bool(params.get("normalize", True)) or math.isclose(weights, 1.0)
    if setting.method == "task_arithmetic":
        return math.isclose(float(params.get("lambda", 1.0)) * weights, 1.0)
    return False


def family_of(method: str) -> str:
    return method if method in FAMILIES else "other"


def descriptor_names() -> list[str]:
    """Column names of `operator_descriptor`, prefixed `op:` so they never clash with pair features."""
    names = [f"op:family={f}" for f in FAMILIES]
    names += [f"op:{flag}" for flag in FLAG_NAMES]
    names += [f"op:param={p}" for p in PARAM_DEFAULTS]
    names += [f"op:kind={k}" for k in KINDS]
    names += ["op:n_models", "op:n_steps"]
    return names


def _numeric(value: Any, name: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    raise PlanError(f"operator parameter {name}={value!r} is not a number")


def _step_vector(
    method: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]
) -> np.ndarray:
    """Family one-hot, flags and filled numeric params of one step (per-model values averaged)."""
    family = family_of(method)
    onehot = [1.0 if family == f else 0.0 for f in FAMILIES]
    flags = [float(_FLAGS[family][flag]) for flag in FLAG_NAMES]
    values = []
    for name, default in PARAM_DEFAULTS.items():
        default = _FAMILY_DEFAULTS[family].get(name, default)
        if name in params:
            values.append(_numeric(params[name], name))
            continue
        per_model = [_numeric(m[name], name) for m in model_params if name in m]
        values.append(float(np.mean(per_model)) if per_model else default)
    return np.asarray(onehot + flags + values, dtype=np.float64)


def operator_descriptor(
    method: str,
    params: Mapping[str, Any] | None = None,
    kind: str = "pair",
    n_models: int = 2,
    model_params: Sequence[Mapping[str, Any]] = (),
) -> np.ndarray:
    """Descriptor of a single-step plan (a pair or a k-way merge)."""
    return _assemble([_step_vector(method, params or {}, model_params)], kind, n_models)


def oriented_params(method: str, params: Mapping[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """A 2-way slerp from B towards A at t is the one from A towards B at 1 − t: describe both alike.

    Pair features are symmetric, so without this the two spellings of one merge would look like two
    different plans with the same features. The orientation is fixed by name order.
    """
    params = dict(params)
    if method == "slerp" and len(models) == 2 and models[0] > models[1]:
        params["t"] = round(1.0 - _numeric(params.get("t", PARAM_DEFAULTS["t"]), "t"), 9)
    return params


def plan_descriptor(plan: Plan, kind: str | None = None) -> np.ndarray:
    """Descriptor of any plan: step vectors averaged over the steps, with kind, model and step counts."""
    if len(plan.steps) == 1:
        step = plan.steps[0]
        params = oriented_params(step.method, step.parameters, [m.model for m in step.models])
        steps = [_step_vector(step.method, params, [m.parameters for m in step.models])]
    else:
        steps = [_step_vector(s.method, s.parameters, [m.parameters for m in s.models]) for s in plan.steps]
    n_models = len(plan.experts())
    return _assemble(steps, kind or _kind_of(len(steps), n_models), n_models)


def fold_weights(n_members: int) -> np.ndarray:
    """Share of each member in `((m0 ⊕ m1) ⊕ m2) …` when every step averages its two inputs.

    The last model folded in holds half of the result, the first two a 2^-(n-1) share each: this is
    what makes a fold's order matter to the predictor.
    """
    if n_members < 2:
        return np.ones(n_members)
    weights = np.asarray([2.0 ** -(n_members - max(i, 1)) for i in range(n_members)])
    return weights / weights.sum()


def _assemble(steps: list[np.ndarray], kind: str, n_models: int) -> np.ndarray:
    return descriptor_rows(np.stack(steps)[None], n_models, kind)[0]


def _kind_of(n_steps: int, n_models: int) -> str:
    return "fold" if n_steps > 1 else ("pair" if n_models == 2 else "kway")


def fold_descriptor(
    settings: Sequence[OperatorSetting], n_models: int, models: Sequence[str] = ()
) -> np.ndarray:
    """Descriptor of `((m0 ⊕s0 m1) ⊕s1 m2) …` without building the plan (used by plan search).

    Memoised (read-only arrays): the descriptor depends on the models only through a 2-way slerp's
    orientation, and plan search asks for the same few settings for every candidate subset.
    """
    flipped = len(settings) == 1 and len(models) == 2 and models[0] > models[1]
    memo_key = (tuple(settings), n_models, flipped)
    cached = _FOLD_DESCRIPTORS.get(memo_key)
    if cached is None:
        cached = _fold_descriptor(settings, n_models, models)
        cached.flags.writeable = False
        if len(_FOLD_DESCRIPTORS) >= _FOLD_MEMO_LIMIT:
            _FOLD_DESCRIPTORS.clear()
        _FOLD_DESCRIPTORS[memo_key] = cached
    return cached


_FOLD_MEMO_LIMIT = 4096
_FOLD_DESCRIPTORS: dict[tuple[tuple[OperatorSetting, ...], int, bool], np.ndarray] = {}


def _fold_descriptor(settings: Sequence[OperatorSetting], n_models: int, models: Sequence[str]) -> np.ndarray:
    if len(settings) == 1:
        steps = [
            _step_vector(
                settings[0].method, oriented_params(settings[0].method, settings[0].params, models), ()
            )
        ]
    else:
        steps = [_step_vector(s.method, s.params, ()) for s in settings]
    return _assemble(steps, _kind_of(len(settings), n_models), n_models)


def step_vectors(settings: Sequence[OperatorSetting], *, flipped: bool = False) -> np.ndarray:
    """(settings, step width): each setting's step vector; `flipped`: as the single step of a 2-way merge
    whose first model sorts after the second (`oriented_params`)."""
    order = ("b", "a") if flipped else ()
    return np.stack(
        [_step_vector(s.method, oriented_params(s.method, s.params, order), ()) for s in settings]
    )


def descriptor_rows(steps: np.ndarray, n_models: int, kind: str | None = None) -> np.ndarray:
    """Descriptors of many plans at once: `steps` (plans, n_steps, step width) holds each plan's step
    vectors, `n_models` its member count and `kind` its kind (by default read off the counts), the same
    for all. Every descriptor (`operator_descriptor`, `plan_descriptor`, `fold_descriptor`) is made here."""
    n_steps = steps.shape[1]
    kind = kind or _kind_of(n_steps, n_models)
    if kind not in KINDS:
        raise PlanError(f"plan kind {kind!r} is not one of {', '.join(KINDS)}")
    # Later fold steps act on more of the result, so they weigh more (step i: weight 2^i). The sum is
    # np.average's: weighted steps added one by one, then divided.
    weights = 2.0 ** np.arange(n_steps)
    body = steps[:, 0] * weights[0]
    for i in range(1, n_steps):
        body = body + steps[:, i] * weights[i]
    body = body / weights.sum()
    tail = [1.0 if kind == k else 0.0 for k in KINDS] + [float(n_models), float(n_steps)]
    rows = np.empty((len(steps), body.shape[1] + len(tail)))
    rows[:, : body.shape[1]] = body
    rows[:, body.shape[1] :] = tail
    return rows


ARM_FEATURE_NAMES = [
    n for n in descriptor_names() if not n.startswith(("op:kind=", "op:n_models", "op:n_steps"))
]


def arm_features(setting: OperatorSetting) -> np.ndarray:
    """What the bandit knows about an operator setting: family, behaviour flags, filled parameters."""
    return operator_descriptor(setting.method, setting.params)[: len(ARM_FEATURE_NAMES)]
