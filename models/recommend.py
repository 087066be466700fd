"""Recommendations: the best predicted plans for a set of checkpoints, ready to run.

Each plan carries its mergekit YAML (runnable by `simmerge merge --config`) and its *drivers*: the
three features that moved its prediction most (LightGBM SHAP contributions, or coefficient × value for
the linear model), so a user sees why a plan ranks where it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.dataset import PairFeatureSource, aggregate_pair_rows, member_pairs, pair_weights
from models.descriptors import DEFAULT_SETTINGS, OperatorSetting, fold_descriptor, preserves_identity
from models.plan_search import Candidate, CandidateFeaturizer, ScoredCandidate, search_plans
from simmerge.errors import SimMergeError


class MemoFeaturizer(CandidateFeaturizer):
    """Same rows as `CandidateFeaturizer`, built from parts shared across candidates.

    A request scores ~10 settings per member subset: the aggregated pair block depends only on the
    members (and whether the plan is a fold), the descriptor only on the settings, so each is computed
    once and the row is their concatenation, with identical values.
    """

    def __init__(self, source: PairFeatureSource) -> None:
        super().__init__(source)
        self._aggregates: dict[tuple[tuple[str, ...], bool], np.ndarray] = {}

    def rows(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """One preallocated matrix filled part by part (no per-row concatenation)."""
        self.prefetch(sorted({m for c in candidates for m in c.models}))
        parts = [
            (fold_descriptor(c.settings, len(c.models), c.models), self._aggregate(c)) for c in candidates
        ]
        width = len(parts[0][0])
        out = np.empty((len(parts), width + len(parts[0][1])), dtype=np.float64)
        for row, (descriptor, block) in zip(out, parts, strict=True):
            row[:width] = descriptor
            row[width:] = block
        return out

    def _aggregate(self, candidate: Candidate) -> np.ndarray:
        kind = candidate.kind
        # Only a fold weighs its pairs (by fold order); other kinds depend on the member set alone.
        key = (candidate.models, True) if kind == "fold" else (tuple(sorted(candidate.models)), False)
        block = self._aggregates.get(key)
        if block is None:
            pair_rows = np.stack([self._cache[p] for p in member_pairs(candidate.models)])
            block = aggregate_pair_rows(pair_rows, pair_weights(candidate.models, kind))
            self._aggregates[key] = block
        return block


def drivers(
    selector: Any, rows: np.ndarray, feature_names: Sequence[str], k: int = 3
) -> list[list[dict[str, Any]]]:
    """Top-k features by absolute contribution to each row's prediction."""
    if hasattr(selector, "contributions"):
        contrib = selector.contributions(rows)
    elif hasattr(selector, "coef"):
        contrib = selector._standardise(rows) * selector.coef
    else:
        return [[] for _ in rows]
    out = []
    for row, values in zip(rows, contrib, strict=True):
        order = np.argsort(-np.abs(values), kind="stable")[:k]
        out.append(
            [
                {"feature": feature_names[i], "value": float(row[i]), "contribution": float(values[i])}
                for i in order
            ]
        )
    return out


def recommend_plans(
    models: Sequence[str],
    selector: Any,
    source: PairFeatureSource,
    feature_names: Sequence[str],
    *,
    top: int = 5,
    max_models: int | None = None,
    base: str | None = None,
    settings: Sequence[OperatorSetting] = DEFAULT_SETTINGS,
    beam_width: int = 8,
) -> dict[str, list[dict[str, Any]]]:
    """`{"plans": [...]}` ranked by predicted score (ties: lower uncertainty first).

    Checkpoints whose signatures are identical are a known answer rather than a prediction: merging
    copies of one checkpoint can at best return it, so the plans that provably do (`preserves_identity`)
    rank first, each group in predicted order. The regressor cannot tell those apart reliably: on the
    full zoo, TIES at density 0.8 of an expert with itself scores 0.99997 against linear's 1.0.
    """
    if top < 1:
        raise SimMergeError(f"top={top} must be at least 1")
    featurizer = MemoFeaturizer(source)
    scored = search_plans(
        models,
        selector,
        featurizer,
        settings=settings,
        base=base,
        max_models=max_models,
        beam_width=beam_width,
    )
    if signatures_identical(featurizer, models):
        scored = sorted(scored, key=lambda s: not _returns_its_input(s.candidate))  # stable: keeps order
    scored = scored[:top]
    why = drivers(selector, np.stack([s.row for s in scored]), feature_names)
    return {
        "plans": [
            _plan_dict(rank, s, base, d) for rank, (s, d) in enumerate(zip(scored, why, strict=True), 1)
        ]
    }


# Pair features that are exactly zero when two signatures are equal: the task vectors at every sampled
# coordinate, and the next-token distributions at every probe position.
IDENTITY_FEATURES = ("tv_dist", "js_mean")


def signatures_identical(featurizer: CandidateFeaturizer, models: Sequence[str]) -> bool:
    """True when every pair of `models` has equal signatures (needs the features package's columns)."""
    names = list(featurizer.source.feature_names)
    if not all(f in names for f in IDENTITY_FEATURES):
        return False
    columns = [names.index(f) for f in IDENTITY_FEATURES]
    featurizer.prefetch(models)
    return all(not np.any(featurizer.pair_row(pair)[columns]) for pair in member_pairs(models))


def _returns_its_input(candidate: Candidate) -> bool:
    """Every step returns its input when its inputs are copies of one checkpoint."""
    inputs = [len(candidate.models)] if len(candidate.settings) == 1 else [2] * len(candidate.settings)
    return all(preserves_identity(s, n) for s, n in zip(candidate.settings, inputs, strict=True))


def _plan_dict(
    rank: int, scored: ScoredCandidate, base: str | None, why: list[dict[str, Any]]
) -> dict[str, Any]:
    plan = scored.candidate.to_plan(base)
    return {
        "rank": rank,
        "models": list(scored.candidate.models),
        "kind": scored.candidate.kind,
        "steps": scored.candidate.steps(),
        "description": plan.describe(),
        "predicted_score": scored.predicted,
        "uncertainty": scored.uncertainty,
        "mergekit_yaml": plan.to_yaml(),
        "plan": plan.to_dict(),
        "drivers": why,
    }
