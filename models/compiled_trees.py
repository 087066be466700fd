"""Compiled evaluation of a trained LightGBM regression ensemble: predictions and TreeSHAP contributions.

LightGBM's Python API costs ~90 µs a `predict()` call however few the rows, and its TreeSHAP
(`pred_contrib=True`) ~500 µs a row, nearly all of it the algorithm itself. Here the trees are read
once from `Booster.dump_model()` into flat arrays and evaluated by numba loops:

* predict: each split is tested for all rows at once (branch-free, vectorised over rows) and clears,
  in each row's 64-bit mask of the tree's leaves, those the row cannot reach; the row's leaf is the
  mask's lowest set bit (QuickScorer's exit leaf). A few rows are walked down the trees instead.
  Leaf values are added tree by tree, as LightGBM does, so the sums are LightGBM's to the last bit.
* contributions: LightGBM's TreeSHAP (`Tree::TreeSHAP`, `ExtendPath`, `UnwindPath`, `UnwoundPathSum`,
  ported operation by operation) computes a leaf's share from its root-to-leaf path alone, and from
  the row only through which of the path's splits the row takes (the hot children). So each leaf's
  shares are computed once for every such choice (on first use, within a memory budget; the leaves
  of the longest paths are replayed per row instead), and a row costs one table read per leaf. The
  leaves are visited in LightGBM's order (depth first, hot child first), so the sums are LightGBM's
  to the last bit too.

Splits follow LightGBM's numerical decision rule (`Tree::NumericalDecision`) after its dense-row
reader, which passes |x| <= kZeroThreshold on as 0. Models outside that (categorical splits, linear
trees, objectives whose output is transformed, multi-class, random-forest averaging, trees of more
than 64 leaves) give None from `from_booster`, and callers keep LightGBM. The loops are compiled on
first use and cached on disk by numba.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Objectives whose `predict()` is the raw sum of the trees (no output transformation).
RAW_OBJECTIVES = frozenset(
    ("regression", "regression_l2", "l2", "quantile", "regression_l1", "huber", "fair")
)
MAX_LEAVES = 64  # a tree's leaves are the bits of one uint64
WALK_BELOW_ROWS = 4  # fewer rows are walked down the trees (measured: testing every split costs ~15 µs)
# Σ over tabulated leaves of 2^k · d (k edges, d distinct features on the leaf's path): 16 MiB of float64.
MAX_TABLE_ENTRIES = 1 << 21
# LightGBM's kZeroThreshold is declared `const double kZeroThreshold = 1e-35f`: a float32, widened.
ZERO_THRESHOLD = float(np.float32(1e-35))
ALL_LEAVES = np.uint64(2**64 - 1)
NOT_TABULATED = np.uint64(2**64 - 1)  # a leaf whose contributions are replayed per row


@dataclass(frozen=True)
class CompiledEnsemble:
    """A booster's trees as flat arrays: splits (internal nodes, preorder) and leaves (left to right).

    Tree t owns splits `split_start[t]:split_start[t + 1]` and leaves `leaf_start[t]:leaf_start[t + 1]`.
    A row going right at a split cannot reach the leaves of its left subtree: the split's `clear_mask`
    has their bits (positions within the tree) cleared. Leaf j's path is edges `edge_start[j]:edge_start[j + 1]`,
    root first: the slot of the split's feature among the path's d distinct features (`slot_feature[
    slot_start[j]:slot_start[j + 1]]`), and LightGBM's zero fraction (child count / parent count).

    Arrays read in the innermost loops are uint64: numba skips the wraparound of negative indices
    for unsigned ones, which made those loops 1.6 times faster.
    """

    n_features: int
    split_start: np.ndarray  # int64 (n_trees + 1,)
    leaf_start: np.ndarray  # int64 (n_trees + 1,)
    leaf_value: np.ndarray  # float64 per leaf
    expected: np.ndarray  # float64 per tree: LightGBM's `Tree::ExpectedValue`, its share of the bias
    feature: np.ndarray  # uint64 per split
    threshold: np.ndarray  # float64 per split
    nan_right: np.ndarray  # bool per split: a NaN goes right
    zero_right: np.ndarray  # bool per split: 0 (and |x| <= kZeroThreshold) goes right
    zero_default: np.ndarray  # bool per split: 0 takes another side than `0 > threshold` says
    clear_mask: np.ndarray  # uint64 per split
    left_child: np.ndarray  # int64 per split: a split's index, or ~ a leaf's (as LightGBM's)
    right_child: np.ndarray  # int64 per split
    edge_start: np.ndarray  # int64 (n_leaves + 1,)
    edge_slot: np.ndarray  # int64 per edge
    edge_zero: np.ndarray  # float64 per edge
    slot_start: np.ndarray  # uint64 (n_leaves + 1,)
    slot_feature: np.ndarray  # uint64 per slot

    @classmethod
    def from_booster(cls, booster: Any) -> CompiledEnsemble | None:
        """The booster's trees, or None when its model uses anything this evaluator does not implement."""
        return cls.from_dump(booster.dump_model())

    @classmethod
    def from_dump(cls, model: dict[str, Any]) -> CompiledEnsemble | None:
        """As `from_booster`, from `Booster.dump_model()`'s dict."""
        if not _supported(model) or not model["tree_info"]:
            return None
        arrays = _TreeArrays()
        for tree in model["tree_info"]:
            root = tree["tree_structure"]
            if tree.get("num_cat", 0) or not _numerical_only(root) or _leaf_count(root) > MAX_LEAVES:
                return None
            arrays.add(root)
        return cls(n_features=int(model["max_feature_idx"]) + 1, **arrays.arrays())

    def predict(self, X: np.ndarray) -> np.ndarray:
        """`booster.predict(X)`: the sum of the leaf values over the trees, (n,) float64."""
        columns = self._columns(X)
        out = np.zeros(columns.shape[1], dtype=np.float64)
        if columns.shape[1] < WALK_BELOW_ROWS:
            _walk_rows(columns, self._trees, self._splits, (self.left_child, self.right_child), out)
        else:
            _predict_rows(columns, self._trees, self._splits, self.zero_default, self.clear_mask, out)
        return out

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """`booster.predict(X, pred_contrib=True)`: TreeSHAP per feature, then the bias, (n, n_features + 1)."""
        columns = self._columns(X)
        out = np.zeros((columns.shape[1], self.n_features + 1), dtype=np.float64)
        children = (self.left_child, self.right_child)
        _contribution_rows(columns, self._trees, self._splits, children, self._paths, self.shap_tables, out)
        return out

    @cached_property
    def shap_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(table_start, table): `table[table_start[j] + hot * d + slot]` is leaf j's share for its slot's
        feature when the row takes the path's edges set in the bits of `hot` (bit e: edge e). Filled on
        first use: only contributions need them, and they cost ~0.2 s and ~11 MB for 200 trees of 15 leaves."""
        table_start, size = _table_layout(np.diff(self.edge_start), np.diff(self.slot_start).astype(np.int64))
        table = np.zeros(size, dtype=np.float64)
        _fill_tables(self._paths, self.leaf_value, table_start, table)
        return table_start, table

    @property
    def _trees(self) -> tuple[np.ndarray, ...]:
        return self.split_start, self.leaf_start, self.leaf_value, self.expected

    @property
    def _splits(self) -> tuple[np.ndarray, ...]:
        return self.feature, self.threshold, self.nan_right, self.zero_right

    @property
    def _paths(self) -> tuple[np.ndarray, ...]:
        return self.edge_start, self.edge_slot, self.edge_zero, self.slot_start, self.slot_feature

    def _columns(self, X: np.ndarray) -> np.ndarray:
        """X as LightGBM's trees see it, one contiguous column per feature."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"feature matrix has shape {X.shape}; the trees expect {self.n_features} columns"
            )
        return _lightgbm_columns(X)


