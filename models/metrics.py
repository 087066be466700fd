"""Selection measures (docs/design.md §4), computed per pool of candidate plans with measured scores.

A selector picks, in each pool, the plan it predicts best (ties broken by the earlier row). Gap closed
takes its means over pools before dividing, because a per-pool ratio explodes where oracle and best
fixed nearly tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr

from simmerge.errors import SimMergeError

TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class SelectionReport:
    n_pools: int
    n_plans: int
    mean_selected: float
    mean_oracle: float
    mean_best_fixed: float
    mean_regret: float
    gap_closed: float
    top1_accuracy: float
    spearman_pooled: float
    pearson_pooled: float
    spearman_per_pool: float
    pearson_per_pool: float
    ndcg_at_3: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def pool_indices(pools: Sequence[str] | np.ndarray) -> list[np.ndarray]:
    """Row indices of each pool, pools in order of first appearance."""
    pools = np.asarray(pools)
    _, first, inverse = np.unique(pools, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.flatnonzero(inverse == g) for g in order]


def selected_rows(groups: list[np.ndarray], predicted: np.ndarray) -> np.ndarray:
    """The row each pool's selector picks: highest prediction, earliest row on a tie."""
    return np.asarray([g[int(np.argmax(predicted[g]))] for g in groups])


def ndcg_at_k(measured: np.ndarray, predicted: np.ndarray, k: int = 3) -> float:
    """NDCG@k with gains = measured score − the pool's lowest score (gains must not be negative).

    A pool whose plans all score the same has nothing to rank and counts as 1.
    """
    gains = measured - measured.min()
    order = np.argsort(-predicted, kind="stable")[:k]
    ideal = np.sort(gains)[::-1][:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal_dcg = float(np.sum(ideal * discounts[: len(ideal)]))
    if ideal_dcg <= TIE_TOLERANCE:
        return 1.0
    return float(np.sum(gains[order] * discounts[: len(order)])) / ideal_dcg


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) <= TIE_TOLERANCE or np.ptp(b) <= TIE_TOLERANCE:
        return float("nan")
    return float(fn(a, b)[0])


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_selection(
    pools: Sequence[str] | np.ndarray,
    measured: np.ndarray,
    predicted: np.ndarray,
    best_fixed_predicted: np.ndarray,
    k: int = 3,
) -> SelectionReport:
    """All §4 measures for one selector; `best_fixed_predicted` ranks plans as the best fixed operator does."""
    measured = np.asarray(measured, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    best_fixed_predicted = np.asarray(best_fixed_predicted, dtype=np.float64)
    if not (len(measured) == len(predicted) == len(best_fixed_predicted) == len(pools)):
        raise SimMergeError(
            f"lengths differ: {len(pools)} pools, {len(measured)} measured, {len(predicted)} predicted, "
            f"{len(best_fixed_predicted)} best-fixed"
        )
    if len(measured) == 0:
        raise SimMergeError("no plans to evaluate")
    groups = pool_indices(pools)
    chosen = measured[selected_rows(groups, predicted)]
    fixed = measured[selected_rows(groups, best_fixed_predicted)]
    oracle = np.asarray([measured[g].max() for g in groups])
    gap = oracle.mean() - fixed.mean()
    return SelectionReport(
        n_pools=len(groups),
        n_plans=len(measured),
        mean_selected=float(chosen.mean()),
        mean_oracle=float(oracle.mean()),
        mean_best_fixed=float(fixed.mean()),
        mean_regret=float((oracle - chosen).mean()),
        gap_closed=float((chosen.mean() - fixed.mean()) / gap) if gap > TIE_TOLERANCE else float("nan"),
        top1_accuracy=float(np.mean(oracle - chosen <= TIE_TOLERANCE)),
        spearman_pooled=_correlation(spearmanr, measured, predicted),
        pearson_pooled=_correlation(pearsonr, measured, predicted),
        spearman_per_pool=_nanmean([_correlation(spearmanr, measured[g], predicted[g]) for g in groups]),
        pearson_per_pool=_nanmean([_correlation(pearsonr, measured[g], predicted[g]) for g in groups]),
        ndcg_at_3=float(np.mean([ndcg_at_k(measured[g], predicted[g], k) for g in groups])),
    )
