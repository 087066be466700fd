"""The plan table: candidate plans × pair features × operator traits → the predictor's feature matrix.

This is the only place a plan becomes a row. Training (`models.dataset`), recommendations and catalog
scoring (`models.selection`) and the bandit (`models.bandit`) all read rows from here, so the same plan
gets the same row, whichever path asks and in whatever order its checkpoints were registered.

A row is the plan's operator descriptor followed by its member pairs' features aggregated over every
member pair (mean, min, max), so pairs, k-way merges and folds share the columns:
- `op:family=F` (one-hot, `other` for a family the columns do not list), `op:<trait>` (the operator's
  declared traits), `op:param=P` (its parameters, the operator's default where the plan sets none),
  averaged over a fold's steps with later steps weighing more (step i: 2^i);
- `op:kind=K`, `op:n_models`, `op:n_steps`;
- `pair:<mean|min|max>:<feature>`, a fold's pairs weighted by their members' shares.

Columns are built by name, so a predictor trained on other families or parameters still reads exactly
the columns it was trained on. Orientation is defined once, here: pair features are looked up under
the name-sorted pair, and an interpolation between two inputs (slerp) from the later name at `t` is
described as the one from the earlier name at `1 − t`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.plans import Candidate, OperatorSetting, fold_weights
from models.ports import PairFeatureSource
from simmerge.errors import PlanError, SimMergeError
from simmerge.operators import TRAITS, get_operator, registered_families

KINDS = ("pair", "kway", "fold", "cross_family")
AGGREGATES = ("mean", "min", "max")
# Parameters described, and the value that means "the operator does not do this" when it has none.
PARAM_FALLBACKS: dict[str, float] = {
    "weight": 1.0,
    "density": 1.0,
    "lambda": 1.0,
    "t": 0.5,
    "gamma": 0.0,
    "epsilon": 0.0,
    "normalize": 0.0,
    "rescale": 0.0,
}
SHAPE_PREFIXES = ("op:kind=", "op:n_models", "op:n_steps")


def descriptor_names(families: Sequence[str] | None = None) -> list[str]:
    """Operator-descriptor columns: the registered native families (registration order) and `other`."""
    listed = list(families) if families is not None else registered_families()
    names = [f"op:family={f}" for f in [*listed, "other"]]
    names += [f"op:{trait}" for trait in TRAITS]
    names += [f"op:param={p}" for p in PARAM_FALLBACKS]
    names += [f"op:kind={k}" for k in KINDS]
    return [*names, "op:n_models", "op:n_steps"]


def pair_feature_names(base_names: Sequence[str]) -> list[str]:
    return [f"pair:{agg}:{name}" for agg in AGGREGATES for name in base_names]


def feature_names(pair_names: Sequence[str]) -> list[str]:
    """The columns of a newly trained predictor."""
    return descriptor_names() + pair_feature_names(pair_names)


def member_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of members, each name-sorted so (a, b) and (b, a) share a row.

    Distinct members pair only with each other; a checkpoint merged with itself is the pair (a, a).
    """
    unique = sorted(set(models))
    if len(unique) == 1 and len(models) > 1:
        return [(unique[0], unique[0])]
    return [(a, b) for i, a in enumerate(unique) for b in unique[i + 1 :]]


def pair_weights(candidate: Candidate) -> np.ndarray | None:
    """Weights of `member_pairs` in the mean: a fold's pairs weigh by their members' shares."""
    if candidate.kind != "fold":
        return None
    share = dict(zip(candidate.models, fold_weights(len(candidate.models)), strict=True))
    return np.asarray([share[a] * share[b] for a, b in member_pairs(candidate.models)])


