"""Candidate plans: operator settings, the plans built from them, and the beam search over them.

No features here: a candidate becomes a row only in `models.table`. What an operator is (needs a base,
takes how many models, interpolates between its inputs, keeps copies unchanged) is read from the
operator registry (`simmerge.operators`), never written down again here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from typing import Any

import numpy as np

from simmerge.errors import PlanError
from simmerge.operators import MergeOperator, get_operator, registered_families
from simmerge.plan import Plan


@dataclass(frozen=True, eq=False)
class OperatorSetting:
    """One operator with its method-level parameters, e.g. `ties(density=0.5)`: what a plan step varies."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OperatorSetting) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @cached_property
    def key(self) -> str:
        """Canonical text of the setting (settings are hashed thousands of times per search)."""
        return f"{self.method}{json.dumps(dict(self.params), sort_keys=True)}"

    @cached_property
    def operator(self) -> MergeOperator:
        return get_operator(self.method)

    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({inner})" if inner else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params)}

    @property
    def needs_catalog_base(self) -> bool:
        """Task vectors need the experts' base; an interpolation between inputs starts from one of them."""
        return self.operator.needs_base and not self.operator.interpolates_inputs

    def takes(self, n_experts: int) -> bool:
        """Whether one step of this operator can merge `n_experts` checkpoints."""
        op = self.operator
        inputs = n_experts - (1 if op.interpolates_inputs else 0)
        return inputs >= op.min_models and (op.max_models is None or inputs <= op.max_models)

    def preserves_identity(self, n_inputs: int) -> bool:
        return self.operator.preserves_identity(self.params, n_inputs)

    def defaults_complete(self) -> bool:
        """Every required method-level parameter has a value (per-model `weight` defaults to 1 in plans)."""
        return all(p.name in self.params for p in self.operator.method_params if p.required)


# The grid searched when a predictor's metadata lists no settings.
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


def candidate_settings(
    labelled: Sequence[OperatorSetting], arms: Sequence[OperatorSetting] = ()
) -> list[OperatorSetting]:
    """What a search offers: the predictor's labelled settings, the arms added online, and every
    registered native family no setting covers yet, at its defaults (a family registered in one place
    is a candidate without another edit)."""
    out = list(dict.fromkeys([*labelled, *arms]))
    covered = {s.method for s in out}
    for family in registered_families():
        if family not in covered:
            setting = OperatorSetting(family, default_params(get_operator(family)))
            if setting.defaults_complete():
                out.append(setting)
    return out


def default_params(op: MergeOperator) -> dict[str, Any]:
    """Method-level defaults of an operator; a required interpolation factor takes its midpoint."""
    params = {p.name: p.default for p in op.method_params if not p.required}
    for p in op.method_params:
        if p.required and p.low is not None and p.high is not None:
            params[p.name] = (p.low + p.high) / 2
    return params


@dataclass(frozen=True)
class Candidate:
    """A plan before it is built: members in fold order, one setting per step (one for a k-way step).

    `cross_family`: the members were fine-tuned from different bases (described apart by the table).
    """

    models: tuple[str, ...]
    settings: tuple[OperatorSetting, ...]
    cross_family: bool = False
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.models, self.settings, self.cross_family)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def kind(self) -> str:
        if len(self.settings) > 1:
            return "fold"
        if len(self.models) == 2:
            return "cross_family" if self.cross_family else "pair"
        return "kway"

    def to_plan(self, base: str | None) -> Plan:
        """A plan `simmerge merge --config` runs: inputs get mergekit's customary weight 1 unless the
        setting gives one, an interpolation starts from its first model, and only operators that take a
        base get one."""
        if len(self.settings) > 1:
            return Plan.fold(
                list(self.models), [(s.method, _fold_step_params(s)) for s in self.settings], base
            )
        setting = self.settings[0]
        params = dict(setting.params)
        if setting.operator.interpolates_inputs:
            return Plan.single(setting.method, list(self.models), base=self.models[0], parameters=params)
        per_model = [{} for _ in self.models]
        if _has_weight(setting.operator):
            weight = params.pop("weight", 1.0)
            per_model = [{"weight": weight} for _ in self.models]
        return Plan.single(
            setting.method,
            list(self.models),
            base=base if setting.needs_catalog_base else None,
            parameters=params,
            model_parameters=per_model,
        )

    def steps(self) -> list[dict[str, Any]]:
        """The steps as the response lists them (a fold's intermediate results named step1, step2, …)."""
        if len(self.settings) == 1:
            s = self.settings[0]
            return [{"method": s.method, "parameters": dict(s.params), "models": list(self.models)}]
        out, running = [], self.models[0]
        for index, (setting, nxt) in enumerate(zip(self.settings, self.models[1:], strict=True)):
            out.append(
                {"method": setting.method, "parameters": dict(setting.params), "models": [running, nxt]}
            )
            running = f"step{index + 1}"
        return out


def _has_weight(op: MergeOperator) -> bool:
    return any(p.name == "weight" for p in op.model_params)


def _fold_step_params(setting: OperatorSetting) -> dict[str, Any]:
    """Fold-step parameters: `weights` for both inputs where the operator weighs its inputs."""
    params = dict(setting.params)
    if _has_weight(setting.operator):
        weight = params.pop("weight", 1.0)
        params["weights"] = [weight, weight]
    return params


def candidate_from_plan(plan: Plan, cross_family: bool = False) -> Candidate:
    """The candidate a built plan is (labels are described like recommendations): per-model numeric
    parameters the step does not set at method level are averaged into its setting."""
    settings = tuple(_step_setting(step) for step in plan.steps)
    return Candidate(tuple(plan.experts()), settings, cross_family)


