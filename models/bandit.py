"""A contextual bandit over plan-table rows: one shared linear model of the measured score.

A plan is described by its plan-table row (`models.table`): the context is the row's mean pair
features, the arm is its operator descriptor (family, traits, parameters, plan shape). The reward is
modelled as θ · φ with φ the outer product of `[1, context]` and `[1, arm]` plus the regressor's own
prediction for the row (the prior). θ starts at "trust the prior" (weight 1 on the prediction, ridge
towards it), so without feedback the bandit ranks as the regressor does, and because θ is shared a
family or setting added online starts from what is known about the ones it resembles.

The bandit keeps no state of its own: its posterior is a function of the store's feedback rows, the
current predictor and the pair features, rebuilt or extended here as rows arrive (`Posterior.extend`).
Two servers on one database therefore agree, and no update can be lost: each measurement is one row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from simmerge.errors import SimMergeError

MODES = ("exploit", "explore")
# Widths are in reward units (normalised scores): score noise of about 0.02, a strong pull towards the
# prior (ridge 10); chosen on the synthetic replay (bench/bench_bandit.py).
RIDGE = 10.0
PRIOR_WEIGHT = 1.0
EXPLORE_ALPHA = 0.02
# A measured score is a normalised score: 1 is the expert's own, 0 nothing; beyond this is a mistake.
SCORE_RANGE = (-10.0, 10.0)


def check_score(score: float) -> float:
    """The score as a float, or SimMergeError naming it and the range scores have."""
    value = float(score)
    low, high = SCORE_RANGE
    if not np.isfinite(value) or not low <= value <= high:
        raise SimMergeError(
            f"score {score!r} is outside [{low:g}, {high:g}] (scores are normalised: 1 is the expert's own)"
        )
    return value


@dataclass
class Posterior:
    """Ridge-regression posterior over θ for rows with `context` and `arm` columns of a plan table."""

    context_columns: np.ndarray  # int indices of the row's mean pair features
    arm_columns: np.ndarray  # int indices of the row's operator descriptor
    ridge: float = RIDGE
    prior_weight: float = PRIOR_WEIGHT
    last_id: int = 0  # low-water mark: every feedback id up to it is folded in
    seen: set[int] = field(default_factory=set)  # feedback ids above the mark that are folded in
    pulls: int = 0
    A_inv: np.ndarray = field(init=False)
    b: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        d = self.dim
        self.A_inv = np.eye(d) / self.ridge
        self.b = np.zeros(d)
        self.b[-1] = self.ridge * self.prior_weight

    @classmethod
    def for_columns(cls, columns: list[str]) -> Posterior:
        context = [i for i, c in enumerate(columns) if c.startswith("pair:mean:")]
        arm = [i for i, c in enumerate(columns) if c.startswith("op:")]
        if not context or not arm:
            raise SimMergeError("the plan table has no pair:mean: or op: columns for the bandit")
        return cls(np.asarray(context), np.asarray(arm))

    @property
    def dim(self) -> int:
        return (len(self.context_columns) + 1) * (len(self.arm_columns) + 1) + 1

    @property
    def theta(self) -> np.ndarray:
        return self.A_inv @ self.b

    def features(self, rows: np.ndarray, priors: np.ndarray) -> np.ndarray:
        """φ per row: [1, context] ⊗ [1, arm], then the prior; a missing feature carries no evidence."""
        rows = np.nan_to_num(np.asarray(rows, dtype=np.float64), nan=0.0)
        n = len(rows)
        context = np.concatenate([np.ones((n, 1)), rows[:, self.context_columns]], axis=1)
        arm = np.concatenate([np.ones((n, 1)), rows[:, self.arm_columns]], axis=1)
        crossed = np.einsum("ni,nj->nij", context, arm).reshape(n, -1)
        return np.concatenate([crossed, np.asarray(priors, dtype=np.float64).reshape(n, 1)], axis=1)

    def extend(self, rows: np.ndarray, priors: np.ndarray, scores: np.ndarray) -> None:
        """Fold in measured scores; a non-finite result is refused and the posterior stays as it was."""
        self.A_inv, self.b = self.updated(rows, priors, scores)
        self.pulls += len(rows)

    def updated(
        self, rows: np.ndarray, priors: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(A⁻¹, b) after these scores (Sherman–Morrison, O(d²) each), leaving this posterior unchanged;
        SimMergeError if the state would not be finite (what `extend` and a feedback check share)."""
        phi = self.features(rows, priors)
        A_inv, b = self.A_inv.copy(), self.b.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            self._fold(phi, np.asarray(scores, dtype=np.float64), A_inv, b)
        if not (np.isfinite(A_inv).all() and np.isfinite(b).all()):
            raise SimMergeError("the bandit's update would store a non-finite state; the feedback is refused")
        return A_inv, b

    def mark_seen(self, ids: Iterable[int]) -> None:
        """Record feedback ids as folded in; the low-water mark moves over every id that is contiguous."""
        self.seen.update(ids)
        while self.last_id + 1 in self.seen:
            self.last_id += 1
            self.seen.discard(self.last_id)

    @staticmethod
    def _fold(phi: np.ndarray, scores: np.ndarray, A_inv: np.ndarray, b: np.ndarray) -> None:
        for x, reward in zip(phi, scores, strict=True):
            a_x = A_inv @ x
            A_inv -= np.outer(a_x, a_x) / (1.0 + x @ a_x)
            b += reward * x

    def estimate(
        self, rows: np.ndarray, priors: np.ndarray, *, widths: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(posterior mean, posterior width) per row; widths cost O(d²) a row, so only when asked."""
        phi = self.features(rows, priors)
        mean = phi @ self.theta
        if not widths:
            return mean, np.full(len(phi), np.nan)
        width = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", phi, self.A_inv, phi), 0.0))
        return mean, width

    def value(
        self, rows: np.ndarray, priors: np.ndarray, mode: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranking value, mean, width): the mean to exploit, the upper confidence bound to explore."""
        if mode not in MODES:
            raise SimMergeError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        mean, width = self.estimate(rows, priors, widths=mode == "explore")
        return (mean + EXPLORE_ALPHA * width if mode == "explore" else mean), mean, width
