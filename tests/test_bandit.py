"""The contextual bandit: learns a known linear problem, adopts an arm added online, persists safely."""

from __future__ import annotations

import numpy as np
import pytest

from models.bandit import LinearBandit
from models.descriptors import ARM_FEATURE_NAMES, DEFAULT_SETTINGS, arm_features
from simmerge.errors import ConflictError, NotFoundError, SimMergeError

ARMS = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
# These problems have rewards of order 1 with noise 0.05, wider than normalised merge scores: explore more.
UNIT_SCALE = {"alpha": 0.3, "noise": 0.1, "ridge": 1.0}


def _reward(context: np.ndarray, arm: np.ndarray) -> float:
    """Arm c is best on average; arm a wins when the first context value is large."""
    return float(arm @ np.array([0.3, 0.2, 0.6]) + 0.5 * context[0] * arm[0])


def _run(policy: str | None, rounds: int = 300, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    bandit = LinearBandit(
        context_dim=2, arm_dim=3, policy=policy or "ucb", seed=seed, prior_weight=0.0, **UNIT_SCALE
    )
    for name, vec in ARMS.items():
        bandit.add_arm(name, vec)
    regret = 0.0
    for _ in range(rounds):
        context = rng.normal(size=2)
        rewards = {n: _reward(context, np.asarray(v)) for n, v in ARMS.items()}
        arm = bandit.select(context) if policy else str(rng.choice(list(ARMS)))
        bandit.update(context, arm, rewards[arm] + rng.normal(scale=0.05))
        regret += max(rewards.values()) - rewards[arm]
    return regret


@pytest.mark.parametrize("policy", ["ucb", "thompson"])
def test_regret_falls_below_random_on_a_known_linear_problem(policy):
    random_regret = _run(None)
    learned = _run(policy)
    assert learned < 0.3 * random_regret


def test_arm_added_online_is_chosen_once_its_reward_dominates():
    rng = np.random.default_rng(1)
    bandit = LinearBandit(context_dim=2, arm_dim=4, policy="ucb", prior_weight=0.0, **UNIT_SCALE)
    for name, vec in ARMS.items():
        bandit.add_arm(name, [*vec, 0.0])
    reward_of = {"a": 0.3, "b": 0.2, "c": 0.6, "new": 0.95}
    for _ in range(100):
        context = rng.normal(size=2)
        arm = bandit.select(context)
        bandit.update(context, arm, reward_of[arm] + rng.normal(scale=0.02))
    bandit.add_arm("new", [0.0, 0.0, 0.0, 1.0])
    chosen = []
    for _ in range(150):
        context = rng.normal(size=2)
        arm = bandit.select(context)
        bandit.update(context, arm, reward_of[arm] + rng.normal(scale=0.02))
        chosen.append(arm)
    assert chosen[-50:].count("new") >= 45


def test_prior_makes_the_untrained_bandit_follow_the_regressor():
    bandit = LinearBandit(context_dim=1, arm_dim=3)
    for name, vec in ARMS.items():
        bandit.add_arm(name, vec)
    assert bandit.select([0.0], priors={"a": 0.1, "b": 0.9, "c": 0.2}) == "b"


def test_state_round_trips_without_pickle(tmp_path):
    rng = np.random.default_rng(2)
    bandit = LinearBandit(context_dim=2, arm_dim=3, policy="thompson", seed=4)
    for name, vec in ARMS.items():
        bandit.add_arm(name, vec, {"method": name})
    bandit.set_context_scaler(rng.normal(size=(20, 2)))
    for _ in range(20):
        context = rng.normal(size=2)
        bandit.update(context, bandit.select(context), float(rng.random()))
    bandit.save(tmp_path / "b")
    again = LinearBandit.load(tmp_path / "b")
    np.testing.assert_allclose(again.theta, bandit.theta)
    context = rng.normal(size=2)
    assert again.select(context) == bandit.select(context)  # same posterior and same random stream
    assert again.pulls == bandit.pulls and again.arm_info["a"] == {"method": "a"}
    np.load(tmp_path / "b" / "A.npy", allow_pickle=False)


def test_bad_input_is_named():
    bandit = LinearBandit(context_dim=2, arm_dim=3)
    bandit.add_arm("a", [1.0, 0.0, 0.0])
    with pytest.raises(ConflictError, match="'a'"):
        bandit.add_arm("a", [1.0, 0.0, 0.0])
    with pytest.raises(SimMergeError, match="expects 3"):
        bandit.add_arm("b", [1.0])
    with pytest.raises(NotFoundError, match="'zzz'"):
        bandit.update([0.0, 0.0], "zzz", 1.0)
    with pytest.raises(SimMergeError, match="policy"):
        LinearBandit(context_dim=1, arm_dim=1, policy="greedy")


def test_loading_missing_state_is_named(tmp_path):
    with pytest.raises(NotFoundError, match=r"bandit\.json"):
        LinearBandit.load(tmp_path / "nothing")


def test_operator_settings_make_distinct_arms():
    vectors = [tuple(arm_features(s)) for s in DEFAULT_SETTINGS]
    assert len(set(vectors)) == len(DEFAULT_SETTINGS)
    assert len(vectors[0]) == len(ARM_FEATURE_NAMES)
