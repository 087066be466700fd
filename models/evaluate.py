"""Evaluate selectors on plans they have not seen: held-out pairs, held-out tasks, a held-out catalog.

Every protocol trains each selector on its training rows only and predicts the rest; the best fixed
operator is itself chosen on the training rows, so "gap closed" never peeks at test scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.baselines import BestFixedSelector, LassoSelector, RandomSelector
from models.dataset import Dataset, PairFeatureSource, build_dataset, load_labels, model_tasks_from_labels
from models.metrics import SelectionReport, evaluate_selection
from models.predictor import LightGBMSelector
from simmerge.errors import SimMergeError

SelectorFactory = Callable[[int], object]
SELECTORS: dict[str, SelectorFactory] = {
    "lightgbm": lambda seed: LightGBMSelector(seed=seed),
    "lasso": lambda seed: LassoSelector(seed=seed),
    "best_fixed": lambda seed: BestFixedSelector(),
    "random": lambda seed: RandomSelector(seed=seed),
}


@dataclass
class Predictions:
    """Out-of-sample predictions of every selector for the rows of one protocol."""

    pools: np.ndarray
    measured: np.ndarray
    predicted: dict[str, np.ndarray]

    def reports(self) -> dict[str, SelectionReport]:
        fixed = self.predicted["best_fixed"]
        out = {
            name: evaluate_selection(self.pools, self.measured, pred, fixed)
            for name, pred in self.predicted.items()
        }
        out["oracle"] = evaluate_selection(self.pools, self.measured, self.measured, fixed)
        return out


def fit_selector(name: str, train: Dataset, seed: int) -> Any:
    """Fit one selector as every command does: the predictor on every row (`self` rows down-weighted),
    the baselines on the selection rows only (a linear model or a per-setting mean cannot set a checkpoint
    merged with itself apart, and its near-1 scores would only skew them)."""
    selector = SELECTORS[name](seed)
    if isinstance(selector, LightGBMSelector):
        return selector.fit(train.X, train.y, train.feature_names, sample_weight=train.weights)
    rows = train.subset(train.evaluable)
    return selector.fit(rows.X, rows.y, rows.feature_names)  # type: ignore[attr-defined]


def _fit_predict(train: Dataset, test: Dataset, seed: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: fit_selector(name, train, seed).predict(test.X)[0] for name in names}


def _collect(parts: list[tuple[Dataset, dict[str, np.ndarray], str]]) -> Predictions:
    if not parts:
        raise SimMergeError("the protocol produced no test rows")
    pools = np.concatenate(
        [f"{tag}/" + np.asarray(test.pools, dtype=object) for test, _, tag in parts]
    ).astype(str)
    measured = np.concatenate([test.y for test, _, _ in parts])
    names = parts[0][1].keys()
    predicted = {n: np.concatenate([pred[n] for _, pred, _ in parts]) for n in names}
    return Predictions(pools, measured, predicted)


def held_out_pairs(
    data: Dataset, folds: int = 5, seed: int = 0, names: Sequence[str] = tuple(SELECTORS)
) -> Predictions:
    """GroupKFold over pools: no set of checkpoints is seen in training and test.

    `self` rows (a checkpoint with itself) are never test pools; every fold trains on them.
    """
    from sklearn.model_selection import GroupKFold

    pooled = data.subset(data.evaluable)
    always_train = ~data.evaluable
    n_pools = len(set(pooled.pools))
    if n_pools < 2:
        raise SimMergeError(f"held-out pairs need at least two pools, the labels have {n_pools}")
    splitter = GroupKFold(n_splits=min(folds, n_pools))
    rows = np.flatnonzero(data.evaluable)
    parts = []
    for fold, (train_idx, test_idx) in enumerate(splitter.split(pooled.X, pooled.y, groups=pooled.pools)):
        train = data.subset(always_train | np.isin(np.arange(len(data)), rows[train_idx]))
        test = data.subset(np.isin(np.arange(len(data)), rows[test_idx]))
        parts.append((test, _fit_predict(train, test, seed, names), f"fold{fold}"))
    return _collect(parts)


def leave_one_task_out(
    data: Dataset,
    model_tasks: Mapping[str, Sequence[str]],
    seed: int = 0,
    names: Sequence[str] = tuple(SELECTORS),
) -> Predictions:
    """For each task: train on pools with no expert of it, test on pools with one (a task never seen)."""
    missing = sorted({m for members in data.models for m in members} - set(model_tasks))
    if missing:
        raise SimMergeError(f"no task is known for checkpoint {missing[0]!r} (pass the zoo or catalog)")
    touches = {
        task: np.asarray([any(task in model_tasks[m] for m in members) for members in data.models])
        for task in sorted({t for tasks in model_tasks.values() for t in tasks})
    }
    parts = []
    for task, mask in touches.items():
        if mask.all() or not mask.any():
            continue
        train, test = data.subset(~mask), data.subset(mask & data.evaluable)
        if len(test) == 0:
            continue
        if len(set(train.pools)) < 2:
            continue
        parts.append((test, _fit_predict(train, test, seed, names), task))
    return _collect(parts)


def held_out_catalog(
    train: Dataset, test: Dataset, seed: int = 0, names: Sequence[str] = tuple(SELECTORS)
) -> Predictions:
    """Train on one catalog's labels, test on another's (other seed, other tasks)."""
    if train.feature_names != test.feature_names:
        raise SimMergeError(
            "the held-out catalog's features have different columns from the training catalog's"
        )
    test = test.subset(test.evaluable)
    return _collect([(test, _fit_predict(train, test, seed, names), "holdout")])


COLUMNS = (
    ("gap closed", "gap_closed"),
    ("regret", "mean_regret"),
    ("top-1", "top1_accuracy"),
    ("Spearman", "spearman_pooled"),
    ("Pearson", "pearson_pooled"),
    ("Spearman/pool", "spearman_per_pool"),
    ("Pearson/pool", "pearson_per_pool"),
    ("NDCG@3", "ndcg_at_3"),
    ("mean selected", "mean_selected"),
)


def markdown_table(results: Mapping[str, Mapping[str, SelectionReport]]) -> str:
    """One row per (protocol, selector), columns as in docs/design.md §4."""
    head = "| protocol | selector | pools | " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "---|" * (3 + len(COLUMNS))
    lines = [head, rule]
    for protocol, reports in results.items():
        for name, report in reports.items():
            values = report.to_dict()
            cells = " | ".join(_fmt(values[key]) for _, key in COLUMNS)
            lines.append(f"| {protocol} | {name} | {report.n_pools} | {cells} |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def evaluate_all(
    labels: Path,
    source: PairFeatureSource,
    *,
    holdout_labels: Path | None = None,
    holdout_source: PairFeatureSource | None = None,
    zoo: Path | None = None,
    model_tasks: Mapping[str, Sequence[str]] | None = None,
    target: str = "held_in",
    folds: int = 5,
    seed: int = 0,
    names: Sequence[str] = tuple(SELECTORS),
) -> dict[str, dict[str, SelectionReport]]:
    """Every protocol the inputs allow: held-out pairs always, held-out tasks with a zoo, catalog with holdout labels."""
    from models.sources import zoo_model_tasks

    frame = load_labels(labels)
    data = build_dataset(frame, source, target)
    results = {"held-out pairs": held_out_pairs(data, folds, seed, names).reports()}
    tasks = model_tasks or (zoo_model_tasks(zoo) if zoo is not None else model_tasks_from_labels(frame))
    if tasks:
        results["leave-one-task-out"] = leave_one_task_out(data, tasks, seed, names).reports()
    if holdout_labels is not None:
        if holdout_source is None:
            raise SimMergeError("held-out labels need a feature source for their checkpoints")
        test = build_dataset(load_labels(holdout_labels), holdout_source, target)
        results["held-out catalog"] = held_out_catalog(data, test, seed, names).reports()
    return results
