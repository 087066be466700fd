"""Baselines the predictor must beat, behind the same `fit` / `predict -> (mean, uncertainty)` interface.

- best fixed operator: each row gets its operator setting's mean training score, so within a pool the
  setting with the best training average wins wherever it is available (docs/design.md §4);
- random: seeded uniform scores (what choosing blindly gives);
- L1 linear: Lasso on standardised features (the Mergeability-Bench style model), stored as JSON.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.predictor import META_FILE, _write_json, read_meta
from simmerge.errors import SimMergeError

# Descriptor columns that say how many models / which plan shape, not which operator: ignored by the key
# so that "the best fixed operator" of 2-way merges carries over to k-way pools.
_SHAPE_PREFIXES = ("op:kind=", "op:n_models", "op:n_steps")


def _setting_columns(feature_names: Sequence[str]) -> list[int]:
    cols = [
        i for i, n in enumerate(feature_names) if n.startswith("op:") and not n.startswith(_SHAPE_PREFIXES)
    ]
    if not cols:
        raise SimMergeError("no operator-descriptor (op:) columns in the feature names")
    return cols


def _keys(X: np.ndarray, cols: list[int]) -> list[str]:
    return [",".join(f"{v:.6g}" for v in row) for row in np.asarray(X)[:, cols]]


@dataclass
class BestFixedSelector:
    name: str = "best_fixed"
    columns: list[int] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    fallback: float = 0.0

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: Sequence[str]) -> BestFixedSelector:
        self.columns = _setting_columns(feature_names)
        keys = np.asarray(_keys(X, self.columns))
        self.means = {k: float(np.mean(y[keys == k])) for k in sorted(set(keys))}
        self.stds = {k: float(np.std(y[keys == k])) for k in sorted(set(keys))}
        # An unseen setting ranks below every known one: the baseline only knows what it has seen.
        self.fallback = float(min(self.means.values()) - 1.0)
        return self

    def best_key(self) -> str:
        return max(self.means, key=lambda k: self.means[k])

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = _keys(X, self.columns)
        mean = np.asarray([self.means.get(k, self.fallback) for k in keys])
        return mean, np.asarray([self.stds.get(k, 0.0) for k in keys])

    def save(self, directory: Path, meta: dict[str, Any] | None = None) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {**(meta or {}), "selector": self.name, "columns": self.columns, "means": self.means}
        _write_json(Path(directory) / META_FILE, {**data, "stds": self.stds, "fallback": self.fallback})
        return Path(directory)

    @classmethod
    def load(cls, directory: Path) -> BestFixedSelector:
        meta = read_meta(directory)
        return cls(columns=meta["columns"], means=meta["means"], stds=meta["stds"], fallback=meta["fallback"])


@dataclass
class RandomSelector:
    seed: int = 0
    name: str = "random"

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: Sequence[str]) -> RandomSelector:
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return rng.random(len(X)), np.zeros(len(X))


@dataclass
class LassoSelector:
    """L1 linear model on standardised features; coefficients persist as JSON."""

    seed: int = 0
    name: str = "lasso"
    center: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))
    intercept: float = 0.0
    alpha: float = 0.0
    residual_std: float = 0.0
    feature_names: list[str] = field(default_factory=list)

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: Sequence[str]) -> LassoSelector:
        from sklearn.linear_model import LassoCV
        from sklearn.model_selection import KFold

        X = np.asarray(X, dtype=np.float64)
        self.feature_names = list(feature_names)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: centre 0, scale 1
            self.center = np.nan_to_num(np.nanmean(X, axis=0))
            std = np.nan_to_num(np.nanstd(X, axis=0))
        self.scale = np.where(std > 1e-12, std, 1.0)
        Z = self._standardise(X)
        folds = KFold(n_splits=max(2, min(5, len(y) // 2)), shuffle=True, random_state=self.seed)
        model = LassoCV(cv=folds, random_state=self.seed, max_iter=20000, alphas=50).fit(Z, y)
        self.coef, self.intercept, self.alpha = model.coef_, float(model.intercept_), float(model.alpha_)
        self.residual_std = float(np.std(y - model.predict(Z)))
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != len(self.coef):
            raise SimMergeError(
                f"feature matrix has {X.shape[1]} columns, the linear model expects {len(self.coef)}"
            )
        mean = self._standardise(X) @ self.coef + self.intercept
        return mean, np.full(len(X), self.residual_std)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        """z-scores; a missing feature (NaN: e.g. no structural features across bases) counts as average."""
        return np.nan_to_num((X - self.center) / self.scale, nan=0.0)

    def top_coefficients(self, k: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-np.abs(self.coef))[:k]
        return [(self.feature_names[i], float(self.coef[i])) for i in order if self.coef[i] != 0]

    def save(self, directory: Path, meta: dict[str, Any] | None = None) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {
            **(meta or {}),
            "selector": self.name,
            "seed": self.seed,
            "feature_names": self.feature_names,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "alpha": self.alpha,
            "residual_std": self.residual_std,
        }
        _write_json(Path(directory) / META_FILE, data)
        return Path(directory)

    @classmethod
    def load(cls, directory: Path) -> LassoSelector:
        meta = read_meta(directory)
        return cls(
            seed=meta["seed"],
            center=np.asarray(meta["center"]),
            scale=np.asarray(meta["scale"]),
            coef=np.asarray(meta["coef"]),
            intercept=float(meta["intercept"]),
            alpha=float(meta["alpha"]),
            residual_std=float(meta["residual_std"]),
            feature_names=list(meta["feature_names"]),
        )
