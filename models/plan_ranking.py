"""Plan search on arrays, for many requests at once: `search_plans`'s ranking at a fraction of its cost.

`search_plans` makes a Python object per candidate (~120 for three checkpoints) and asks the predictor
once per round of each request. Here a request's candidates are index arrays (a member order and a
setting per step); their feature rows are filled from the few distinct descriptors and pair
aggregates; one prediction serves a round of every request in the batch; and only the plans returned
become `Candidate`s. The service batches the recommendations that arrive together, so a busy server
pays the per-call costs (and the cache misses of reading the trees) once per batch, not per request.

Rows, predictions and order equal `search_plans`'s exactly (tests compare them); `search_plans` stays
the plain statement of the search, and the scorer of `bench_selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from models.dataset import PairFeatureSource, aggregate_pair_rows, member_pairs, pair_weights
from models.descriptors import OperatorSetting, descriptor_rows, preserves_identity, step_vectors
from models.plan_search import PAIR_ONLY, Candidate, ScoredCandidate, needs_base
from simmerge.errors import PlanError


@dataclass(frozen=True)
class PlanQuery:
    """One request's search: its checkpoints, their common base (None: base-free operators only)."""

    models: tuple[str, ...]
    base: str | None = None
    max_models: int | None = None


class SettingTable:
    """The step vectors of a settings list, as given and with a 2-way slerp's orientation flipped."""

    def __init__(self, settings: Sequence[OperatorSetting]) -> None:
        self.settings = tuple(settings)
        self.steps = step_vectors(self.settings)
        self.flipped_steps = step_vectors(self.settings, flipped=True)
        self.needs_base = np.asarray([needs_base(s) for s in self.settings], dtype=bool)
        self.pair_only = np.asarray([s.method in PAIR_ONLY for s in self.settings], dtype=bool)


@dataclass
class _Round:
    """Candidates scored together: member orders, and per candidate its order and setting per step."""

    orders: list[tuple[str, ...]]
    order_of: np.ndarray  # int (candidates,)
    steps: np.ndarray  # int (candidates, steps)
    rows: np.ndarray  # float64 (candidates, features)
    predicted: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


