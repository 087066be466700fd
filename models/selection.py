"""Recommend plans and score a catalog: policies over the plan table and the bandit.

The one path of a recommendation: queries → candidate plans (`models.plans.search`, scored round by
round through `models.table.PlanTable`) → the policy (the regressor's prediction, or the bandit's
posterior once the store holds feedback) → the response. `score-catalog` scores its pairs through the
same table, so a plan gets the same prediction from both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from models.bandit import MODES, Posterior, check_score
from models.plans import (
    Candidate,
    OperatorSetting,
    PlanQuery,
    Scored,
    candidate_from_plan,
    candidate_settings,
    is_cross_family,
    returns_input,
    search,
)
from models.ports import ArmSource, FeedbackLog, FeedbackRecord, PairFeatureSource
from models.table import PlanTable, member_pairs
from simmerge.errors import SimMergeError
from simmerge.plan import Plan

log = logging.getLogger("simmerge.models")
Progress = Callable[[float, str | None], None]
# Pair features that are exactly zero when two signatures are equal: the task vectors at every sampled
# coordinate, and the next-token distributions at every probe position.
IDENTITY_FEATURES = ("tv_dist", "js_mean")


@dataclass
class Selection:
    """A loaded predictor over a feature source, with the store's arms and feedback.

    The service keeps one per process (reloaded when the predictor or catalog changes); the CLI makes
    one per command. The bandit's posterior follows the feedback table: each call folds in the rows
    added since the last (`Posterior.extend`), so every process sharing the store agrees.
    """

    selector: Any
    meta: dict[str, Any]
    source: PairFeatureSource
    feedback: FeedbackLog | None = None
    arms: ArmSource | None = None
    table: PlanTable = field(init=False)
    _posterior: Posterior | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.table = PlanTable(self.source, self.meta.get("input_feature_names"))

    # -- what is searched ---------------------------------------------------------------------
    def settings(self) -> list[OperatorSetting]:
        labelled = [
            OperatorSetting(s["method"], s.get("params", {})) for s in self.meta.get("settings") or []
        ]
        arms = [OperatorSetting(f, p) for f, p in self.arms.arm_settings()] if self.arms is not None else []
        return candidate_settings(labelled, arms)

    # -- the bandit ---------------------------------------------------------------------------
    def posterior(self) -> Posterior:
        """The bandit's posterior with every feedback row the store holds folded in.

        Rows are read from the posterior's low-water mark (every id up to it is folded in) and those
        already seen are skipped: on PostgreSQL ids are handed out at insert but become visible at
        commit, so a later id can be seen before an earlier one, which a plain "id above the newest
        seen" read would lose. A gap that never fills (a rolled-back insert) only means the rows after
        it are read again and skipped."""
        if self._posterior is None:
            self._posterior = Posterior.for_columns(self.table.columns)
        posterior = self._posterior
        if self.feedback is not None:
            new = [r for r in self.feedback.feedback_since(posterior.last_id) if r.id not in posterior.seen]
            if new:
                self._learn(posterior, new)
        return posterior

    def _learn(self, posterior: Posterior, records: Sequence[FeedbackRecord]) -> None:
        usable = []
        for record in records:
            try:
                usable.append((record, feedback_candidate(record.plan)))
            except SimMergeError as exc:  # a plan the current catalog cannot describe teaches nothing
                log.warning("feedback %s ignored by the bandit: %s", record.id, exc)
        if usable:
            rows, prior, _ = self.table.score(self.selector, [c for _, c in usable])
            posterior.extend(rows, prior, np.asarray([r.score for r, _ in usable]))
        posterior.mark_seen(r.id for r in records)

    def check_feedback(self, plan: dict[str, Any], score: float) -> None:
        """Raise if this measurement could not be learned (unknown checkpoints, a non-finite update),
        before the caller stores it."""
        score = check_score(score)
        candidate = feedback_candidate(plan)
        rows, prior, _ = self.table.score(self.selector, [candidate])
        self.posterior().updated(rows, prior, np.asarray([score]))

    # -- recommendations ----------------------------------------------------------------------
    def recommend_many(
        self, queries: Sequence[PlanQuery], top: Sequence[int], mode: str = "exploit", beam_width: int = 8
    ) -> list[dict[str, Any]]:
        """Each query's `{"plans": [...], "ranked_by": ...}`, searched together (one scoring call per
        round for the batch, one explanation call for every plan returned)."""
        if mode not in MODES:
            raise SimMergeError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        for k in top:
            if k < 1:
                raise SimMergeError(f"top={k} must be at least 1")
        found = search(
            queries,
            lambda cands: self.table.score(self.selector, cands),
            self.settings(),
            beam_width=beam_width,
        )
        posterior = self.posterior()
        learned = posterior.pulls > 0
        chosen = []
        for query, scored, k in zip(queries, found, top, strict=True):
            values = self._bandit_values(scored, posterior, mode) if learned else None
            chosen.append(_ranked(scored, values, self._identical(query), k))
        rows = [s.row for plans in chosen for s, _ in plans]
        why = iter(self.table.explain(self.selector, np.stack(rows)) if rows else [])
        ranked_by = f"bandit ({mode})" if learned else "regressor"
        return [
            {
                "plans": [
                    _plan_dict(rank, s, bandit, q.base, next(why))
                    for rank, (s, bandit) in enumerate(plans, 1)
                ],
                "ranked_by": ranked_by,
            }
            for q, plans in zip(queries, chosen, strict=True)
        ]

    def _bandit_values(self, scored: list[Scored], posterior: Posterior, mode: str) -> np.ndarray:
        rows = np.stack([s.row for s in scored])
        prior = np.asarray([s.predicted for s in scored])
        value, mean, width = posterior.value(rows, prior, mode)
        return np.stack([value, mean, width], axis=1)

    def _identical(self, query: PlanQuery) -> bool:
        """Every pair of the query's checkpoints has equal signatures (needs the features package's columns)."""
        names = list(self.source.feature_names)
        if not all(f in names for f in IDENTITY_FEATURES):
            return False
        columns = [names.index(f) for f in IDENTITY_FEATURES]
        rows = self.table.pair_rows(member_pairs(list(dict.fromkeys(query.models))))
        return not np.any(rows[:, columns])

    # -- catalog scoring ----------------------------------------------------------------------
    def score_pairs(
        self,
        names: Sequence[str],
        progress: Progress | None = None,
        bases: Mapping[str, str | None] | None = None,
        methods: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """One row per (pair, setting) for every pair of `names` in name order: `model_a, model_b,
        method, parameters` (JSON), `predicted_score, uncertainty`; `bases` tells cross-family pairs,
        `methods` keeps those families only (an unknown name is an error naming it)."""
        names = sorted(dict.fromkeys(names))
        if len(names) < 2:
            raise SimMergeError(f"scoring a catalog needs at least two checkpoints, got {len(names)}")
        settings = [s for s in self.settings() if s.takes(2)]
        if methods:
            settings = [s for s in settings if s.method in _known_methods(methods, settings)]
        bases = bases or {}
        ia, ib = np.triu_indices(len(names), k=1)
        frames = []
        for index, setting in enumerate(settings):
            candidates = [
                Candidate(
                    (names[a], names[b]),
                    (setting,),
                    is_cross_family([bases.get(names[a]), bases.get(names[b])]),
                )
                for a, b in zip(ia, ib, strict=True)
            ]
            _, mean, unc = self.table.score(self.selector, candidates)
            frames.append((setting, mean, unc))
            if progress is not None:
                progress((index + 1) / len(settings), setting.label())
        codes = np.repeat(np.arange(len(settings)), len(ia))
        return pd.DataFrame(
            {
                "model_a": pd.Categorical.from_codes(np.tile(ia, len(settings)), categories=pd.Index(names)),
                "model_b": pd.Categorical.from_codes(np.tile(ib, len(settings)), categories=pd.Index(names)),
                "method": _categorical([s.method for s in settings], codes),
                "parameters": _categorical(
                    [json.dumps(dict(s.params), sort_keys=True) for s in settings], codes
                ),
                "predicted_score": np.concatenate([m for _, m, _ in frames]),
                "uncertainty": np.concatenate([u for _, _, u in frames]),
            }
        )


def _known_methods(methods: Sequence[str], settings: Sequence[OperatorSetting]) -> set[str]:
    """`methods` after checking each is a registered family that has a setting to score."""
    from simmerge.operators import get_operator

    offered = {s.method for s in settings}
    for method in methods:
        get_operator(method)  # PlanError naming an unknown family
        if method not in offered:
            raise SimMergeError(
                f"method {method!r} has no setting to score (offered: {', '.join(sorted(offered))}); "
                "add one as an arm (POST /v1/operators/{family}/arms)"
            )
    return set(methods)


def feedback_candidate(plan: dict[str, Any]) -> Candidate:
    """The candidate a measured plan is (the plan as `recommend --json` prints it, or its `plan` dict)."""
    body = plan.get("plan", plan)
    candidate = candidate_from_plan(Plan.from_dict(body))
    if len(candidate.models) < 2:
        raise SimMergeError(f"feedback plan merges {len(candidate.models)} checkpoint(s); need at least two")
    return candidate


def _ranked(
    scored: list[Scored], bandit: np.ndarray | None, identical: bool, k: int
) -> list[tuple[Scored, np.ndarray | None]]:
    """The top `k` by the policy: the bandit's value once it has learned, else the regressor's order
    (`search` already sorted by it). For copies of one checkpoint, plans that provably return it come
    first: the regressor cannot tell them apart reliably (TIES at density 0.8 of an expert with itself
    scores 0.99997 on the full zoo against linear's 1.0)."""
    order = list(range(len(scored)))
    if bandit is not None:
        order.sort(key=lambda i: (-bandit[i, 0], -scored[i].predicted))
    if identical:
        order.sort(key=lambda i: not returns_input(scored[i].candidate))
    return [(scored[i], None if bandit is None else bandit[i]) for i in order[:k]]


def _plan_dict(
    rank: int, scored: Scored, bandit: np.ndarray | None, base: str | None, why: list[dict[str, Any]]
) -> dict[str, Any]:
    plan = scored.candidate.to_plan(base)
    out = {
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
    if bandit is not None:
        out["bandit_score"] = float(bandit[1])
        if np.isfinite(bandit[2]):
            out["bandit_width"] = float(bandit[2])
    return out


def _categorical(per_setting: list[str], codes: np.ndarray) -> pd.Categorical:
    """A column that repeats one value per setting, stored as codes into its distinct values."""
    categories = list(dict.fromkeys(per_setting))
    lookup = np.asarray([categories.index(v) for v in per_setting])
    return pd.Categorical.from_codes(lookup[codes], categories=pd.Index(categories))
