"""The home-level layer: what the CLI and the service call.

Library functions elsewhere in `models` take explicit feature sources, selectors and paths; this
module fills them in from a SimMerge home (catalog, cached signatures, the trained predictor, the
bandit's state), falling back to the predictor shipped in `models/default/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.bandit import locked
from models.dataset import PairFeatureSource, build_dataset, file_sha256, load_labels
from models.descriptors import ARM_FEATURE_NAMES, DEFAULT_SETTINGS, OperatorSetting, arm_features
from models.evaluate import fit_selector, held_out_pairs
from models.predictor import LightGBMSelector, read_meta
from simmerge.errors import NotFoundError, SimMergeError

DEFAULT_PREDICTOR = Path(__file__).resolve().parent / "default"
PREDICTOR_DIR = "predictor"
BANDIT_DIR = "bandit"
Progress = Callable[[float, str | None], None]


# -- training ------------------------------------------------------------------------------------------
def train_selectors(
    labels_path: Path,
    source: PairFeatureSource,
    out_dir: Path,
    *,
    target: str = "held_in",
    seed: int = 0,
    schema_version: str = "unknown",
    validate: bool = True,
) -> dict[str, Any]:
    """Train the predictor and its baselines on a labels file; write them under `out_dir`; return the metadata."""
    labels = load_labels(labels_path)
    data = build_dataset(labels, source, target)
    validation: dict[str, Any] = {}
    if validate and len(set(data.pools)) >= 2:
        reports = held_out_pairs(
            data, folds=5, seed=seed, names=("lightgbm", "lasso", "best_fixed")
        ).reports()
        validation = {
            "protocol": "held-out pairs, GroupKFold by pool",
            **{k: v.to_dict() for k, v in reports.items()},
        }
    predictor = fit_selector("lightgbm", data, seed)
    settings = labelled_settings(labels[labels[f"{target}_score"].notna()])
    meta = {
        "feature_schema_version": schema_version,
        "input_feature_names": data.feature_names,
        "pair_feature_names": list(source.feature_names),
        "labels_file": str(labels_path),
        "labels_sha256": file_sha256(Path(labels_path)),
        "target": target,
        "n_rows": len(data),
        "n_pools": len(set(data.pools)),
        "kinds": {str(k): int(v) for k, v in zip(*np.unique(data.kinds, return_counts=True), strict=True)},
        "settings": [s.to_dict() for s in settings],
        "validation": validation,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out_dir = Path(out_dir)
    predictor.save(out_dir, meta)
    fit_selector("lasso", data, seed).save(out_dir / "lasso", meta)
    fit_selector("best_fixed", data, seed).save(out_dir / "best_fixed", meta)
    return predictor.meta


def labelled_settings(labels) -> list[OperatorSetting]:
    """The 2-way operator settings the labels cover, in first-seen order (what recommend searches)."""
    out: dict[str, OperatorSetting] = {}
    kinds = labels["kind"] if "kind" in labels.columns else ["pair"] * len(labels)
    params_column = labels["params_json"] if "params_json" in labels.columns else [None] * len(labels)
    for kind, method, params in zip(kinds, labels["method"], params_column, strict=True):
        if kind not in (None, "pair"):
            continue
        parsed = json.loads(params) if isinstance(params, str) and params else {}
        setting = OperatorSetting(str(method), parsed)
        out.setdefault(setting.key, setting)
    return list(out.values()) or list(DEFAULT_SETTINGS)


# -- loading -------------------------------------------------------------------------------------------
def predictor_dir(home: Path | None) -> Path:
    """The home's trained predictor if there is one, else the one shipped with the package."""
    if home is not None and (Path(home) / PREDICTOR_DIR / "meta.json").exists():
        return Path(home) / PREDICTOR_DIR
    if (DEFAULT_PREDICTOR / "meta.json").exists():
        return DEFAULT_PREDICTOR
    raise NotFoundError(f"no trained predictor in {home} and none shipped; run `simmerge train`")


