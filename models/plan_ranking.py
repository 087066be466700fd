"""Plan search on arrays, for many requests at once: `search_plans`'s ranking at a fraction of its cost.

`search_plans` makes a Python object per candidate (~120 for three checkpoints) and asks the predictor
once per round of each request. Here every request of a batch is searched together, one round (one
number of members) at a time: the round's candidates of all requests are index arrays (a member order
and a setting per step), their feature rows are gathered from tables of descriptors and of pair
aggregates, one prediction call scores them, and the beams of every request are picked with one sort.
Only the plans returned become `Candidate`s. The service batches the recommendations that arrive
together, so a busy server pays the per-call costs (and the cache misses of reading the trees) once
per batch, not per request.

Rows, predictions and order equal `search_plans`'s exactly (tests compare them); `search_plans` stays
the plain statement of the search, and the scorer of `bench_selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from models.dataset import PairFeatureSource, member_pairs, pair_weights
from models.descriptors import OperatorSetting, descriptor_rows, preserves_identity, step_vectors
from models.plan_search import PAIR_ONLY, Candidate, ScoredCandidate, needs_base
from simmerge.errors import PlanError


@dataclass(frozen=True)
class PlanQuery:
    """One request's search: its checkpoints, their common base (None: base-free operators only)."""

    models: tuple[str, ...]
    base: str | None = None
    max_models: int | None = None


@dataclass
class PairRows:
    """The pair features a batch needs: row `index[(a, b)]` of `matrix` for each sorted member pair."""

    index: dict[tuple[str, str], int]
    matrix: np.ndarray

    def __getitem__(self, pair: tuple[str, str]) -> np.ndarray:
        return self.matrix[self.index[pair]]


def pair_rows_for(source: PairFeatureSource, queries: Sequence[PlanQuery]) -> PairRows:
    """The member pairs' feature rows of every query, fetched from the source in one call."""
    pairs = sorted({p for q in queries for p in member_pairs(list(dict.fromkeys(q.models)))})
    matrix = np.asarray(source.pair_features(pairs), dtype=np.float64).reshape(
        len(pairs), len(source.feature_names)
    )
    return PairRows({p: i for i, p in enumerate(pairs)}, matrix)


class SettingTable:
    """What the search needs of a settings list, computed once: step vectors, and the descriptors of
    every single-step merge and of every two-step fold of three."""

    def __init__(self, settings: Sequence[OperatorSetting]) -> None:
        self.settings = tuple(settings)
        self.steps = step_vectors(self.settings)
        needs = np.asarray([needs_base(s) for s in self.settings], dtype=bool)
        pair_only = np.asarray([s.method in PAIR_ONLY for s in self.settings], dtype=bool)
        every = np.ones(len(self.settings), dtype=bool)
        self.options = {True: np.flatnonzero(every), False: np.flatnonzero(~needs)}  # by "has a base"
        self.multi = {has: opts[~pair_only[opts]] for has, opts in self.options.items()}
        # [flipped, setting]: a 2-way slerp from the later name is described from the earlier one
        self.pair_descriptors = np.stack(
            [
                descriptor_rows(self.steps[:, None, :], 2),
                descriptor_rows(step_vectors(self.settings, flipped=True)[:, None, :], 2),
            ]
        )
        self._kway: dict[int, np.ndarray] = {}
        self._folds_of_three: np.ndarray | None = None

    def kway_descriptors(self, n_models: int) -> np.ndarray:
        """(settings, width): a single step merging `n_models` at once, per setting."""
        if n_models not in self._kway:
            self._kway[n_models] = descriptor_rows(self.steps[:, None, :], n_models)
        return self._kway[n_models]

    def fold_descriptors(self, steps: np.ndarray, n_models: int) -> np.ndarray:
        """(candidates, width) for folds whose step settings are `steps` (candidates, n_models − 1)."""
        if n_models != 3:
            return descriptor_rows(self.steps[steps], n_models)
        if self._folds_of_three is None:
            count = len(self.settings)
            grid = np.stack(np.meshgrid(np.arange(count), np.arange(count), indexing="ij"), axis=-1)
            self._folds_of_three = descriptor_rows(self.steps[grid.reshape(-1, 2)], 3).reshape(
                count, count, -1
            )
        return self._folds_of_three[steps[:, 0], steps[:, 1]]


@dataclass
class _Round:
    """Candidates of one number of members (one kind), for every query still searching."""

    query: np.ndarray  # int (candidates,)
    orders: list[tuple[str, ...]]  # distinct member orders
    order_of: np.ndarray  # int (candidates,)
    steps: np.ndarray  # int (candidates, steps)
    rows: np.ndarray  # float64 (candidates, features)
    predicted: np.ndarray = field(default_factory=lambda: np.empty(0))
    uncertainty: np.ndarray = field(default_factory=lambda: np.empty(0))


Beam = tuple[tuple[str, ...], tuple[int, ...]]  # member order, setting per step


