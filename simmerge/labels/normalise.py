"""Normalised scores of a merge (docs/design.md §4): held-in tasks by their expert, held-out by the base.

Ratios assume a metric where higher is better and zero means nothing learned (token accuracy, exact
match). A `loglik` score is turned into the geometric-mean token probability `exp(loglik)` first, so
its ratio means the same thing. A task whose reference scores zero has no ratio and is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Scores = Mapping[str, float]


def as_ratio_scale(score: float, metric: str) -> float:
    return math.exp(score) if metric == "loglik" else score


def held_in_tasks(
    experts: Sequence[str], trained_on: Mapping[str, Iterable[str]], known_tasks: Iterable[str]
) -> list[str]:
    """The merged experts' trained tasks that the zoo evaluates, each once, in first-seen order."""
    known = set(known_tasks)
    tasks: list[str] = []
    for expert in experts:
        for task in trained_on.get(expert, ()):
            if task in known and task not in tasks:
                tasks.append(task)
    return tasks


def held_in_score(
    merged: Scores,
    parents: Mapping[str, Scores],
    trained_on: Mapping[str, Iterable[str]],
    tasks: Sequence[str],
    metrics: Mapping[str, str] | None = None,
) -> float | None:
    """Mean over `tasks` of merged / best parent trained on that task; None when no task has a ratio."""
    metrics = metrics or {}
    ratios = []
    for task in tasks:
        references = [
            as_ratio_scale(parents[name][task], metrics.get(task, ""))
            for name, trained in trained_on.items()
            if name in parents and task in trained and task in parents[name]
        ]
        ratio = _ratio(merged.get(task), max(references, default=None), metrics.get(task, ""))
        if ratio is not None:
            ratios.append(ratio)
    return sum(ratios) / len(ratios) if ratios else None


def held_out_score(
    merged: Scores, base: Scores | None, tasks: Sequence[str], metrics: Mapping[str, str] | None = None
) -> float | None:
    """Mean over the held-out `tasks` of merged / base; None without a base or a task with a ratio."""
    if base is None:
        return None
    metrics = metrics or {}
    ratios = [
        r
        for task in tasks
        if (
            r := _ratio(
                merged.get(task), _scaled(base.get(task), metrics.get(task, "")), metrics.get(task, "")
            )
        )
        is not None
    ]
    return sum(ratios) / len(ratios) if ratios else None


def _scaled(score: float | None, metric: str) -> float | None:
    return None if score is None else as_ratio_scale(score, metric)


def _ratio(score: float | None, reference: float | None, metric: str) -> float | None:
    if score is None or reference is None or not reference > 0:
        return None
    return as_ratio_scale(score, metric) / reference