def load_predictor(directory: Path) -> tuple[LightGBMSelector, dict[str, Any]]:
    predictor = LightGBMSelector.load(directory)
    return predictor, read_meta(directory)


def settings_of(meta: Mapping[str, Any]) -> list[OperatorSetting]:
    stored = meta.get("settings") or []
    return [OperatorSetting(s["method"], s.get("params", {})) for s in stored] or list(DEFAULT_SETTINGS)


def check_source(meta: Mapping[str, Any], source: PairFeatureSource) -> None:
    """The predictor was trained on some pair features: the source must give the same columns."""
    expected = meta.get("pair_feature_names")
    if expected is not None and list(expected) != list(source.feature_names):
        raise SimMergeError(
            f"the predictor was trained on {len(expected)} pair features "
            f"({meta.get('feature_schema_version')}), the feature source gives {len(source.feature_names)}; "
            "retrain with `simmerge train` or use matching features"
        )


def home_source(home: Path, pair_features: Path | None = None, zoo: Path | None = None) -> PairFeatureSource:
    """A pair-feature table if given, else the features package over the home's cached signatures."""
    from models.sources import FeaturesPackageSource, TablePairSource, zoo_paths

    if pair_features is not None:
        return TablePairSource.read(pair_features)
    return FeaturesPackageSource(home, zoo_paths(zoo) if zoo is not None else _catalog_paths(home))


def _catalog_paths(home: Path) -> dict[str, Path]:
    from simmerge.catalog import Catalog

    if not (Path(home) / "simmerge.db").exists():
        return {}
    with Catalog.open(home) as catalog:
        return {e.name: e.path for e in catalog.list()}


def common_base(home: Path, models: Sequence[str]) -> str | None:
    """The base every expert was fine-tuned from, when the catalog knows one and they agree."""
    from simmerge.catalog import Catalog

    if not (Path(home) / "simmerge.db").exists():
        return None
    with Catalog.open(home) as catalog:
        bases = {catalog.get(m).base if catalog.has(m) else None for m in models}
    return bases.pop() if len(bases) == 1 else None


def catalog_experts(home: Path) -> list[str]:
    from simmerge.catalog import Catalog

    if not (Path(home) / "simmerge.db").exists():
        raise NotFoundError(f"no catalog in {home}; register checkpoints with `simmerge catalog add`")
    with Catalog.open(home) as catalog:
        return [e.name for e in catalog.list() if e.base]


# -- what the service and the CLI call ----------------------------------------------------------------
def load_selection(
    home: Path, predictor: Path | None = None, pair_features: Path | None = None
) -> tuple[Any, dict[str, Any], PairFeatureSource]:
    """The predictor (the home's, or `predictor`) and a feature source it was trained to read."""
    selector, meta = load_predictor(predictor or predictor_dir(home))
    source = home_source(home, pair_features)
    check_source(meta, source)
    return selector, meta, source


def recommend(
    models: Sequence[str],
    *,
    top: int = 5,
    home: Path,
    task: str | None = None,
    max_models: int | None = None,
    base: str | None = None,
    pair_features: Path | None = None,
    predictor: Path | None = None,
) -> dict[str, Any]:
    """Ranked plans for `models`; `task` is recorded for the bandit, the predictor targets held-in tasks."""
    selector, meta, source = load_selection(home, predictor, pair_features)
    base = base if base is not None else common_base(home, models)
    return recommend_loaded(
        models, selector, meta, source, home=home, top=top, task=task, max_models=max_models, base=base
    )