# -- reading the dump -------------------------------------------------------------------------------
def _supported(model: dict[str, Any]) -> bool:
    """Single-output boosting whose prediction is the raw sum of the trees."""
    objective = str(model.get("objective", "")).split()
    return (
        model.get("num_tree_per_iteration") == 1
        and not model.get("average_output", False)
        and len(objective) > 0
        and objective[0] in RAW_OBJECTIVES
        and "sqrt" not in objective  # regression with reg_sqrt squares the sum
    )


def _is_leaf(node: dict[str, Any]) -> bool:
    return "leaf_value" in node


def _numerical_only(node: dict[str, Any]) -> bool:
    """No categorical split and no linear leaf anywhere in the tree."""
    if _is_leaf(node):
        return not ({"leaf_const", "leaf_coeff", "leaf_features"} & node.keys())
    return (
        node["decision_type"] == "<="
        and node["missing_type"] in ("None", "Zero", "NaN")
        and _numerical_only(node["left_child"])
        and _numerical_only(node["right_child"])
    )


def _leaf_count(node: dict[str, Any]) -> int:
    return 1 if _is_leaf(node) else _leaf_count(node["left_child"]) + _leaf_count(node["right_child"])


def _cover(node: dict[str, Any]) -> float:
    """LightGBM's `data_count`: the training rows through a node, TreeSHAP's weights."""
    return float(node["leaf_count"] if _is_leaf(node) else node["internal_count"])