def aggregate_pair_rows(rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(n_pairs, n_features) → (3 · n_features,): (weighted) mean, min and max over the member pairs."""
    if weights is None:
        mean = rows.sum(axis=0) / len(rows)
    else:
        column = np.asarray(weights, dtype=np.float64)[:, None]
        mean = (rows * column).sum(axis=0) / column.sum(axis=0)
    return np.concatenate([mean, rows.min(axis=0), rows.max(axis=0)])


class PlanTable:
    """Rows, predictions and explanations for candidate plans over one pair-feature source.

    `columns` are the predictor's input feature names (default: a new predictor's). Descriptors are
    memoised per plan shape, and pair rows per checkpoint pair, for the table's lifetime.
    """

    def __init__(self, source: PairFeatureSource, columns: Sequence[str] | None = None) -> None:
        self.source = source
        self.columns = list(columns) if columns is not None else feature_names(source.feature_names)
        self._descriptor_columns = [c for c in self.columns if c.startswith("op:")]
        expected = pair_feature_names(source.feature_names)
        pair_columns = self.columns[len(self._descriptor_columns) :]
        if pair_columns != expected:
            raise SimMergeError(
                f"the predictor reads {len(pair_columns)} pair-feature columns, the feature source gives "
                f"{len(expected)} ({len(source.feature_names)} features × {len(AGGREGATES)}); retrain with "
                "`simmerge train` or use matching features"
            )
        self._families = [c.split("=", 1)[1] for c in self._descriptor_columns if c.startswith("op:family=")]
        self._descriptors: dict[tuple[Any, ...], np.ndarray] = {}
        self._pairs: dict[tuple[str, str], np.ndarray] = {}

    # -- rows ---------------------------------------------------------------------------------
    def rows(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """(candidates, columns): each candidate's descriptor and aggregated pair features."""
        self._fetch_pairs({p for c in candidates for p in member_pairs(c.models)})
        width = len(self._descriptor_columns)
        out = np.empty((len(candidates), len(self.columns)))
        aggregates: dict[tuple[tuple[str, ...], str], np.ndarray] = {}
        for i, candidate in enumerate(candidates):
            out[i, :width] = self.descriptor(candidate)
            key = (candidate.models, candidate.kind)
            if key not in aggregates:
                pairs = np.stack([self._pairs[p] for p in member_pairs(candidate.models)])
                aggregates[key] = aggregate_pair_rows(pairs, pair_weights(candidate))
            out[i, width:] = aggregates[key]
        return out

    def pair_rows(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """The source's rows for these pairs, each looked up name-sorted."""
        ordered = [(a, b) if a <= b else (b, a) for a, b in pairs]
        self._fetch_pairs(set(ordered))
        return np.stack([self._pairs[p] for p in ordered]) if ordered else np.zeros((0, 0))

    def _fetch_pairs(self, pairs: set[tuple[str, str]]) -> None:
        missing = sorted(p for p in pairs if p not in self._pairs)
        if missing:
            rows = np.asarray(self.source.pair_features(missing), dtype=np.float64)
            self._pairs.update(zip(missing, rows.reshape(len(missing), -1), strict=True))

    def descriptor(self, candidate: Candidate) -> np.ndarray:
        """The operator columns of a candidate (memoised: read-only)."""
        flipped = (
            len(candidate.settings) == 1
            and len(candidate.models) == 2
            and candidate.models[0] > candidate.models[1]
            and candidate.settings[0].operator.interpolates_inputs
        )
        key = (candidate.settings, len(candidate.models), candidate.kind, flipped)
        found = self._descriptors.get(key)
        if found is None:
            found = self._describe(candidate.settings, len(candidate.models), candidate.kind, flipped)
            found.flags.writeable = False
            self._descriptors[key] = found
        return found

    def _describe(
        self, settings: Sequence[OperatorSetting], n_models: int, kind: str, flipped: bool
    ) -> np.ndarray:
        steps = np.stack([self._step(s, flipped) for s in settings])
        weights = 2.0 ** np.arange(len(settings))  # later fold steps act on more of the result
        body = steps[0] * weights[0]
        for i in range(1, len(settings)):
            body = body + steps[i] * weights[i]
        body = body / weights.sum()
        tail = {f"op:kind={k}": float(kind == k) for k in KINDS}
        tail.update({"op:n_models": float(n_models), "op:n_steps": float(len(settings))})
        out = np.empty(len(self._descriptor_columns))
        step_index = 0
        for i, column in enumerate(self._descriptor_columns):
            if column.startswith(SHAPE_PREFIXES):
                out[i] = tail.get(column, 0.0)
            else:
                out[i] = body[step_index]
                step_index += 1
        return out

    def _step(self, setting: OperatorSetting, flipped: bool) -> np.ndarray:
        """One step's family, trait and parameter columns (shape columns excluded)."""
        op = get_operator(setting.method)
        traits = op.traits()
        defaults = {p.name: p.default for p in (*op.method_params, *op.model_params) if not p.required}
        values = []
        for column in self._descriptor_columns:
            if column.startswith(SHAPE_PREFIXES):
                continue
            name = column[3:]
            if name.startswith("family="):
                family = name[len("family=") :]
                known = setting.method in self._families
                values.append(float(family == setting.method or (family == "other" and not known)))
            elif name.startswith("param="):
                values.append(_parameter(setting, name[len("param=") :], defaults, flipped))
            elif name in traits:
                values.append(float(traits[name]))
            else:
                raise SimMergeError(f"the predictor reads a column {column!r} the plan table does not know")
        return np.asarray(values, dtype=np.float64)

    # -- predictions --------------------------------------------------------------------------
    def score(
        self, selector: Any, candidates: Sequence[Candidate]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, predicted score, uncertainty) of the candidates."""
        rows = self.rows(candidates)
        if not len(rows):
            return rows, np.empty(0), np.empty(0)
        mean, uncertainty = selector.predict(rows)
        return rows, np.asarray(mean, dtype=np.float64), np.asarray(uncertainty, dtype=np.float64)

    def explain(self, selector: Any, rows: np.ndarray, k: int = 3) -> list[list[dict[str, Any]]]:
        """Each row's top-k features by absolute contribution to its prediction (SHAP for LightGBM,
        coefficient × standardised value for the linear model)."""
        if not len(rows):
            return []
        if hasattr(selector, "contributions"):
            contrib = selector.contributions(rows)
        elif hasattr(selector, "coef"):
            contrib = selector._standardise(rows) * selector.coef
        else:
            return [[] for _ in rows]
        top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(rows, top, axis=1).tolist()
        shares = np.take_along_axis(contrib, top, axis=1).tolist()
        return [
            [
                {"feature": self.columns[i], "value": v, "contribution": c}
                for i, v, c in zip(features, vals, cons, strict=True)
            ]
            for features, vals, cons in zip(top.tolist(), values, shares, strict=True)
        ]


def _parameter(setting: OperatorSetting, name: str, defaults: dict[str, Any], flipped: bool) -> float:
    if name in setting.params:
        value = _numeric(setting.params[name], name)
    elif name in defaults and defaults[name] is not None:
        value = _numeric(defaults[name], name)
    else:
        value = PARAM_FALLBACKS.get(name, 0.0)
    if flipped and name == "t":
        value = round(1.0 - value, 9)
    return value


def _numeric(value: Any, name: str) -> float:
    if isinstance(value, bool | int | float):
        return float(value)
    raise PlanError(f"operator parameter {name}={value!r} is not a number")