class _Search:
    """One query's beam search (see `search_plans`): pairs, then per size the folds grown from the best
    folds so far, and the k-way merges of their member sets."""

    def __init__(
        self,
        query: PlanQuery,
        table: SettingTable,
        pair_rows: dict[tuple[str, str], np.ndarray],
        beam_width: int,
    ) -> None:
        self.models = list(dict.fromkeys(query.models))
        if len(self.models) < 2:
            raise PlanError(f"a merge needs at least two checkpoints, got {self.models}")
        self.limit = min(query.max_models or len(self.models), len(self.models))
        if self.limit < 2:
            raise PlanError(f"max_models={query.max_models} leaves fewer than two checkpoints to merge")
        usable = ~table.needs_base if query.base is None else np.ones(len(table.settings), dtype=bool)
        self.options = np.flatnonzero(usable)
        if not len(self.options):
            raise PlanError("no operator setting can run without a base model; give the experts' base")
        self.multi = self.options[~table.pair_only[self.options]]
        self.table, self.pair_rows, self.beam_width = table, pair_rows, beam_width
        self.rounds: list[_Round] = []
        self.size = 2
        self._beams: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

    @property
    def done(self) -> bool:
        return self.size > self.limit or (self.size > 2 and not self._beams)

    def next_rows(self) -> np.ndarray:
        """The next size's candidate rows (for size ≥ 3: the folds, then the k-way merges)."""
        if self.size == 2:
            self.rounds.append(self._pairs())
        else:
            folds = self._folds()
            self.rounds += [folds, self._kway(folds.orders)]
        return np.concatenate([r.rows for r in self._open_rounds()])

    def take(self, predicted: np.ndarray, uncertainty: np.ndarray) -> None:
        """The predictions of `next_rows`' rows, in order; picks the beams the next size grows from."""
        start = 0
        open_rounds = self._open_rounds()
        for r in open_rounds:
            end = start + len(r.rows)
            r.predicted, r.uncertainty = predicted[start:end], uncertainty[start:end]
            start = end
        grown = open_rounds[0]  # pairs at size 2, the folds after
        best = np.argsort(-grown.predicted, kind="stable")[: self.beam_width]
        self._beams = [(grown.orders[grown.order_of[c]], tuple(grown.steps[c].tolist())) for c in best]
        self.size += 1

    def best(self, top: int, identity_first: bool) -> list[ScoredCandidate]:
        """The `top` candidates in `search_plans`' order; with `identity_first`, those that return their
        input when it is one checkpoint's copies come first (see `recommend_plans`)."""
        predicted = np.concatenate([r.predicted for r in self.rounds])
        uncertainty = np.concatenate([r.uncertainty for r in self.rounds])
        keys = [uncertainty, -predicted]
        if identity_first:
            keys.append(~self._returns_input())
        order = np.lexsort(keys)[:top]
        located = [(r, c) for r in self.rounds for c in range(len(r.rows))]
        out = []
        for index in order.tolist():
            r, c = located[index]
            candidate = Candidate(
                r.orders[r.order_of[c]], tuple(self.table.settings[j] for j in r.steps[c].tolist())
            )
            out.append(ScoredCandidate(candidate, float(r.predicted[c]), float(r.uncertainty[c]), r.rows[c]))
        return out

    # -- candidates of each round ---------------------------------------------------------------------
    def _open_rounds(self) -> list[_Round]:
        return [r for r in self.rounds if r.predicted is None]

    def _pairs(self) -> _Round:
        orders = list(combinations(self.models, 2))
        n_options = len(self.options)
        order_of = np.repeat(np.arange(len(orders)), n_options)
        steps = np.tile(self.options, len(orders))[:, None]
        flipped = np.asarray([a > b for a, b in orders])[order_of]
        vectors = np.where(
            flipped[:, None], self.table.flipped_steps[steps[:, 0]], self.table.steps[steps[:, 0]]
        )
        descriptors = descriptor_rows(vectors[:, None, :], 2)
        pair_block = np.stack([self.pair_rows[min(a, b), max(a, b)] for a, b in orders])
        aggregates = np.concatenate([pair_block, pair_block, pair_block], axis=1)  # mean, min, max of one row
        return _Round(orders, order_of, steps, _join(descriptors, aggregates[order_of]))

    def _folds(self) -> _Round:
        grown = [
            (members, steps, m) for members, steps in self._beams for m in self.models if m not in members
        ]
        orders = list(dict.fromkeys((*members, m) for members, _, m in grown))
        index = {order: i for i, order in enumerate(orders)}
        n_options = len(self.options)
        order_of = np.repeat([index[(*members, m)] for members, _, m in grown], n_options)
        beam_steps = np.asarray([steps for _, steps, _ in grown], dtype=np.int64)
        steps = np.column_stack([np.repeat(beam_steps, n_options, axis=0), np.tile(self.options, len(grown))])
        descriptors = descriptor_rows(self.table.steps[steps], self.size)
        aggregates = np.stack([self._aggregate(order, "fold") for order in orders])
        return _Round(orders, order_of, steps, _join(descriptors, aggregates[order_of]))

    def _kway(self, grown: list[tuple[str, ...]]) -> _Round:
        subsets = sorted({tuple(sorted(order)) for order in grown})
        n_multi = len(self.multi)
        order_of = np.repeat(np.arange(len(subsets)), n_multi)
        steps = np.tile(self.multi, len(subsets))[:, None]
        descriptors = descriptor_rows(self.table.steps[steps], self.size)
        aggregates = np.stack([self._aggregate(subset, "kway") for subset in subsets])
        return _Round(subsets, order_of, steps, _join(descriptors, aggregates[order_of]))

    def _aggregate(self, members: tuple[str, ...], kind: str) -> np.ndarray:
        rows = np.stack([self.pair_rows[p] for p in member_pairs(members)])
        return aggregate_pair_rows(rows, pair_weights(members, kind))

    def _returns_input(self) -> np.ndarray:
        """Per candidate (in round order): every step returns its input for copies of one checkpoint."""
        settings = self.table.settings
        out = []
        for r in self.rounds:
            for c in range(len(r.rows)):
                steps = r.steps[c].tolist()
                inputs = len(r.orders[r.order_of[c]]) if len(steps) == 1 else 2
                out.append(all(preserves_identity(settings[j], inputs) for j in steps))
        return np.asarray(out, dtype=bool)


def _join(descriptors: np.ndarray, aggregates: np.ndarray) -> np.ndarray:
    rows = np.empty((len(descriptors), descriptors.shape[1] + aggregates.shape[1]))
    rows[:, : descriptors.shape[1]] = descriptors
    rows[:, descriptors.shape[1] :] = aggregates
    return rows


def pair_rows_for(
    source: PairFeatureSource, queries: Sequence[PlanQuery]
) -> dict[tuple[str, str], np.ndarray]:
    """The member pairs' feature rows of every query, fetched from the source in one call."""
    pairs = sorted({p for q in queries for p in member_pairs(list(dict.fromkeys(q.models)))})
    rows = np.asarray(source.pair_features(pairs), dtype=np.float64)
    return dict(zip(pairs, rows, strict=True))


def rank_plans(
    queries: Sequence[PlanQuery],
    selector,
    pair_rows: dict[tuple[str, str], np.ndarray],
    table: SettingTable,
    *,
    top: Sequence[int],
    identity_first: Sequence[bool] | None = None,
    beam_width: int = 8,
) -> list[list[ScoredCandidate]]:
    """Each query's `top` best candidates, as `search_plans(...)[:top]` gives them; one prediction per
    round for the whole batch."""
    searches = [_Search(q, table, pair_rows, beam_width) for q in queries]
    active = list(searches)
    while active:
        blocks = [s.next_rows() for s in active]
        predicted, uncertainty = selector.predict(np.concatenate(blocks))
        start = 0
        for search, block in zip(active, blocks, strict=True):
            search.take(predicted[start : start + len(block)], uncertainty[start : start + len(block)])
            start += len(block)
        active = [s for s in active if not s.done]
    flags = identity_first or [False] * len(searches)
    return [s.best(k, flag) for s, k, flag in zip(searches, top, flags, strict=True)]