def _expected_value(root: dict[str, Any]) -> float:
    """LightGBM's `Tree::ExpectedValue`: leaf values weighted by leaf count / root count, in leaf-index order."""
    if _is_leaf(root):  # a single-leaf tree
        return float(root["leaf_value"])
    leaves: list[dict[str, Any]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if _is_leaf(node):
            leaves.append(node)
        else:
            stack += [node["left_child"], node["right_child"]]
    total = float(root["internal_count"])
    expected = 0.0
    for leaf in sorted(leaves, key=lambda leaf: leaf["leaf_index"]):
        expected += (leaf["leaf_count"] / total) * leaf["leaf_value"]
    return expected


def _sends_right(missing_type: str, default_left: bool, threshold: float) -> tuple[bool, bool]:
    """Whether LightGBM's `NumericalDecision` sends (NaN, 0) right at a split; others go right iff x > threshold.

    None: NaN becomes 0, and 0 is compared. Zero: NaN becomes 0, and 0 takes the default side.
    NaN: NaN takes the default side, and 0 is compared.
    """
    zero_compared = threshold < 0.0  # not 0 <= threshold
    if missing_type == "None":
        return zero_compared, zero_compared
    if missing_type == "Zero":
        return not default_left, not default_left
    return not default_left, zero_compared


Edge = tuple[int, int, float]  # (split, feature, zero fraction)


class _TreeArrays:
    """The ensemble's arrays, filled tree by tree."""

    def __init__(self) -> None:
        self.split_start, self.leaf_start, self.edge_start, self.slot_start = [0], [0], [0], [0]
        self.leaf_value: list[float] = []
        self.expected: list[float] = []
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.nan_right: list[bool] = []
        self.zero_right: list[bool] = []
        self.zero_default: list[bool] = []
        self.clear_mask: list[int] = []
        self.left_child: list[int] = []
        self.right_child: list[int] = []
        self.edge_slot: list[int] = []
        self.edge_zero: list[float] = []
        self.slot_feature: list[int] = []

    def add(self, root: dict[str, Any]) -> None:
        self._visit(root, [])
        self.split_start.append(len(self.feature))
        self.leaf_start.append(len(self.leaf_value))
        self.expected.append(_expected_value(root))

    def _visit(self, node: dict[str, Any], path: list[Edge]) -> tuple[int, int]:
        """Append `node`'s subtree, below the edges `path`; return its leaves' range within the tree."""
        if _is_leaf(node):
            self._add_leaf(float(node["leaf_value"]), path)
            position = len(self.leaf_value) - 1 - self.leaf_start[-1]
            return position, position + 1
        split, feature, threshold = len(self.feature), int(node["split_feature"]), float(node["threshold"])
        nan_right, zero_right = _sends_right(node["missing_type"], bool(node["default_left"]), threshold)
        self.feature.append(feature)
        self.threshold.append(threshold)
        self.nan_right.append(nan_right)
        self.zero_right.append(zero_right)
        self.zero_default.append(zero_right != (threshold < 0.0))
        left, right = node["left_child"], node["right_child"]
        self.left_child.append(self._next_index(left))
        self.right_child.append(0)
        self.clear_mask.append(0)
        low, middle = self._visit(left, [*path, (split, feature, _cover(left) / _cover(node))])
        self.right_child[split] = self._next_index(right)
        _, high = self._visit(right, [*path, (split, feature, _cover(right) / _cover(node))])
        self.clear_mask[split] = (2**64 - 1) ^ (((1 << (middle - low)) - 1) << low)
        return low, high

    def _next_index(self, node: dict[str, Any]) -> int:
        """The index `node` is about to get: its split's, or ~ its leaf's."""
        return ~len(self.leaf_value) if _is_leaf(node) else len(self.feature)

    def _add_leaf(self, value: float, path: list[Edge]) -> None:
        slots: dict[int, int] = {}  # feature -> slot, in order of first split
        for _, feature, zero_fraction in path:
            self.edge_slot.append(slots.setdefault(feature, len(slots)))
            self.edge_zero.append(zero_fraction)
        self.leaf_value.append(value)
        self.slot_feature += list(slots)
        self.edge_start.append(len(self.edge_slot))
        self.slot_start.append(len(self.slot_feature))

    def arrays(self) -> dict[str, np.ndarray]:
        dtypes = {
            np.int64: ("split_start", "leaf_start", "left_child", "right_child", "edge_start", "edge_slot"),
            np.uint64: ("feature", "clear_mask", "slot_start", "slot_feature"),
            np.bool_: ("nan_right", "zero_right", "zero_default"),
            np.float64: ("leaf_value", "expected", "threshold", "edge_zero"),
        }
        return {
            name: np.asarray(getattr(self, name), dtype=dtype)
            for dtype, names in dtypes.items()
            for name in names
        }


def _table_layout(edges: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, int]:
    """Where each leaf's table (2^edges · slots entries) starts, NOT_TABULATED for a leaf replayed per
    row, and the tables' total size. Leaves are tabulated up to the longest path whose tables all fit
    MAX_TABLE_ENTRIES, so the leaves replayed are the rare ones of the longest paths."""
    sizes = np.ldexp(1.0, edges) * slots  # floats: 2^63 does not fit an int64
    limit = 0
    while limit < edges.max() and sizes[edges <= limit + 1].sum() <= MAX_TABLE_ENTRIES:
        limit += 1
    tabulated = edges <= limit
    tabulated_sizes = np.where(tabulated, sizes, 0.0).astype(np.uint64)
    ends = np.cumsum(tabulated_sizes)
    return np.where(tabulated, ends - tabulated_sizes, NOT_TABULATED), int(ends[-1])


# -- compiled loops ---------------------------------------------------------------------------------
@intrinsic
def _trailing_zeros(typingctx, mask):  # pragma: no cover - compiled
    """Index of the lowest set bit of a uint64 (LLVM's cttz)."""
    if mask != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=True)
