"""The learned selector: LightGBM regressors of a plan's normalised score, with an uncertainty.

Three boosters share the features: the mean (L2) and the 0.1 / 0.9 quantiles; the uncertainty is
half the 80% interval. Training is deterministic for a seed (`deterministic=True`, fixed threads).
On disk a predictor is LightGBM's text format plus `meta.json` — no pickle. Predictions and SHAP
contributions come from the boosters compiled by `models.compiled_trees` (the same numbers, several
times faster than LightGBM's Python API on a few rows), or from LightGBM where a booster cannot be.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from simmerge.errors import NotFoundError, SimMergeError

if TYPE_CHECKING:
    from models.compiled_trees import CompiledEnsemble

log = logging.getLogger("simmerge.models")
# Boosters this process loaded that the compiled evaluator could not take (the service exports the count).
UNCOMPILED: list[str] = []
META_FILE = "meta.json"
QUANTILES = (0.1, 0.9)
DEFAULT_PARAMS: dict[str, Any] = {
    "learning_rate": 0.08,
    "num_leaves": 15,
    "min_data_in_leaf": 5,
    "min_data_in_bin": 1,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
}
DEFAULT_ROUNDS = 200


class Selector(Protocol):
    """What every selector (predictor or baseline) offers the evaluation and the commands."""

    name: str

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: Sequence[str]) -> Selector: ...

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted score, uncertainty) per row."""
        ...


@dataclass
class LightGBMSelector:
    """Mean and quantile boosters; `meta` carries what a reload needs to check its inputs."""

    seed: int = 0
    rounds: int = DEFAULT_ROUNDS
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    name: str = "lightgbm"
    feature_names: list[str] = field(default_factory=list)
    boosters: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # booster key -> (the booster compiled, its compiled trees or None); rebuilt, never saved
    _compiled: dict[str, tuple[Any, CompiledEnsemble | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _params(self, objective: str, alpha: float | None = None) -> dict[str, Any]:
        params = dict(self.params)
        params.update(objective=objective, seed=self.seed)
        if alpha is not None:
            params["alpha"] = alpha
        return params

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        feature_names: Sequence[str],
        sample_weight: np.ndarray | None = None,
    ) -> LightGBMSelector:
        import lightgbm as lgb

        if len(y) < 4:
            raise SimMergeError(f"{len(y)} labelled plans are too few to train a predictor (need at least 4)")
        self.feature_names = [_safe_feature_name(n) for n in feature_names]
        data = lgb.Dataset(
            np.asarray(X, dtype=np.float64),
            label=y,
            weight=sample_weight,
            feature_name=self.feature_names,
            free_raw_data=False,
        )
        self.boosters = {"mean": lgb.train(self._params("regression"), data, num_boost_round=self.rounds)}
        for q in QUANTILES:
            self.boosters[f"q{round(q * 100):02d}"] = lgb.train(
                self._params("quantile", q), data, num_boost_round=max(1, self.rounds // 4)
            )
        self._compile()
        return self

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.boosters:
            raise SimMergeError("the predictor is not trained")
        X = self._check(X)
        compiled = self._compiled_for("mean", "q10", "q90")
        if compiled is not None:
            mean, lo, hi = (trees.predict(X) for trees in compiled)
        else:
            mean = self.boosters["mean"].predict(X, num_threads=self.params.get("num_threads", 1))
            lo = self.boosters["q10"].predict(X, num_threads=self.params.get("num_threads", 1))
            hi = self.boosters["q90"].predict(X, num_threads=self.params.get("num_threads", 1))
        return mean, np.abs(hi - lo) / 2.0

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per-feature SHAP contributions to the mean prediction, (n, n_features) (bias dropped)."""
        X = self._check(X)
        compiled = self._compiled_for("mean")
        if compiled is not None:
            return compiled[0].contributions(X)[:, :-1]
        threads = self.params.get("num_threads", 1)  # as predict: a few rows never pay for a thread pool
        return self.boosters["mean"].predict(X, pred_contrib=True, num_threads=threads)[:, :-1]

    def _compile(self) -> None:
        """Compile every booster's trees; a model the compiled evaluator does not cover keeps LightGBM,
        and says so (a warning, and `simmerge_uncompiled_boosters` in the service's /metrics)."""
        from models.compiled_trees import CompiledEnsemble

        self._compiled = {key: (b, CompiledEnsemble.from_booster(b)) for key, b in self.boosters.items()}
        for key, (_, trees) in self._compiled.items():
            if trees is None:
                UNCOMPILED.append(key)
                log.warning("predictor booster %r cannot be compiled; predicting with LightGBM (slower)", key)

    def _compiled_for(self, *keys: str) -> list[CompiledEnsemble] | None:
        """The compiled trees of these boosters, or None (use LightGBM) unless every one is compiled from
        the booster now held and reads the predictor's width (else LightGBM reports the mismatch)."""
        compiled = []
        for key in keys:
            booster, trees = self._compiled.get(key, (None, None))
            if (
                trees is None
                or booster is not self.boosters.get(key)
                or trees.n_features != len(self.feature_names)
            ):
                return None
            compiled.append(trees)
        return compiled

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise SimMergeError(
                f"feature matrix has shape {X.shape}, the predictor expects {len(self.feature_names)} columns"
            )
        return X

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: Path, meta: Mapping[str, Any] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for key, booster in self.boosters.items():
            booster.save_model(str(directory / f"{key}.txt"))
        self.meta = {
            **self.meta,
            **(meta or {}),
            "selector": self.name,
            "seed": self.seed,
            "rounds": self.rounds,
            "params": self.params,
            "feature_names": self.feature_names,
            "boosters": {key: f"{key}.txt" for key in self.boosters},
        }
        _write_json(directory / META_FILE, self.meta)
        return directory

    @classmethod
    def load(cls, directory: Path) -> LightGBMSelector:
        import lightgbm as lgb

        meta = read_meta(directory)
        if meta.get("selector") != "lightgbm":
            raise SimMergeError(f"{directory} holds a {meta.get('selector')!r} selector, not lightgbm")
        boosters = {}
        for key, filename in meta["boosters"].items():
            path = Path(directory) / filename
            if not path.exists():
                raise NotFoundError(f"predictor file {path} is missing")
            boosters[key] = lgb.Booster(model_file=str(path))
        selector = cls(
            seed=meta["seed"],
            rounds=meta["rounds"],
            params=meta["params"],
            feature_names=list(meta["feature_names"]),
            boosters=boosters,
            meta=meta,
        )
        selector._compile()
        return selector


def _safe_feature_name(name: str) -> str:
    """LightGBM rejects JSON special characters in feature names; keep names readable otherwise."""
    return "".join(c if c.isalnum() or c in "_=.-" else "_" for c in name)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise NotFoundError(f"no predictor in {directory} ({META_FILE} missing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SimMergeError(f"{path} is not valid JSON ({exc})") from exc


def load_selector(directory: Path) -> Any:
    """Reload whatever selector `directory` holds (predictor or a baseline)."""
    from models.baselines import BestFixedSelector, LassoSelector

    kind = read_meta(directory).get("selector")
    loaders = {
        "lightgbm": LightGBMSelector.load,
        "lasso": LassoSelector.load,
        "best_fixed": BestFixedSelector.load,
    }
    if kind not in loaders:
        raise SimMergeError(f"{directory} holds an unknown selector kind {kind!r}")
    return loaders[kind](directory)