def recommend_loaded(
    models: Sequence[str],
    selector: Any,
    meta: dict[str, Any],
    source: PairFeatureSource,
    *,
    home: Path,
    top: int,
    task: str | None = None,
    max_models: int | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Rank plans with an already loaded predictor and feature source (the service keeps them warm)."""
    from models.plan_ranking import PlanQuery

    query = PlanQuery(tuple(models), base, max_models)
    return recommend_loaded_many([query], selector, meta, source, home=home, top=[top], tasks=[task])[0]


def recommend_loaded_many(
    queries: Sequence[Any],
    selector: Any,
    meta: dict[str, Any],
    source: PairFeatureSource,
    *,
    home: Path,
    top: Sequence[int],
    tasks: Sequence[str | None],
) -> list[dict[str, Any]]:
    """`recommend_loaded` for a batch of `models.plan_ranking.PlanQuery`s (one search for them all)."""
    from models.recommend import recommend_many

    results = recommend_many(
        queries,
        selector,
        source,
        meta.get("input_feature_names") or selector.feature_names,
        top=top,
        settings=settings_of(meta),
    )
    bandit = _read_only_bandit(_bandit_path(home))
    for result, task in zip(results, tasks, strict=True):
        _apply_bandit(bandit, result, source, task)
    return results


def score_catalog(
    *,
    home: Path,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    models: Sequence[str] | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    pair_features: Path | None = None,
    predictor: Path | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Score every pair × setting of the catalog (or of `models`); write the table and, if asked, the heatmap."""
    from models.score_catalog import plot_best_merges, score_pairs, write_table

    selector, meta, source = load_selection(home, predictor, pair_features)
    names = list(models) if models else catalog_experts(home)
    selector.params["num_threads"] = os.cpu_count() or 1  # predictions do not depend on the thread count
    table = score_pairs(names, selector, source, settings_of(meta), progress)
    if out is None and out_dir is not None:
        out = Path(out_dir) / "scores.parquet"
    result: dict[str, Any] = {"rows": len(table), "checkpoints": len(names)}
    if out is not None:
        result["table"] = str(write_table(table, out))
    if plot is None and out_dir is not None:
        plot = Path(out_dir) / "best_merges.png"
    if plot is not None:
        result["plot"] = str(plot_best_merges(table, plot))
    from models.score_catalog import best_per_pair

    best = best_per_pair(table).head(10)
    result["best"] = [
        {
            **row,
            "model_a": str(row["model_a"]),
            "model_b": str(row["model_b"]),
            "method": str(row["method"]),
            "parameters": json.loads(str(row["parameters"])),
        }
        for row in best.to_dict("records")
    ]
    return result


# -- the home's bandit -------------------------------------------------------------------------------
def _bandit_path(home: Path) -> Path:
    return Path(home) / BANDIT_DIR


def _context(source: PairFeatureSource, models: Sequence[str]) -> np.ndarray:
    from models.dataset import member_pairs

    return np.asarray(source.pair_features(member_pairs(models)), dtype=np.float64).mean(axis=0)


def _load_or_create_bandit(home: Path, context_dim: int, settings: Sequence[OperatorSetting]):
    from models.bandit import LinearBandit

    path = _bandit_path(home)
    if (path / "bandit.json").exists():
        bandit = LinearBandit.load(path)
        if bandit.context_dim != context_dim:
            raise SimMergeError(
                f"the bandit in {path} expects {bandit.context_dim} context features, the features give {context_dim}"
            )
        return bandit
    bandit = LinearBandit(context_dim=context_dim, arm_dim=len(ARM_FEATURE_NAMES))
    for setting in settings:
        bandit.add_arm(setting.key, arm_features(setting), setting.to_dict())
    return bandit


def _plan_setting(plan: Mapping[str, Any]) -> tuple[list[str], OperatorSetting]:
    """Experts and the operator setting of a recommended plan (its last step for a fold)."""
    from simmerge.plan import Plan

    body = plan.get("plan", plan)
    parsed = Plan.from_dict(body)
    step = parsed.steps[-1]
    return parsed.experts(), OperatorSetting(step.method, dict(step.parameters))


def bandit_update(
    plan: Mapping[str, Any], task: str, score: float, *, home: Path, pair_features: Path | None = None
) -> None:
    """Learn a measured score of a plan (feedback), logged with its task; the next recommendation uses it."""
    experts, setting = _plan_setting(plan)
    if len(experts) < 2:
        raise SimMergeError(f"feedback plan merges {len(experts)} checkpoint(s); need at least two")
    meta = read_meta(predictor_dir(home))
    source = home_source(home, pair_features)
    context = _context(source, experts)
    with locked(_bandit_path(home), exclusive=True):
        bandit = _load_or_create_bandit(home, len(context), settings_of(meta))
        if setting.key not in bandit.arms:
            bandit.add_arm(setting.key, arm_features(setting), setting.to_dict())
        prior = float(plan.get("predicted_score", 0.0))
        bandit.update(context, setting.key, float(score), prior)
        bandit.save(_bandit_path(home))
        with open(_bandit_path(home) / "feedback.jsonl", "a") as log:
            log.write(
                json.dumps({"task": task, "arm": setting.key, "models": experts, "score": float(score)})
                + "\n"
            )


def bandit_add_arm(
    family: str, parameters: Mapping[str, Any], *, home: Path, pair_features: Path | None = None
) -> str:
    """Offer a new operator setting to the home's bandit (created on first use)."""
    setting = OperatorSetting(family, dict(parameters))
    _, meta = load_predictor(predictor_dir(home))
    context_dim = len(meta.get("pair_feature_names") or [])
    if context_dim == 0:
        raise SimMergeError("the predictor's metadata does not list its pair features")
    with locked(_bandit_path(home), exclusive=True):
        bandit = _load_or_create_bandit(home, context_dim, settings_of(meta))
        if setting.key not in bandit.arms:
            bandit.add_arm(setting.key, arm_features(setting), setting.to_dict())
        bandit.save(_bandit_path(home))
    return setting.key


def _apply_bandit(bandit: Any, result: dict[str, Any], source: PairFeatureSource, task: str | None) -> None:
    """Once feedback exists, single-step plans also carry the bandit's estimate (prior + what it learned)."""
    if bandit is None or sum(bandit.pulls.values()) == 0:
        return
    for plan in result["plans"]:
        experts, setting = _plan_setting(plan)
        if setting.key in bandit.arms and len(plan["steps"]) == 1:
            context = _context(source, experts)
            if len(context) == bandit.context_dim:
                mean, width = bandit.scores(context, {setting.key: plan["predicted_score"]}, [setting.key])[
                    setting.key
                ]
                plan["bandit_score"], plan["bandit_width"] = mean, width
    if task is not None:
        result["task"] = task


_BANDIT_FILES = ("bandit.json", "A.npy", "b.npy")
_bandit_cache: dict[Path, tuple[tuple[tuple[int, int, int], ...], Any]] = {}


def _read_only_bandit(path: Path) -> Any:
    """The bandit at `path` for scoring only (never updated through this object), or None.

    Parsed once per version of its files (inode, mtime and size of each): reading and inverting it on every
    recommendation cost more than the scoring. A changed version is read under the shared lock, so it is
    never half of one update and half of another (feedback may come from another worker process).
    """
    stamp = _bandit_stamp(path)
    if stamp is None:
        return None
    cached = _bandit_cache.get(path)
    if cached is None or cached[0] != stamp:
        from models.bandit import LinearBandit

        with locked(path, exclusive=False):
            stamp = _bandit_stamp(path)
            if stamp is None:
                return None
            cached = (stamp, LinearBandit.load(path))
        _bandit_cache[path] = cached
    return cached[1]


def _bandit_stamp(path: Path) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple(
            (st.st_ino, st.st_mtime_ns, st.st_size) for st in ((path / f).stat() for f in _BANDIT_FILES)
        )
    except FileNotFoundError:
        return None