def _lightgbm_columns(X):  # pragma: no cover - compiled
    """X transposed, |x| <= kZeroThreshold as 0: LightGBM's dense-row reader passes on only larger
    values (and NaN), so the trees see smaller ones as 0."""
    columns = np.empty((X.shape[1], X.shape[0]))
    for r in range(X.shape[0]):
        for f in range(X.shape[1]):
            x = X[r, f]
            columns[f, r] = 0.0 if abs(x) <= ZERO_THRESHOLD else x
    return columns


@njit(nogil=True, cache=True)
def _goes_right(x, threshold, nan_right, zero_right) -> bool:  # pragma: no cover - compiled
    """LightGBM's `NumericalDecision` for a value read as above (see `_sends_right`)."""
    if np.isnan(x):
        return nan_right
    if x == 0.0:
        return zero_right
    return x > threshold


@njit(nogil=True, cache=True)
def _walk_rows(columns, trees, splits, children, out) -> None:  # pragma: no cover - compiled
    """As `_predict_rows`, walking each row down each tree: faster for a few rows."""
    split_start, leaf_start, leaf_value, _ = trees
    feature, threshold, nan_right, zero_right = splits
    left_child, right_child = children
    for r in range(columns.shape[1]):
        for t in range(len(leaf_start) - 1):
            node = split_start[t] if split_start[t + 1] > split_start[t] else ~leaf_start[t]
            while node >= 0:
                right = _goes_right(
                    columns[feature[node], r], threshold[node], nan_right[node], zero_right[node]
                )
                node = right_child[node] if right else left_child[node]
            out[r] += leaf_value[~node]


