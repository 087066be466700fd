"""The bandit's posterior over plan-table rows: starts as the regressor, learns, refuses bad state."""

from __future__ import annotations

import numpy as np
import pytest

from models.bandit import Posterior, check_score
from simmerge.errors import SimMergeError

COLUMNS = [
    "op:family=a",
    "op:family=b",
    "op:param=density",
    "pair:mean:cos",
    "pair:mean:dist",
    "pair:min:cos",
]


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, len(COLUMNS)))
    family = rng.integers(0, 2, size=n)
    rows[:, 0], rows[:, 1] = family == 0, family == 1
    return rows


def test_without_feedback_the_posterior_mean_is_the_prior():
    posterior = Posterior.for_columns(COLUMNS)
    rows, prior = _rows(20, 0), np.linspace(0.2, 0.9, 20)
    mean, width = posterior.estimate(rows, prior, widths=True)
    assert np.allclose(mean, prior) and (width > 0).all()


def test_rewards_that_favour_a_family_move_its_estimate_above_the_prior():
    posterior = Posterior.for_columns(COLUMNS)
    rows = _rows(200, 1)
    prior = np.full(len(rows), 0.5)
    rewards = 0.5 + 0.2 * rows[:, 1] - 0.2 * rows[:, 0]  # family b is better than the regressor thinks
    posterior.extend(rows, prior, rewards)
    posterior.mark_seen([3, 1, 2, 5])
    test = _rows(50, 2)
    mean, _ = posterior.estimate(test, np.full(50, 0.5), widths=False)
    assert mean[test[:, 1] == 1].mean() > 0.6 > 0.4 > mean[test[:, 0] == 1].mean()
    assert posterior.pulls == 200 and posterior.last_id == 3 and posterior.seen == {5}  # 4 not yet seen
    value, _, width = posterior.value(test, np.full(50, 0.5), "explore")
    assert (value > mean).all() and np.isfinite(width).all()


def test_a_non_finite_update_is_refused_and_leaves_the_state_as_it_was():
    posterior = Posterior.for_columns(COLUMNS)
    rows = _rows(3, 3)
    before = posterior.theta.copy()
    with pytest.raises(SimMergeError, match="non-finite"):
        posterior.extend(rows, np.zeros(3), np.asarray([1e308, 1e308, 1e308]))
    assert np.array_equal(posterior.theta, before) and posterior.pulls == 0


@pytest.mark.parametrize("score", [float("nan"), float("inf"), 1e308, -11.0])
def test_scores_outside_the_range_are_named(score):
    with pytest.raises(SimMergeError, match=r"outside \[-10, 10\]"):
        check_score(score)
    assert check_score(0.93) == 0.93


def test_unknown_mode_and_columns_are_named():
    posterior = Posterior.for_columns(COLUMNS)
    with pytest.raises(SimMergeError, match="mode 'greedy'"):
        posterior.value(_rows(2, 0), np.zeros(2), "greedy")
    with pytest.raises(SimMergeError, match="pair:mean"):
        Posterior.for_columns(["op:family=a"])