def rank_plans(
    queries: Sequence[PlanQuery],
    selector,
    pair_rows: PairRows,
    table: SettingTable,
    *,
    top: Sequence[int],
    identity_first: Sequence[bool] | None = None,
    beam_width: int = 8,
) -> list[list[ScoredCandidate]]:
    """Each query's `top` best candidates, as `search_plans(...)[:top]` gives them (with
    `identity_first`, `recommend_plans`' order for copies of one checkpoint); one prediction call per
    round for the whole batch."""
    members = [list(dict.fromkeys(q.models)) for q in queries]
    limits = [_limit(q, m) for q, m in zip(queries, members, strict=True)]
    has_base = [q.base is not None for q in queries]
    for has in has_base:
        if not len(table.options[has]):
            raise PlanError("no operator setting can run without a base model; give the experts' base")
    rounds = [_pairs(members, has_base, table, pair_rows)]
    _predict(selector, rounds[-1:])
    beams = _beams(rounds[-1], len(queries), beam_width)
    for size in range(3, max(limits) + 1):
        active = [q for q in range(len(queries)) if limits[q] >= size and beams[q]]
        if not active:
            break
        folds, grown = _folds(active, beams, members, has_base, size, table, pair_rows)
        kway = _kway(active, grown, has_base, size, table, pair_rows)
        _predict(selector, [folds, kway])
        rounds += [folds, kway]
        beams = _beams(folds, len(queries), beam_width)
    flags = list(identity_first) if identity_first is not None else [False] * len(queries)
    return _best(rounds, table, top, flags)


def _limit(query: PlanQuery, members: list[str]) -> int:
    if len(members) < 2:
        raise PlanError(f"a merge needs at least two checkpoints, got {members}")
    limit = min(query.max_models or len(members), len(members))
    if limit < 2:
        raise PlanError(f"max_models={query.max_models} leaves fewer than two checkpoints to merge")
    return limit


def _predict(selector, rounds: list[_Round]) -> None:
    predicted, uncertainty = selector.predict(np.concatenate([r.rows for r in rounds]))
    start = 0
    for r in rounds:
        end = start + len(r.rows)
        r.predicted, r.uncertainty = predicted[start:end], uncertainty[start:end]
        start = end


def _beams(grown: _Round, n_queries: int, beam_width: int) -> list[list[Beam]]:
    """Each query's best `beam_width` candidates of a round, best first (ties: earlier first)."""
    order = np.lexsort((-grown.predicted, grown.query))  # by query, then predicted; stable
    beams: list[list[Beam]] = [[] for _ in range(n_queries)]
    for c in _first_of_each_query(order, grown.query, np.full(n_queries, beam_width)).tolist():
        beams[grown.query[c]].append((grown.orders[grown.order_of[c]], tuple(grown.steps[c].tolist())))
    return beams