@njit(nogil=True, cache=True)
def _predict_rows(columns, trees, splits, zero_default, clear_mask, out) -> None:  # pragma: no cover
    """out[r] += the value of the leaf row r reaches, tree by tree in order (LightGBM's `GBDT::PredictRaw`).

    The loops over rows are branch-free, so vectorised. Unless 0 takes a default side (some splits
    of missing type Zero), `_goes_right` is one comparison: `x > threshold` is false for NaN and
    `not x <= threshold` true, so the side NaN takes picks the form.
    """
    split_start, leaf_start, leaf_value, _ = trees
    feature, threshold, nan_right, zero_right = splits
    n_rows = columns.shape[1]
    masks = np.empty(n_rows, dtype=np.uint64)
    for t in range(len(leaf_start) - 1):
        masks[:] = ALL_LEAVES
        for split in range(split_start[t], split_start[t + 1]):
            values = columns[feature[split]]
            limit, nan_goes_right, clear = threshold[split], nan_right[split], clear_mask[split]
            if zero_default[split]:
                zero_goes_right = zero_right[split]
                for r in range(n_rows):
                    right = _goes_right(values[r], limit, nan_goes_right, zero_goes_right)
                    masks[r] &= clear if right else ALL_LEAVES
            elif nan_goes_right:
                for r in range(n_rows):
                    masks[r] &= ALL_LEAVES if values[r] <= limit else clear
            else:
                for r in range(n_rows):
                    masks[r] &= clear if values[r] > limit else ALL_LEAVES
        first = np.uint64(leaf_start[t])
        for r in range(n_rows):
            out[r] += leaf_value[first + _trailing_zeros(masks[r])]


@njit(nogil=True, cache=True)
def _extend_path(path, depth, zero_fraction, one_fraction, slot) -> None:  # pragma: no cover - compiled
    """LightGBM's `Tree::ExtendPath` (`depth` is its unique_depth)."""
    slots, zeros, ones, weights = path
    slots[depth] = slot
    zeros[depth] = zero_fraction
    ones[depth] = one_fraction
    weights[depth] = 1.0 if depth == 0 else 0.0
    for i in range(depth - 1, -1, -1):
        weights[i + 1] += one_fraction * weights[i] * (i + 1) / float(depth + 1)
        weights[i] = zero_fraction * weights[i] * (depth - i) / float(depth + 1)


