"""Labels + pairwise features → the predictor's training matrix.

A row is one labelled plan, described by the plan table (`models.table`) exactly as a recommendation
describes it: the operator descriptor followed by the pairwise features of its member checkpoints
aggregated over every member pair (mean, min, max), so a 2-way, k-way or fold plan all map to the
same columns. A *pool* is every plan over the same set
of checkpoints: selection picks one plan per pool.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.plans import Candidate, OperatorSetting, candidate_from_plan
from models.ports import PairFeatureSource
from models.table import PlanTable, feature_names
from simmerge.errors import NotFoundError, SimMergeError
from simmerge.plan import Plan

REQUIRED_COLUMNS = ("method", "models", "held_in_score")
# Weight of a `self` row (a checkpoint merged with itself) when the predictor trains. At full weight
# their near-1 scores take the first trees' splits: held-out-pair gap closed on the full zoo fell to
# 0.64 (mean of seeds 0-2) from 0.75 without them. Any weight in 0.05-0.3 gives 0.73-0.74, and
# identical checkpoints still get identity-preserving merges on top (tests/test_models_default.py).
SELF_ROW_WEIGHT = 0.2
TARGETS = ("held_in", "held_out")


@dataclass
class Dataset:
    """The matrix and the bookkeeping selection needs (which pool and operator setting each row is)."""

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    pools: np.ndarray  # pool key per row: sorted checkpoint names joined by "|"
    settings: np.ndarray  # operator-setting key per row (what "best fixed operator" fixes)
    kinds: np.ndarray
    models: list[list[str]]
    plan_ids: np.ndarray

    def subset(self, mask: np.ndarray) -> Dataset:
        index = np.flatnonzero(mask)
        return Dataset(
            self.X[index],
            self.y[index],
            self.feature_names,
            self.pools[index],
            self.settings[index],
            self.kinds[index],
            [self.models[i] for i in index],
            self.plan_ids[index],
        )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def evaluable(self) -> np.ndarray:
        """Rows that are a selection problem: every kind but `self` (a checkpoint merged with itself)."""
        return self.kinds != "self"

    @property
    def weights(self) -> np.ndarray:
        """Training weight per row: `SELF_ROW_WEIGHT` for `self` rows, 1 otherwise."""
        return np.where(self.evaluable, 1.0, SELF_ROW_WEIGHT)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_labels(path: Path) -> pd.DataFrame:
    """Read a labels file (Parquet, or CSV for hand-made fixtures) and check the columns we need."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"labels file {path} does not exist")
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise SimMergeError(f"labels file {path} lacks column(s) {', '.join(missing)}")
    frame = frame.copy()
    frame["models"] = [_as_list(v) for v in frame["models"]]
    return frame.reset_index(drop=True)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [str(v) for v in json.loads(value)] if value.startswith("[") else [value]
    return [str(v) for v in value]


def pool_key(models: Sequence[str]) -> str:
    return "|".join(sorted(models))


def target_column(target: str) -> str:
    if target not in TARGETS:
        raise SimMergeError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    return f"{target}_score"


def _row_plan(row: Mapping[str, Any]) -> Plan | None:
    text = row.get("plan_json")
    if isinstance(text, str) and text:
        return Plan.from_dict(json.loads(text))
    return None


def _row_params(row: Mapping[str, Any]) -> dict[str, Any]:
    text = row.get("params_json")
    if isinstance(text, str) and text:
        return dict(json.loads(text))
    if isinstance(text, Mapping):
        return dict(text)
    return {}


def setting_key(row: Mapping[str, Any]) -> str:
    """The operator setting a row used, independent of its checkpoints (fold steps joined by `>`)."""
    plan = _row_plan(row)
    if plan is not None and len(plan.steps) > 1:
        return ">".join(s.symbol() for s in plan.steps)
    params = _row_params(row)
    return f"{row['method']}{json.dumps(params, sort_keys=True)}"


def build_dataset(labels: pd.DataFrame, source: PairFeatureSource, target: str = "held_in") -> Dataset:
    """Features for every labelled plan, through the plan table (each distinct pair's features once)."""
    column = target_column(target)
    if column not in labels.columns:
        raise SimMergeError(f"labels lack the target column {column!r}")
    frame = labels[labels[column].notna()].reset_index(drop=True)
    if frame.empty:
        raise SimMergeError(f"no labelled plan has a {column}")
    records = frame.to_dict("records")
    experts = [_experts(r) for r in records]
    table = PlanTable(source, feature_names(source.feature_names))
    X = table.rows([label_candidate(r, members) for r, members in zip(records, experts, strict=True)])
    return Dataset(
        X=X,
        y=frame[column].to_numpy(dtype=np.float64),
        feature_names=table.columns,
        pools=np.asarray([pool_key(m) for m in experts]),
        settings=np.asarray([setting_key(r) for r in records]),
        kinds=np.asarray([str(r.get("kind") or "pair") for r in records]),
        models=experts,
        plan_ids=np.asarray([str(r.get("plan_id") or i) for i, r in enumerate(records)]),
    )


def label_candidate(row: Mapping[str, Any], members: Sequence[str]) -> Candidate:
    """The candidate a labelled plan is: from its plan where the label keeps one, else from its method
    and parameters; a `self` row (a checkpoint merged with itself) is the pair merge it is."""
    kind = str(row.get("kind") or ("pair" if len(members) == 2 else "kway"))
    plan = _row_plan(row)
    if plan is not None and kind != "self":
        candidate = candidate_from_plan(plan, cross_family=kind == "cross_family")
        return Candidate(tuple(members), candidate.settings, candidate.cross_family)
    setting = OperatorSetting(str(row["method"]), _row_params(row))
    return Candidate(tuple(members), (setting,), kind == "cross_family")


def _experts(row: Mapping[str, Any]) -> list[str]:
    """The merged checkpoints, in fold order for a fold (its plan says the order)."""
    models = _as_list(row["models"])
    plan = _row_plan(row) if row.get("kind") == "fold" else None
    if plan is not None:
        ordered = [m for m in plan.experts() if m in models]
        models = ordered + [m for m in models if m not in ordered]
    if len(models) < 2:
        raise SimMergeError(
            f"labelled plan {row.get('plan_id', '?')} merges fewer than two checkpoints: {models}"
        )
    return models


def model_tasks_from_labels(labels: pd.DataFrame) -> dict[str, list[str]]:
    """Each checkpoint's tasks, inferred from `held_in_tasks`: the tasks common to every plan it is in.

    With two or more partners per expert this recovers exactly what it was trained on, so
    leave-one-task-out works from a labels file alone.
    """
    if "held_in_tasks" not in labels.columns:
        return {}
    common: dict[str, set[str]] = {}
    for members, tasks in zip(labels["models"], labels["held_in_tasks"], strict=True):
        if tasks is None:
            continue
        for model in _as_list(members):
            found = set(_as_list(tasks))
            common[model] = common[model] & found if model in common else found
    return {m: sorted(t) for m, t in common.items() if t}
