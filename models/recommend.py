"""Recommendations: the best predicted plans for a set of checkpoints, ready to run.

Each plan carries its mergekit YAML (runnable by `simmerge merge --config`) and its *drivers*: the
three features that moved its prediction most (LightGBM SHAP contributions, or coefficient × value for
the linear model), so a user sees why a plan ranks where it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.dataset import PairFeatureSource
from models.descriptors import DEFAULT_SETTINGS, OperatorSetting
from models.plan_search import CandidateFeaturizer, ScoredCandidate, search_plans
from simmerge.errors import SimMergeError


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
    """`{"plans": [...]}` ranked by predicted score (ties: lower uncertainty first)."""
    if top < 1:
        raise SimMergeError(f"top={top} must be at least 1")
    scored = search_plans(
        models,
        selector,
        CandidateFeaturizer(source),
        settings=settings,
        base=base,
        max_models=max_models,
        beam_width=beam_width,
    )[:top]
    why = drivers(selector, np.stack([s.row for s in scored]), feature_names)
    return {
        "plans": [
            _plan_dict(rank, s, base, d) for rank, (s, d) in enumerate(zip(scored, why, strict=True), 1)
        ]
    }


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