@njit(nogil=True, cache=True)
def _unwind_path(path, depth, path_index) -> None:  # pragma: no cover - compiled
    """LightGBM's `Tree::UnwindPath`: take element `path_index` out (its feature is split on again)."""
    slots, zeros, ones, weights = path
    one_fraction = ones[path_index]
    zero_fraction = zeros[path_index]
    next_one_portion = weights[depth]
    for i in range(depth - 1, -1, -1):
        if one_fraction != 0:
            tmp = weights[i]
            weights[i] = next_one_portion * (depth + 1) / ((i + 1) * one_fraction)
            next_one_portion = tmp - weights[i] * zero_fraction * (depth - i) / float(depth + 1)
        else:
            weights[i] = (weights[i] * (depth + 1)) / (zero_fraction * (depth - i))
    for i in range(path_index, depth):
        slots[i] = slots[i + 1]
        zeros[i] = zeros[i + 1]
        ones[i] = ones[i + 1]


@njit(nogil=True, cache=True)
def _unwound_path_sum(path, depth, path_index) -> float:  # pragma: no cover - compiled
    """LightGBM's `Tree::UnwoundPathSum`: the path's total weight were element `path_index` taken out."""
    _, zeros, ones, weights = path
    one_fraction = ones[path_index]
    zero_fraction = zeros[path_index]
    next_one_portion = weights[depth]
    total = 0.0
    for i in range(depth - 1, -1, -1):
        if one_fraction != 0:
            tmp = next_one_portion * (depth + 1) / ((i + 1) * one_fraction)
            total += tmp
            next_one_portion = weights[i] - tmp * zero_fraction * ((depth - i) / float(depth + 1))
        else:
            total += (weights[i] / zero_fraction) / ((depth - i) / float(depth + 1))
    return total


@njit(nogil=True, cache=True)
def _new_path(edge_start):  # pragma: no cover - compiled
    """Room for the TreeSHAP path of the longest leaf path: (slot, zero fraction, one fraction, weight).
    (Plain loops: numba takes seconds to compile np.diff and np.full.)"""
    length = 1
    for leaf in range(len(edge_start) - 1):
        length = max(length, edge_start[leaf + 1] - edge_start[leaf] + 1)
    slots = np.empty(length, np.int64)
    slots[:] = -1
    return slots, np.zeros(length), np.zeros(length), np.zeros(length)


@njit(nogil=True, cache=True)
def _leaf_contributions(edge_slot, edge_zero, hot, leaf_value, path, out) -> None:  # pragma: no cover
    """LightGBM's `Tree::TreeSHAP` down one path, root first, for a row that takes the path's edge e
    iff bit e of `hot` is set (the hot child gets the incoming one fraction, the cold one 0): out[s] =
    the leaf's share for slot s's feature (the term LightGBM adds to it at this leaf)."""
    slots, zeros, ones, _ = path
    depth = 0
    _extend_path(path, 0, 1.0, 1.0, -1)
    for e in range(len(edge_slot)):
        incoming_zero_fraction = 1.0
        incoming_one_fraction = 1.0
        path_index = 0  # a feature split on further up is taken out of the path and redone here
        while path_index <= depth and slots[path_index] != edge_slot[e]:
            path_index += 1
        if path_index != depth + 1:
            incoming_zero_fraction = zeros[path_index]
            incoming_one_fraction = ones[path_index]
            _unwind_path(path, depth, path_index)
            depth -= 1
        one_fraction = incoming_one_fraction if (hot >> np.uint64(e)) & np.uint64(1) else 0.0
        depth += 1
        _extend_path(path, depth, edge_zero[e] * incoming_zero_fraction, one_fraction, edge_slot[e])
    for i in range(1, depth + 1):
        w = _unwound_path_sum(path, depth, i)
        out[slots[i]] = w * (ones[i] - zeros[i]) * leaf_value


