"""Plan search for more than two checkpoints: which subset, which fold order, which operator per step.

Candidates are scored by the predictor only; no intermediate merge is ever run. A fold
`((m0 ⊕s0 m1) ⊕s1 m2) …` is represented like a labelled fold: its step descriptors weighted towards
later steps and its member pairs weighted by each member's share of the result (`fold_weights`), so
the order changes the prediction. (Estimating an intermediate's own signature from sampled task-vector
coordinates is the planned refinement; this first version aggregates pairwise features.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from models.dataset import PairFeatureSource, aggregate_pair_rows, member_pairs, pair_weights
from models.descriptors import DEFAULT_SETTINGS, OperatorSetting, family_of, fold_descriptor
from simmerge.errors import PlanError
from simmerge.plan import Plan

# Families mergekit defines for exactly two models, and those that take any number.
PAIR_ONLY = {"slerp"}


@dataclass(frozen=True)
class Candidate:
    """A plan before it is built: members in fold order, one setting per step (one for a k-way step).

    Its hash is computed once: a request's plan search looks candidates up in dicts several times
    each, and hashing the settings tuple calls `OperatorSetting.__hash__` per step every time.
    """

    models: tuple[str, ...]
    settings: tuple[OperatorSetting, ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.models, self.settings)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def kind(self) -> str:
        if len(self.settings) > 1:
            return "fold"
        return "pair" if len(self.models) == 2 else "kway"

    def to_plan(self, base: str | None) -> Plan:
        """A plan `simmerge merge --config` runs: every non-slerp input gets a weight (mergekit requires one),
        a slerp interpolates from its first model, and only operators that need a base get one."""
        if self.kind == "fold":
            steps = [(s.method, _step_params(s)) for s in self.settings]
            return Plan.fold(list(self.models), steps, base=base)
        setting = self.settings[0]
        params = dict(setting.params)
        if setting.method == "slerp":
            return Plan.single("slerp", list(self.models), base=self.models[0], parameters=params)
        weight = params.pop("weight", 1.0)
        return Plan.single(
            setting.method,
            list(self.models),
            base=base if needs_base(setting) else None,
            parameters=params,
            model_parameters=[{"weight": weight} for _ in self.models],
        )

    def steps(self) -> list[dict]:
        if self.kind != "fold":
            return [
                {
                    "method": self.settings[0].method,
                    "parameters": dict(self.settings[0].params),
                    "models": list(self.models),
                }
            ]
        out, running = [], self.models[0]
        for index, (setting, nxt) in enumerate(zip(self.settings, self.models[1:], strict=True)):
            out.append(
                {"method": setting.method, "parameters": dict(setting.params), "models": [running, nxt]}
            )
            running = f"step{index + 1}"
        return out


class CandidateFeaturizer:
    """Feature rows for candidates; each pair's features are fetched from the source once."""

    def __init__(self, source: PairFeatureSource) -> None:
        self.source = source
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def prefetch(self, models: Sequence[str]) -> None:
        wanted = [p for p in member_pairs(models) if p not in self._cache]
        if wanted:
            rows = np.asarray(self.source.pair_features(wanted), dtype=np.float64)
            self._cache.update(zip(wanted, rows, strict=True))

    def rows(self, candidates: Sequence[Candidate]) -> np.ndarray:
        self.prefetch(sorted({m for c in candidates for m in c.models}))
        return np.stack([self._row(c) for c in candidates])

    def _row(self, candidate: Candidate) -> np.ndarray:
        pairs = member_pairs(candidate.models)
        pair_rows = np.stack([self._cache[p] for p in pairs])
        descriptor = fold_descriptor(candidate.settings, len(candidate.models), candidate.models)
        return np.concatenate(
            [descriptor, aggregate_pair_rows(pair_rows, pair_weights(candidate.models, candidate.kind))]
        )


def needs_base(setting: OperatorSetting) -> bool:
    return family_of(setting.method) not in ("linear", "slerp")


def _step_params(setting: OperatorSetting) -> dict:
    """Fold-step parameters: `weights` for both inputs unless the operator (slerp) takes none."""
    params = dict(setting.params)
    if setting.method != "slerp":
        weight = params.pop("weight", 1.0)
        params["weights"] = [weight, weight]
    return params


def usable_settings(settings: Sequence[OperatorSetting], base: str | None) -> list[OperatorSetting]:
    """Without a known base only base-free operators can run."""
    return [s for s in settings if base is not None or not needs_base(s)]


@dataclass
class ScoredCandidate:
    candidate: Candidate
    predicted: float
    uncertainty: float
    row: np.ndarray


def search_plans(
    models: Sequence[str],
    selector,
    featurizer: CandidateFeaturizer,
    *,
    settings: Sequence[OperatorSetting] = DEFAULT_SETTINGS,
    base: str | None = None,
    max_models: int | None = None,
    beam_width: int = 8,
    folds: bool = True,
    kway: bool = True,
) -> list[ScoredCandidate]:
    """All scored candidates, best first: pairs, then beam-extended folds and k-way steps up to `max_models`."""
    models = list(dict.fromkeys(models))
    if len(models) < 2:
        raise PlanError(f"a merge needs at least two checkpoints, got {models}")
    limit = min(max_models or len(models), len(models))
    if limit < 2:
        raise PlanError(f"max_models={max_models} leaves fewer than two checkpoints to merge")
    options = usable_settings(settings, base)
    if not options:
        raise PlanError("no operator setting can run without a base model; give the experts' base")
    multi = [s for s in options if s.method not in PAIR_ONLY]
    scored: dict[Candidate, ScoredCandidate] = {}

    def score(cands: list[Candidate]) -> list[ScoredCandidate]:
        fresh = [c for c in dict.fromkeys(cands) if c not in scored]
        if fresh:
            X = featurizer.rows(fresh)
            mean, unc = selector.predict(X)
            for c, m, u, row in zip(fresh, mean, unc, X, strict=True):
                scored[c] = ScoredCandidate(c, float(m), float(u), row)
        return [scored[c] for c in dict.fromkeys(cands)]

    beams = score([Candidate((a, b), (s,)) for a, b in combinations(models, 2) for s in options])
    beams = sorted(beams, key=lambda s: -s.predicted)[:beam_width]
    for _size in range(3, limit + 1):
        grown = [
            Candidate((*b.candidate.models, m), (*b.candidate.settings, s))
            for b in beams
            for m in models
            if m not in b.candidate.models
            for s in options
        ]
        fold_scores = score(grown) if folds else []
        if kway:
            subsets = {tuple(sorted(c.models)) for c in grown}
            score([Candidate(subset, (s,)) for subset in sorted(subsets) for s in multi])
        beams = sorted(fold_scores, key=lambda s: -s.predicted)[:beam_width]
        if not beams:
            break
    return sorted(scored.values(), key=lambda s: (-s.predicted, s.uncertainty))