def _first_of_each_query(order: np.ndarray, query: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The entries of `order` (grouped by query) that are among the first `counts[q]` of their query."""
    grouped = query[order]
    starts = np.searchsorted(grouped, grouped, side="left")  # where each entry's query group begins
    return order[np.arange(len(order)) - starts < counts[grouped]]


def _pairs(
    members: list[list[str]], has_base: list[bool], table: SettingTable, pair_rows: PairRows
) -> _Round:
    """Every pair of each query's members (in its order) under each usable setting."""
    orders = [(q, order) for q, models in enumerate(members) for order in combinations(models, 2)]
    options = [table.options[has_base[q]] for q, _ in orders]
    counts = [len(o) for o in options]
    order_of = np.repeat(np.arange(len(orders)), counts)
    steps = np.concatenate(options)
    flipped = np.asarray([a > b for _, (a, b) in orders])[order_of]
    descriptors = table.pair_descriptors[flipped.astype(np.intp), steps]
    block = pair_rows.matrix[[pair_rows.index[min(a, b), max(a, b)] for _, (a, b) in orders]]
    aggregates = np.concatenate([block, block, block], axis=1)  # mean, min and max of one row
    query = np.repeat([q for q, _ in orders], counts)
    return _Round(
        query, [o for _, o in orders], order_of, steps[:, None], _join(descriptors, aggregates[order_of])
    )


def _folds(
    active: list[int],
    beams: list[list[Beam]],
    members: list[list[str]],
    has_base: list[bool],
    size: int,
    table: SettingTable,
    pair_rows: PairRows,
) -> tuple[_Round, dict[int, list[tuple[str, ...]]]]:
    """Each beam extended by each member it lacks, under each usable setting; also each query's orders."""
    orders: dict[tuple[str, ...], int] = {}
    grown: dict[int, list[tuple[str, ...]]] = {}
    query, order_index, prefix, options = [], [], [], []
    for q in active:
        for beam_members, beam_steps in beams[q]:
            for m in members[q]:
                if m in beam_members:
                    continue
                order = (*beam_members, m)
                grown.setdefault(q, []).append(order)
                query.append(q)
                order_index.append(orders.setdefault(order, len(orders)))
                prefix.append(beam_steps)
                options.append(table.options[has_base[q]])
    counts = [len(o) for o in options]
    steps = np.column_stack(
        [np.repeat(np.asarray(prefix, dtype=np.intp), counts, axis=0), np.concatenate(options)]
    )
    order_of = np.repeat(order_index, counts)
    distinct = list(orders)
    rows = _join(table.fold_descriptors(steps, size), _aggregates(distinct, pair_rows, "fold")[order_of])
    return _Round(np.repeat(query, counts), distinct, order_of, steps, rows), grown


def _kway(
    active: list[int],
    grown: dict[int, list[tuple[str, ...]]],
    has_base: list[bool],
    size: int,
    table: SettingTable,
    pair_rows: PairRows,
) -> _Round:
    """One k-way step over each member set the query's folds reached, under each multi-model setting."""
    subsets: dict[tuple[str, ...], int] = {}
    query, subset_index, options = [], [], []
    for q in active:
        for subset in sorted({tuple(sorted(order)) for order in grown.get(q, [])}):
            query.append(q)
            subset_index.append(subsets.setdefault(subset, len(subsets)))
            options.append(table.multi[has_base[q]])
    counts = [len(o) for o in options]
    steps = np.concatenate(options) if options else np.empty(0, dtype=np.intp)
    order_of = np.repeat(np.asarray(subset_index, dtype=np.intp), counts)
    distinct = list(subsets)
    descriptors = table.kway_descriptors(size)[steps]
    aggregates = (
        _aggregates(distinct, pair_rows, "kway") if distinct else np.empty((0, 3 * pair_rows.matrix.shape[1]))
    )
    rows = _join(descriptors, aggregates[order_of])
    return _Round(
        np.repeat(np.asarray(query, dtype=np.intp), counts), distinct, order_of, steps[:, None], rows
    )


def _aggregates(orders: list[tuple[str, ...]], pair_rows: PairRows, kind: str) -> np.ndarray:
    """`aggregate_pair_rows` of each order's member pairs (all orders have as many members), to the bit."""
    index = np.asarray([[pair_rows.index[p] for p in member_pairs(order)] for order in orders])
    rows = pair_rows.matrix[index]  # (orders, pairs, features)
    if kind == "fold":  # np.average's arithmetic, as aggregate_pair_rows does it
        weights = np.asarray([pair_weights(order, kind) for order in orders])
        mean = (rows * weights[:, :, None]).sum(axis=1) / weights.sum(axis=1)[:, None]
    else:
        mean = rows.sum(axis=1) / rows.shape[1]
    return np.concatenate([mean, rows.min(axis=1), rows.max(axis=1)], axis=1)


def _join(descriptors: np.ndarray, aggregates: np.ndarray) -> np.ndarray:
    rows = np.empty((len(descriptors), descriptors.shape[1] + aggregates.shape[1]))
    rows[:, : descriptors.shape[1]] = descriptors
    rows[:, descriptors.shape[1] :] = aggregates
    return rows


def _best(
    rounds: list[_Round], table: SettingTable, top: Sequence[int], identity_first: list[bool]
) -> list[list[ScoredCandidate]]:
    """Each query's candidates in `search_plans`' order (predicted, then uncertainty, then found first),
    cut to its `top`."""
    query = np.concatenate([r.query for r in rounds])
    predicted = np.concatenate([r.predicted for r in rounds])
    uncertainty = np.concatenate([r.uncertainty for r in rounds])
    starts = np.cumsum([0] + [len(r.query) for r in rounds])
    keys = [uncertainty, -predicted]
    if any(identity_first):
        keys.append(~_returns_input(rounds, table, identity_first))
    order = np.lexsort([*keys, query])  # by query first; stable, so ties keep the order found
    out: list[list[ScoredCandidate]] = [[] for _ in top]
    for index in _first_of_each_query(order, query, np.asarray(top)).tolist():
        r = int(np.searchsorted(starts, index, side="right")) - 1
        found, c = rounds[r], index - starts[r]
        candidate = Candidate(
            found.orders[found.order_of[c]], tuple(table.settings[j] for j in found.steps[c].tolist())
        )
        out[int(query[index])].append(
            ScoredCandidate(candidate, float(found.predicted[c]), float(found.uncertainty[c]), found.rows[c])
        )
    return out


def _returns_input(rounds: list[_Round], table: SettingTable, flagged: list[bool]) -> np.ndarray:
    """Per candidate: for a flagged query, every step returns its input for copies of one checkpoint
    (False for the other queries' candidates, which do not use this key)."""
    out = []
    for r in rounds:
        for c in range(len(r.query)):
            if not flagged[r.query[c]]:
                out.append(False)
                continue
            steps = r.steps[c].tolist()
            inputs = len(r.orders[r.order_of[c]]) if len(steps) == 1 else 2
            out.append(all(preserves_identity(table.settings[j], inputs) for j in steps))
    return np.asarray(out, dtype=bool)