@njit(nogil=True, cache=True)
def _fill_tables(paths, leaf_value, table_start, table) -> None:  # pragma: no cover - compiled
    """Every tabulated leaf's shares for every set of hot edges (see `CompiledEnsemble.shap_tables`)."""
    edge_start, edge_slot, edge_zero, slot_start, _ = paths
    path = _new_path(edge_start)
    for leaf in range(len(leaf_value)):
        if table_start[leaf] == NOT_TABULATED:
            continue
        e0, e1 = edge_start[leaf], edge_start[leaf + 1]
        width = slot_start[leaf + 1] - slot_start[leaf]
        for hot in range(np.uint64(1) << np.uint64(e1 - e0)):
            start = table_start[leaf] + hot * width
            values = table[start : start + width]
            _leaf_contributions(edge_slot[e0:e1], edge_zero[e0:e1], hot, leaf_value[leaf], path, values)


@njit(nogil=True, cache=True)
def _sides(columns, r, first, end, splits):  # pragma: no cover - compiled
    """Bit i: row r goes right at split first + i."""
    feature, threshold, nan_right, zero_right = splits
    rights = np.uint64(0)
    for split in range(first, end):
        right = _goes_right(columns[feature[split], r], threshold[split], nan_right[split], zero_right[split])
        rights |= np.uint64(right) << np.uint64(split - first)
    return rights


@njit(nogil=True, cache=True)
def _contribution_rows(columns, trees, splits, children, paths, tables, out) -> None:  # pragma: no cover
    """LightGBM's `GBDT::PredictContrib`: per tree in order, its expected value into the bias column (the
    last), then its leaves' shares in `Tree::TreeSHAP`'s order: depth first, the hot child first.

    The per-leaf work stays inline: a helper given the array tuples per leaf made it 5 times slower
    (numba counts references to every array it unpacks)."""
    split_start, leaf_start, leaf_value, expected = trees
    left_child, right_child = children
    edge_start, edge_slot, edge_zero, slot_start, slot_feature = paths
    table_start, table = tables
    path = _new_path(edge_start)
    replayed = np.empty(len(path[0]))
    # nodes to visit (a cold sibling per ancestor, and the next), each with the bit of the edges below
    # it and the bits of the hot edges above it
    size = len(path[0]) + 1
    nodes, edge_bits, hots = np.empty(size, np.int64), np.empty(size, np.uint64), np.empty(size, np.uint64)
    bias = out.shape[1] - 1
    for t in range(len(leaf_start) - 1):  # trees outside: a tree's tables are read for all rows at once
        for r in range(columns.shape[1]):
            phi = out[r]
            phi[bias] += expected[t]
            first, end = split_start[t], split_start[t + 1]
            if end == first:
                continue  # a single leaf: LightGBM runs no TreeSHAP
            rights = _sides(columns, r, first, end, splits)
            nodes[0], edge_bits[0], hots[0] = first, 1, 0
            top = 1
            while top > 0:
                top -= 1
                node, bit, hot = nodes[top], edge_bits[top], hots[top]
                if node < 0:  # a leaf: its shares for the edges taken, from its table or replayed
                    leaf = ~node
                    s0, s1 = slot_start[leaf], slot_start[leaf + 1]
                    if table_start[leaf] == NOT_TABULATED:
                        e0, e1 = edge_start[leaf], edge_start[leaf + 1]
                        _leaf_contributions(
                            edge_slot[e0:e1], edge_zero[e0:e1], hot, leaf_value[leaf], path, replayed
                        )
                        for s in range(s0, s1):
                            phi[slot_feature[s]] += replayed[s - s0]
                    else:
                        start = table_start[leaf] + hot * (s1 - s0)
                        for s in range(s0, s1):
                            phi[slot_feature[s]] += table[start + (s - s0)]
                    continue
                goes_right = (rights >> np.uint64(node - first)) & np.uint64(1)
                hot_child = right_child[node] if goes_right else left_child[node]
                cold_child = left_child[node] if goes_right else right_child[node]
                nodes[top], edge_bits[top], hots[top] = cold_child, bit << np.uint64(1), hot
                nodes[top + 1], edge_bits[top + 1], hots[top + 1] = hot_child, bit << np.uint64(1), hot | bit
                top += 2
