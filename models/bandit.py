"""Contextual bandit over merge operators: linear UCB and linear Thompson sampling, one shared model.

An arm is described by features (operator family, behavioural flags, parameters), a context by the
pair's features, and the reward is modelled as θ · φ(context, arm, prior) with φ the outer product of
`[1, context]` and `[1, arm]` plus the regressor's prediction for that plan (`prior`). Because θ is
shared, an arm added later starts from what is known about arms that resemble it, and because θ starts
at "trust the prior" (weight 1 on the prediction, ridge towards it), the bandit begins as the static
regressor and only departs from it where rewards say so. A new task needs no registration: its
checkpoints arrive as new contexts.

State persists as `bandit.json` plus `A.npy` / `b.npy` (loaded with `allow_pickle=False`).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simmerge.errors import ConflictError, NotFoundError, SimMergeError

POLICIES = ("ucb", "thompson")
STATE_FILE = "bandit.json"
LOCK_FILE = ".lock"


@contextmanager
def locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold a bandit directory's lock: writers (load, update, save) exclusively, readers shared.

    Its state is three files; several service worker processes read and update it, so without the
    lock a reader could pair one update's `A` with another's `b`, and two updates could lose one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class LinearBandit:
    context_dim: int
    arm_dim: int
    policy: str = "ucb"
    # Widths are in reward units (normalised scores): the defaults assume score noise of about 0.02 and
    # a strong pull towards the prior (ridge 10); chosen on the synthetic replay (bench/bench_bandit.py).
    alpha: float = 0.02  # UCB width multiplier
    noise: float = 0.02  # Thompson posterior scale (reward noise)
    ridge: float = 10.0
    prior_weight: float = 1.0  # θ's starting weight on the regressor's prediction
    seed: int = 0
    arms: dict[str, np.ndarray] = field(default_factory=dict)
    arm_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    pulls: dict[str, int] = field(default_factory=dict)
    context_center: np.ndarray | None = None
    context_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise SimMergeError(f"bandit policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        d = self.dim
        self.A = np.eye(d) * self.ridge
        self.b = np.zeros(d)
        self.b[-1] = self.ridge * self.prior_weight
        self._A_inv = np.eye(d) / self.ridge
        self._rng = np.random.default_rng(self.seed)

    @property
    def dim(self) -> int:
        return (self.context_dim + 1) * (self.arm_dim + 1) + 1

    # -- arms ---------------------------------------------------------------------------------
    def add_arm(self, name: str, features: Sequence[float], info: Mapping[str, Any] | None = None) -> None:
        """Offer a new choice at any time; it shares θ, so it is not a cold start."""
        if name in self.arms:
            raise ConflictError(f"bandit arm {name!r} already exists")
        vector = np.asarray(features, dtype=np.float64)
        if vector.shape != (self.arm_dim,):
            raise SimMergeError(f"arm {name!r} has {vector.size} features, the bandit expects {self.arm_dim}")
        self.arms[name] = vector
        self.arm_info[name] = dict(info or {})
        self.pulls[name] = 0

    def set_context_scaler(self, contexts: np.ndarray) -> None:
        """Standardise contexts with these statistics from now on (typically the training catalog's)."""
        contexts = np.asarray(contexts, dtype=np.float64)
        self.context_center = np.nan_to_num(np.nanmean(contexts, axis=0))
        std = np.nan_to_num(np.nanstd(contexts, axis=0))
        self.context_scale = np.where(std > 1e-12, std, 1.0)

    # -- model --------------------------------------------------------------------------------
    def features(self, context: Sequence[float], arm: str, prior: float = 0.0) -> np.ndarray:
        if arm not in self.arms:
            raise NotFoundError(f"bandit arm {arm!r} does not exist")
        c = np.asarray(context, dtype=np.float64)
        if c.shape != (self.context_dim,):
            raise SimMergeError(f"context has {c.size} values, the bandit expects {self.context_dim}")
        if self.context_center is not None and self.context_scale is not None:
            c = (c - self.context_center) / self.context_scale
        c = np.nan_to_num(c, nan=0.0)  # a feature the pair cannot support carries no evidence
        crossed = np.outer(np.concatenate([[1.0], c]), np.concatenate([[1.0], self.arms[arm]])).ravel()
        return np.concatenate([crossed, [float(prior)]])

    @property
    def theta(self) -> np.ndarray:
        return self._A_inv @ self.b

    def scores(
        self,
        context: Sequence[float],
        priors: Mapping[str, float] | None = None,
        arms: Sequence[str] | None = None,
    ) -> dict[str, tuple[float, float]]:
        """(expected reward, posterior standard deviation / noise) per candidate arm."""
        names = list(arms) if arms is not None else list(self.arms)
        phi = np.stack([self.features(context, a, (priors or {}).get(a, 0.0)) for a in names])
        mean = phi @ self.theta
        width = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", phi, self._A_inv, phi), 0.0))
        return {a: (float(m), float(w)) for a, m, w in zip(names, mean, width, strict=True)}

    def select(
        self,
        context: Sequence[float],
        priors: Mapping[str, float] | None = None,
        arms: Sequence[str] | None = None,
    ) -> str:
        """The arm to try: highest upper confidence bound, or highest reward under one posterior draw."""
        names = list(arms) if arms is not None else list(self.arms)
        if not names:
            raise SimMergeError("the bandit has no arms to choose from")
        phi = np.stack([self.features(context, a, (priors or {}).get(a, 0.0)) for a in names])
        mean = phi @ self.theta
        if self.policy == "ucb":
            width = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", phi, self._A_inv, phi), 0.0))
            value = mean + self.alpha * width
        else:
            # Sample the arms' rewards jointly from the posterior projected onto them (n_arms², not d²).
            cov = self.noise**2 * (phi @ self._A_inv @ phi.T)
            value = self._rng.multivariate_normal(mean, cov + 1e-12 * np.eye(len(names)), method="cholesky")
        return names[int(np.argmax(value))]

    def update(self, context: Sequence[float], arm: str, reward: float, prior: float = 0.0) -> None:
        """Learn one observed reward (Sherman–Morrison keeps A⁻¹ current in O(d²))."""
        if not np.isfinite(reward):
            raise SimMergeError(f"reward {reward!r} is not a finite number")
        phi = self.features(context, arm, prior)
        self.A += np.outer(phi, phi)
        self.b += reward * phi
        a_phi = self._A_inv @ phi
        self._A_inv -= np.outer(a_phi, a_phi) / (1.0 + phi @ a_phi)
        self.pulls[arm] += 1

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "A.npy", self.A, allow_pickle=False)
        np.save(directory / "b.npy", self.b, allow_pickle=False)
        state = {
            "context_dim": self.context_dim,
            "arm_dim": self.arm_dim,
            "policy": self.policy,
            "alpha": self.alpha,
            "noise": self.noise,
            "ridge": self.ridge,
            "prior_weight": self.prior_weight,
            "seed": self.seed,
            "arms": {name: vec.tolist() for name, vec in self.arms.items()},
            "arm_info": self.arm_info,
            "pulls": self.pulls,
            "context_center": None if self.context_center is None else self.context_center.tolist(),
            "context_scale": None if self.context_scale is None else self.context_scale.tolist(),
            "rng": self._rng.bit_generator.state,
        }
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        tmp.replace(directory / STATE_FILE)
        return directory

    @classmethod
    def load(cls, directory: Path) -> LinearBandit:
        directory = Path(directory)
        path = directory / STATE_FILE
        if not path.exists():
            raise NotFoundError(f"no bandit state in {directory} ({STATE_FILE} missing)")
        state = json.loads(path.read_text())
        bandit = cls(
            context_dim=state["context_dim"],
            arm_dim=state["arm_dim"],
            policy=state["policy"],
            alpha=state["alpha"],
            noise=state["noise"],
            ridge=state["ridge"],
            prior_weight=state["prior_weight"],
            seed=state["seed"],
        )
        for name, vec in state["arms"].items():
            bandit.add_arm(name, vec, state["arm_info"].get(name))
        bandit.pulls = {k: int(v) for k, v in state["pulls"].items()}
        if state["context_center"] is not None:
            bandit.context_center = np.asarray(state["context_center"])
            bandit.context_scale = np.asarray(state["context_scale"])
        bandit.A = np.load(directory / "A.npy", allow_pickle=False)
        bandit.b = np.load(directory / "b.npy", allow_pickle=False)
        if bandit.A.shape != (bandit.dim, bandit.dim) or bandit.b.shape != (bandit.dim,):
            raise SimMergeError(f"bandit state in {directory} has matrices of the wrong shape")
        bandit._A_inv = np.linalg.inv(bandit.A)
        bandit._rng.bit_generator.state = state["rng"]
        return bandit
