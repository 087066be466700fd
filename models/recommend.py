"""Recommendations: the best predicted plans for a set of checkpoints, ready to run.

Each plan carries its mergekit YAML (runnable by `simmerge merge --config`) and its *drivers*: the
three features that moved its prediction most (LightGBM SHAP contributions, or coefficient × value for
the linear model), so a user sees why a plan ranks where it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.dataset import PairFeatureSource, member_pairs
from models.descriptors import DEFAULT_SETTINGS, OperatorSetting
from models.plan_ranking import PairRows, PlanQuery, SettingTable, pair_rows_for, rank_plans
from models.plan_render import render
from models.plan_search import ScoredCandidate
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
    top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]  # all rows in one call
    picked = zip(
        top.tolist(),
        np.take_along_axis(rows, top, axis=1).tolist(),
        np.take_along_axis(contrib, top, axis=1).tolist(),
        strict=True,
    )
    return [
        [
            {"feature": feature_names[i], "value": value, "contribution": contribution}
            for i, value, contribution in zip(features, values, contributions, strict=True)
        ]
        for features, values, contributions in picked
    ]


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
    query = PlanQuery(tuple(models), base, max_models)
    return recommend_many(
        [query], selector, source, feature_names, top=[top], settings=settings, beam_width=beam_width
    )[0]


def recommend_many(
    queries: Sequence[PlanQuery],
    selector: Any,
    source: PairFeatureSource,
    feature_names: Sequence[str],
    *,
    top: Sequence[int],
    settings: Sequence[OperatorSetting] = DEFAULT_SETTINGS,
    beam_width: int = 8,
) -> list[dict[str, list[dict[str, Any]]]]:
    """`recommend_plans` for several queries at once (the service's batch): one pair-feature read, one
    prediction per search round and one explanation call for them all."""
    for k in top:
        if k < 1:
            raise SimMergeError(f"top={k} must be at least 1")
    pair_rows = pair_rows_for(source, queries)
    identical = [signatures_identical(source.feature_names, pair_rows, q.models) for q in queries]
    ranked = rank_plans(
        queries,
        selector,
        pair_rows,
        setting_table(settings),
        top=top,
        identity_first=identical,
        beam_width=beam_width,
    )
    why = iter(drivers(selector, np.stack([s.row for plans in ranked for s in plans]), feature_names))
    return [
        {"plans": [_plan_dict(rank, s, q.base, next(why)) for rank, s in enumerate(plans, 1)]}
        for q, plans in zip(queries, ranked, strict=True)
    ]


def setting_table(settings: Sequence[OperatorSetting]) -> SettingTable:
    """The step vectors of `settings`, kept for the last few settings lists (a predictor has one)."""
    key = tuple(s.key for s in settings)
    table = _SETTING_TABLES.get(key)
    if table is None:
        if len(_SETTING_TABLES) >= 8:
            _SETTING_TABLES.clear()
        table = _SETTING_TABLES[key] = SettingTable(settings)
    return table


_SETTING_TABLES: dict[tuple[str, ...], SettingTable] = {}

# Pair features that are exactly zero when two signatures are equal: the task vectors at every sampled
# coordinate, and the next-token distributions at every probe position.
IDENTITY_FEATURES = ("tv_dist", "js_mean")


def signatures_identical(feature_names: Sequence[str], pair_rows: PairRows, models: Sequence[str]) -> bool:
    """True when every pair of `models` has equal signatures (needs the features package's columns)."""
    names = list(feature_names)
    if not all(f in names for f in IDENTITY_FEATURES):
        return False
    columns = [names.index(f) for f in IDENTITY_FEATURES]
    pairs = member_pairs(list(dict.fromkeys(models)))
    return all(not np.any(pair_rows[pair][columns]) for pair in pairs)


def _plan_dict(
    rank: int, scored: ScoredCandidate, base: str | None, why: list[dict[str, Any]]
) -> dict[str, Any]:
    rendered = render(scored.candidate, base)
    return {
        "rank": rank,
        "models": list(scored.candidate.models),
        "kind": scored.candidate.kind,
        "steps": rendered.steps,
        "description": rendered.description,
        "predicted_score": scored.predicted,
        "uncertainty": scored.uncertainty,
        "mergekit_yaml": rendered.mergekit_yaml,
        "plan": rendered.plan,
        "drivers": why,
    }
