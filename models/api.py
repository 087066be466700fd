"""The home-level layer: what the CLI and the service call.

Library functions elsewhere in `models` take explicit feature sources, selectors and ports; this
module fills them in from a SimMerge home (cached signatures, the trained predictor), falling back to
the predictor shipped in `models/default/`. The store (catalog, arms, feedback) is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.dataset import build_dataset, file_sha256, load_labels
from models.evaluate import fit_selector, held_out_pairs
from models.plans import DEFAULT_SETTINGS, OperatorSetting
from models.ports import ArmSource, FeedbackLog, PairFeatureSource
from models.predictor import LightGBMSelector, read_meta
from models.selection import Selection
from simmerge.errors import NotFoundError

DEFAULT_PREDICTOR = Path(__file__).resolve().parent / "default"
PREDICTOR_DIR = "predictor"
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


def home_source(
    home: Path,
    pair_features: Path | None = None,
    zoo: Path | None = None,
    paths: Mapping[str, Path] | None = None,
    *,
    compute_missing: bool = True,
) -> PairFeatureSource:
    """A pair-feature table if given, else the features package over the home's cached signatures
    (checkpoint paths from a zoo's manifest, the caller's catalog, else the home's SQLite catalog)."""
    from models.sources import FeaturesPackageSource, TablePairSource, zoo_paths

    if pair_features is not None:
        return TablePairSource.read(pair_features)
    if zoo is not None:
        paths = zoo_paths(zoo)
    elif paths is None:
        paths = _catalog_paths(home)
    return FeaturesPackageSource(home, paths, compute_missing=compute_missing)


def _catalog_paths(home: Path) -> dict[str, Path]:
    """Name → directory of the checkpoints in the home's own SQLite catalog (none without one)."""
    from simmerge.catalog import Catalog

    if not (Path(home) / "simmerge.db").exists():
        return {}
    with Catalog.open(home) as catalog:
        return {e.name: e.path for e in catalog.list()}


# -- what the service and the CLI call ----------------------------------------------------------------
def load_selection(
    home: Path,
    source: PairFeatureSource,
    *,
    predictor: Path | None = None,
    feedback: FeedbackLog | None = None,
    arms: ArmSource | None = None,
) -> Selection:
    """The predictor (the home's, or `predictor`) over `source`, with the store's feedback and arms."""
    selector, meta = load_predictor(predictor or predictor_dir(home))
    return Selection(selector, meta, source, feedback, arms)


def score_catalog(
    selection: Selection,
    names: Sequence[str],
    *,
    bases: Mapping[str, str | None] | None = None,
    methods: Sequence[str] | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score every pair × setting of `names`; write the table and, if asked, the heatmap."""
    from models.score_catalog import best_per_pair, plot_best_merges, write_table

    table = selection.score_pairs(names, progress, bases, methods)
    result: dict[str, Any] = {"rows": len(table), "checkpoints": len(set(names))}
    if out is not None:
        result["table"] = str(write_table(table, out))
    if plot is not None:
        result["plot"] = str(plot_best_merges(table, plot))
    result["best"] = [
        {
            **row,
            "model_a": str(row["model_a"]),
            "model_b": str(row["model_b"]),
            "method": str(row["method"]),
            "parameters": json.loads(str(row["parameters"])),
        }
        for row in best_per_pair(table).head(10).to_dict("records")
    ]
    return result
