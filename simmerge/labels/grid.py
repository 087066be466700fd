"""Which plans get labelled: pairs × operator settings, sampled triples (k-way and folds), cross-family pairs,
and each expert merged with itself.

The enumeration is deterministic for a zoo, grid and seed, so a re-run lists the same plans in the
same order and resuming only has to skip the plan ids already stored.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from simmerge.errors import SimMergeError
from simmerge.labels.zoo import Zoo
from simmerge.plan import Plan

KINDS = ("pair", "kway", "fold", "cross_family", "self")
# `self` plans merge an expert with itself under every pair setting. They are not a selection problem
# (the pool has one checkpoint) and evaluation leaves them out; they teach the predictor which settings
# preserve a checkpoint, the answer for near-identical checkpoints that the pair labels never show.
Setting = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class GridSpec:
    """The operator settings per plan kind and how much of the zoo a grid covers."""

    pair_settings: tuple[Setting, ...]
    slerp_t: tuple[float, ...]  # each t is labelled in both orders (either expert as slerp's base)
    kway_settings: tuple[Setting, ...]
    # the two steps of ((A ⊕ B) ⊕ C). Not task_arithmetic: its folds equal a linear fold (weight 0.5)
    # or the k-way sum in every order (weight 1), so they would only repeat other labels.
    fold_settings: tuple[tuple[Setting, Setting], ...]
    fold_orders: int  # how many rotations of a triple are folded (1 to 3: each member last once)
    cross_settings: tuple[Setting, ...]
    triples: int  # default number of sampled triples
    cross_family: int  # default number of sampled cross-family pairs
    pairs_per_base: int | None = None  # None: every pair of experts that share a base
    self_pairs: bool = True  # label each expert merged with itself under the pair settings


_LINEAR: Setting = ("linear", {"weight": 1.0})
_TIES: Setting = ("ties", {"density": 0.5, "weight": 1.0})
GRIDS: dict[str, GridSpec] = {
    "default": GridSpec(
        pair_settings=(
            _LINEAR,
            ("task_arithmetic", {"weight": 0.5}),
            ("task_arithmetic", {"weight": 1.0}),
            *(("ties", {"density": d, "weight": 1.0}) for d in (0.2, 0.5, 0.8)),
            *(("dare_ties", {"density": d, "weight": 1.0}) for d in (0.3, 0.6)),
            ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01, "weight": 1.0}),
        ),
        slerp_t=(0.3, 0.5, 0.7),
        kway_settings=(
            _LINEAR,
            ("task_arithmetic", {"weight": 0.5}),
            ("ties", {"density": 0.5, "weight": 1.0}),
        ),
        fold_settings=((_LINEAR, _LINEAR), (_TIES, _TIES), (_TIES, _LINEAR)),
        fold_orders=3,
        cross_settings=(_LINEAR, ("task_arithmetic", {"weight": 1.0})),
        triples=12,
        cross_family=4,
    ),
    "small": GridSpec(
        pair_settings=(
            _LINEAR,
            ("task_arithmetic", {"weight": 1.0}),
            ("ties", {"density": 0.5, "weight": 1.0}),
        ),
        slerp_t=(0.5,),
        kway_settings=(_LINEAR, ("ties", {"density": 0.5, "weight": 1.0})),
        fold_settings=((_LINEAR, _LINEAR),),
        fold_orders=1,
        cross_settings=(_LINEAR,),
        triples=1,
        cross_family=1,
        pairs_per_base=2,
        self_pairs=False,
    ),
}


@dataclass(frozen=True)
class LabelPlan:
    """One plan to label and the bookkeeping its row needs."""

    plan: Plan
    kind: str
    models: tuple[str, ...]  # the merged experts in plan order (a fold: fold order)
    base: str | None  # the base held-out scores are normalised by
    method: str  # family; a fold's step families joined by '>'
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def plan_id(self) -> str:
        return self.plan.plan_id()

    @property
    def params_json(self) -> str:
        return json.dumps(dict(self.params), sort_keys=True)


def pair_plan(
    method: str, params: Mapping[str, Any], a: str, b: str, base: str, kind: str = "pair"
) -> LabelPlan:
    """A 2-way plan; slerp interpolates from `a` (its base_model) towards `b`."""
    from simmerge.operators import get_operator

    if method == "slerp":
        plan = Plan.single("slerp", [a, b], base=a, parameters=params)
    else:
        step_base = base if get_operator(method).needs_base else None
        plan = Plan.single(method, [a, b], base=step_base, parameters=params)
    return LabelPlan(plan, kind, (a, b), base, method, dict(params))


def kway_plan(method: str, params: Mapping[str, Any], members: tuple[str, ...], base: str) -> LabelPlan:
    from simmerge.operators import get_operator

    step_base = base if get_operator(method).needs_base else None
    plan = Plan.single(method, list(members), base=step_base, parameters=params)
    return LabelPlan(plan, "kway", members, base, method, dict(params))


def fold_plan(steps: list[Setting], order: tuple[str, ...], base: str) -> LabelPlan:
    plan = Plan.fold(list(order), [(m, dict(p)) for m, p in steps], base=base)
    params = {"steps": [{"method": m, "parameters": dict(p)} for m, p in steps]}
    return LabelPlan(plan, "fold", order, base, ">".join(m for m, _ in steps), params)


def rotations(members: tuple[str, ...], count: int) -> list[tuple[str, ...]]:
    """The first `count` rotations: with three members each one is folded in last exactly once."""
    return [members[i:] + members[:i] for i in range(min(count, len(members)))]


def enumerate_plans(
    zoo: Zoo,
    grid: str = "default",
    triples: int | None = None,
    cross_family: int | None = None,
    seed: int = 0,
) -> list[LabelPlan]:
    """Every plan of the grid over the zoo, in a stable order, without duplicates."""
    if grid not in GRIDS:
        raise SimMergeError(f"unknown label grid {grid!r}; choose one of {', '.join(GRIDS)}")
    spec = GRIDS[grid]
    rng = random.Random(seed)
    plans = _pair_plans(zoo, spec)
    plans += _self_plans(zoo, spec)
    plans += _triple_plans(zoo, spec, spec.triples if triples is None else triples, rng)
    plans += _cross_family_plans(zoo, spec, spec.cross_family if cross_family is None else cross_family, rng)
    unique: dict[str, LabelPlan] = {}
    for plan in plans:
        unique.setdefault(plan.plan_id, plan)
    return list(unique.values())


def _pair_plans(zoo: Zoo, spec: GridSpec) -> list[LabelPlan]:
    plans: list[LabelPlan] = []
    for base, experts in zoo.experts_by_base().items():
        pairs = list(combinations(experts, 2))[: spec.pairs_per_base]
        for a, b in pairs:
            plans += [pair_plan(m, p, a, b, base) for m, p in spec.pair_settings]
            for t in spec.slerp_t:
                plans += [pair_plan("slerp", {"t": t}, x, y, base) for x, y in ((a, b), (b, a))]
    return plans


def _self_plans(zoo: Zoo, spec: GridSpec) -> list[LabelPlan]:
    """Each expert with itself under every pair setting but slerp: slerp's base is one of its two models,
    so with itself it has no second model (and would only return that model)."""
    if not spec.self_pairs:
        return []
    return [
        pair_plan(m, p, expert, expert, base, kind="self")
        for base, experts in zoo.experts_by_base().items()
        for expert in experts
        for m, p in spec.pair_settings
    ]


def _triple_plans(zoo: Zoo, spec: GridSpec, count: int, rng: random.Random) -> list[LabelPlan]:
    candidates = [
        (base, t) for base, experts in zoo.experts_by_base().items() for t in combinations(experts, 3)
    ]
    chosen = rng.sample(candidates, min(count, len(candidates)))
    plans: list[LabelPlan] = []
    for base, members in chosen:
        plans += [kway_plan(m, p, members, base) for m, p in spec.kway_settings]
        for order in rotations(members, spec.fold_orders):
            plans += [fold_plan(list(steps), order, base) for steps in spec.fold_settings]
    return plans


def _cross_family_plans(zoo: Zoo, spec: GridSpec, count: int, rng: random.Random) -> list[LabelPlan]:
    """Experts of different bases, merged relative to the first expert's base."""
    groups = list(zoo.experts_by_base().items())
    candidates = [
        (base_a, a, b)
        for index, (base_a, group_a) in enumerate(groups)
        for _base_b, group_b in groups[index + 1 :]
        for a in group_a
        for b in group_b
    ]
    chosen = rng.sample(candidates, min(count, len(candidates)))
    return [
        pair_plan(m, p, a, b, base, kind="cross_family")
        for base, a, b in chosen
        for m, p in spec.cross_settings
    ]