def _step_setting(step: Any) -> OperatorSetting:
    params = dict(step.parameters)
    params.pop("weights", None)  # a fold step's per-input weights, described through `weight`
    per_model: dict[str, list[float]] = {}
    for ref in step.models:
        for name, value in ref.parameters.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                per_model.setdefault(name, []).append(float(value))
    for name, values in per_model.items():
        params.setdefault(name, float(np.mean(values)))
    return OperatorSetting(step.method, params)


@dataclass(frozen=True)
class PlanQuery:
    """One request's search: its checkpoints and their common base (None: base-free operators only).

    `cross_family`: the catalog knows the members' bases and they differ."""

    models: tuple[str, ...]
    base: str | None = None
    max_models: int | None = None
    cross_family: bool = False


def is_cross_family(bases: Sequence[str | None]) -> bool:
    """Members fine-tuned from different bases (every base known): the one rule for `cross_family`."""
    return None not in bases and len(set(bases)) > 1


@dataclass
class Scored:
    candidate: Candidate
    predicted: float
    uncertainty: float
    row: np.ndarray


# (candidates) -> (rows, predicted, uncertainty): the plan table's scoring, one call per search round.
Scorer = Callable[[Sequence[Candidate]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def search(
    queries: Sequence[PlanQuery],
    score: Scorer,
    settings: Sequence[OperatorSetting],
    *,
    beam_width: int = 8,
) -> list[list[Scored]]:
    """Every scored candidate of each query, best first (predicted, then lower uncertainty, then found
    first): all pairs, then folds grown from the best `beam_width` of the previous size and one k-way
    step over each member set the folds reached, up to `max_models`. One scoring call per round for the
    whole batch; no merge is ever run."""
    members = [list(dict.fromkeys(q.models)) for q in queries]
    limits = [_limit(q, m) for q, m in zip(queries, members, strict=True)]
    options = [_usable(settings, q.base) for q in queries]
    found: list[dict[Candidate, Scored]] = [{} for _ in queries]

    def scored(per_query: list[list[Candidate]]) -> list[list[Scored]]:
        fresh = [
            (q, c) for q, cands in enumerate(per_query) for c in dict.fromkeys(cands) if c not in found[q]
        ]
        if fresh:
            rows, mean, unc = score([c for _, c in fresh])
            for (q, c), m, u, row in zip(fresh, mean, unc, rows, strict=True):
                found[q][c] = Scored(c, float(m), float(u), row)
        return [[found[q][c] for c in dict.fromkeys(cands)] for q, cands in enumerate(per_query)]

    pairs = [
        [Candidate((a, b), (s,), q.cross_family) for a, b in combinations(m, 2) for s in opts if s.takes(2)]
        for q, m, opts in zip(queries, members, options, strict=True)
    ]
    beams = [_best(b, beam_width) for b in scored(pairs)]
    for size in range(3, max(limits) + 1):
        grown = [
            [
                Candidate((*b.candidate.models, m), (*b.candidate.settings, s))
                for b in beams[q]
                for m in members[q]
                if m not in b.candidate.models
                for s in options[q]
                if s.takes(2)
            ]
            if limits[q] >= size
            else []
            for q in range(len(queries))
        ]
        kway = [
            [
                Candidate(subset, (s,))
                for subset in sorted({tuple(sorted(c.models)) for c in folds})
                for s in options[q]
                if s.takes(size)
            ]
            for q, folds in enumerate(grown)
        ]
        fold_scores = scored([g + k for g, k in zip(grown, kway, strict=True)])
        beams = [_best([s for s in f if len(s.candidate.settings) > 1], beam_width) for f in fold_scores]
        if not any(beams):
            break
    return [sorted(f.values(), key=lambda s: (-s.predicted, s.uncertainty)) for f in found]


def _best(scored: list[Scored], k: int) -> list[Scored]:
    return sorted(scored, key=lambda s: -s.predicted)[:k]


def _limit(query: PlanQuery, members: list[str]) -> int:
    if len(members) < 2:
        raise PlanError(f"a merge needs at least two checkpoints, got {members}")
    limit = min(query.max_models or len(members), len(members))
    if limit < 2:
        raise PlanError(f"max_models={query.max_models} leaves fewer than two checkpoints to merge")
    return limit


def _usable(settings: Sequence[OperatorSetting], base: str | None) -> list[OperatorSetting]:
    """Without a known base only base-free operators can run."""
    usable = [s for s in settings if base is not None or not s.needs_catalog_base]
    if not usable:
        raise PlanError("no operator setting can run without a base model; give the experts' base")
    return usable


def returns_input(candidate: Candidate) -> bool:
    """Whether every step returns its input for copies of one checkpoint (`preserves_identity`)."""
    if len(candidate.settings) == 1:
        return candidate.settings[0].preserves_identity(len(candidate.models))
    return all(s.preserves_identity(2) for s in candidate.settings)


def fold_weights(n_members: int) -> np.ndarray:
    """Share of each member in `((m0 ⊕ m1) ⊕ m2) …` when every step averages its two inputs.

    The last model folded in holds half of the result, the first two a 2^-(n-1) share each: this is
    what makes a fold's order matter to the predictor.
    """
    if n_members < 2:
        return np.ones(n_members)
    weights = np.asarray([2.0 ** -(n_members - max(i, 1)) for i in range(n_members)])
    return weights / weights.sum()
