"""`label_zoo`: enumerate, skip what is stored, score checkpoints once, label the rest, store in chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from simmerge.errors import SimMergeError
from simmerge.labels import scoring
from simmerge.labels.grid import LabelPlan, enumerate_plans
from simmerge.labels.normalise import held_in_score, held_in_tasks, held_out_score
from simmerge.labels.store import LabelStore, exclusive_writer
from simmerge.labels.zoo import Zoo, check_architectures, read_zoo

CHUNK_ROWS = 32
CHUNK_SECONDS = 30.0


@dataclass
class LabelSummary:
    out: Path
    planned: int  # plans in the grid (after --limit)
    skipped: int  # already stored
    labelled: int  # merged and scored in this run
    checkpoints_scored: int  # parents and bases scored in this run (the rest came from the file)
    wall_seconds: float


def label_zoo(
    zoo_dir: str | Path,
    out: str | Path,
    *,
    grid: str = "default",
    workers: int = 1,
    triples: int | None = None,
    cross_family: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> LabelSummary:
    """Label the grid's plans over a zoo into `out` (Parquet); `limit` keeps the grid's first N plans."""
    zoo = read_zoo(zoo_dir)
    plans = enumerate_plans(zoo, grid, triples, cross_family, seed)
    if limit is not None:
        plans = plans[:limit]
    return label_plans(zoo, plans, out, workers=workers, seed=seed, progress=progress)


def label_plans(
    zoo: Zoo,
    plans: Sequence[LabelPlan],
    out: str | Path,
    *,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> LabelSummary:
    """Merge and score every plan not yet in `out`; rows are flushed in chunks, so a kill keeps them."""
    if workers < 1:
        raise SimMergeError(f"workers must be at least 1, got {workers}")
    with exclusive_writer(Path(out)):
        return _label_plans(zoo, plans, Path(out), workers, seed, progress)


def _label_plans(
    zoo: Zoo, plans: Sequence[LabelPlan], out: Path, workers: int, seed: int, progress: bool
) -> LabelSummary:
    started = time.perf_counter()
    store = LabelStore(out, zoo.catalog_sha256, str(zoo.root))
    todo = [p for p in plans if p.plan_id not in store.done]
    summary = LabelSummary(out, len(plans), len(plans) - len(todo), 0, 0, 0.0)
    if not todo:
        summary.wall_seconds = time.perf_counter() - started
        return summary
    _check_inputs(zoo, todo)
    with _Executor(zoo, seed, workers) as run:
        try:
            summary.checkpoints_scored = _score_checkpoints(store, zoo, _needed_checkpoints(todo), run)
            _label(zoo, todo, store, run, seed, summary, progress)
        finally:
            store.add_wall_seconds(time.perf_counter() - started)
            store.flush()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _needed_checkpoints(plans: Sequence[LabelPlan]) -> list[str]:
    """Parents (merged experts) and the bases held-out scores are normalised by."""
    names: list[str] = []
    for plan in plans:
        for name in (*plan.models, *([plan.base] if plan.base else [])):
            if name not in names:
                names.append(name)
    return names


def _check_inputs(zoo: Zoo, plans: Sequence[LabelPlan]) -> None:
    """Fail before any work if a checkpoint does not fit its family (or the families do not fit each other)."""
    families: dict[str, list[str]] = {}
    for plan in plans:
        for name in plan.plan.checkpoints():
            ckpt = zoo.checkpoint(name)
            base = ckpt.name if ckpt.role == "base" else str(ckpt.base)
            members = families.setdefault(base, [base])
            if name not in members:
                members.append(name)
    for members in families.values():
        check_architectures(zoo, members)
    crossing = sorted({b for p in plans if p.kind == "cross_family" for b in _bases_of(zoo, p)})
    if len(crossing) > 1:
        check_architectures(zoo, crossing)


def _bases_of(zoo: Zoo, plan: LabelPlan) -> set[str]:
    return {c.base if c.base else c.name for c in (zoo.checkpoint(n) for n in plan.plan.checkpoints())}


# -- execution: in this process, or in a pool of worker processes --------------------------------
Call = Callable[[str, Sequence[str]], Iterator[tuple[str, str]]]


class _Executor:
    """Context manager yielding `run(function_name, items) -> iterator of (item, JSON result)`."""

    def __init__(self, zoo: Zoo, seed: int, workers: int) -> None:
        self.zoo, self.seed, self.workers = zoo, seed, workers
        self.pool: ProcessPoolExecutor | None = None
        self.scorer: scoring.Scorer | None = None

    def __enter__(self) -> Call:
        if self.workers == 1:
            self.scorer = scoring.Scorer(self.zoo, self.seed)
            return self._local
        self.pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=get_context("spawn"),
            initializer=scoring.init_worker,
            initargs=(str(self.zoo.root), self.seed, scoring.threads_per_worker(self.workers)),
        )
        return self._pooled

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def _local(self, function: str, items: Sequence[str]) -> Iterator[tuple[str, str]]:
        scorer = self.scorer
        assert scorer is not None
        for item in items:
            if function == "checkpoint":
                yield item, json.dumps(scorer.checkpoint_record(item))
            else:
                yield item, json.dumps(asdict(scorer.score_plan(json.loads(item))))

    def _pooled(self, function: str, items: Sequence[str]) -> Iterator[tuple[str, str]]:
        assert self.pool is not None
        target = scoring.worker_score_checkpoint if function == "checkpoint" else scoring.worker_score_plan
        window = self.workers * 4  # bounded in-flight work: a kill loses little, memory stays flat
        queue = list(reversed(items))
        running: dict[Future[str], str] = {}
        while queue or running:
            while queue and len(running) < window:
                item = queue.pop()
                running[self.pool.submit(target, item)] = item
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield running.pop(future), future.result()


def _score_checkpoints(store: LabelStore, zoo: Zoo, names: Sequence[str], run: Call) -> int:
    """Score each parent and base once; scores stored in the labels file are reused while its weights match."""
    from simmerge.checkpoint import Checkpoint

    cached = store.checkpoint_scores
    missing = [n for n in names if n not in cached]
    stale = [
        n
        for n in names
        if n in cached and Checkpoint.open(zoo.resolve(n)).content_hash() != cached[n]["hash"]
    ]
    for _, result in run("checkpoint", missing + stale):
        record = json.loads(result)
        cached[record.pop("name")] = record
    return len(missing) + len(stale)


def _label(
    zoo: Zoo,
    todo: Sequence[LabelPlan],
    store: LabelStore,
    run: Call,
    seed: int,
    summary: LabelSummary,
    progress: bool,
) -> None:
    by_json = {json.dumps(p.plan.to_dict(), sort_keys=True): p for p in todo}
    last_flush = time.perf_counter()
    with tqdm(total=len(todo), desc="labelling", unit="plan", disable=not progress) as bar:
        for plan_json, result in run("plan", list(by_json)):
            store.add(build_row(zoo, by_json[plan_json], json.loads(result), store.checkpoint_scores, seed))
            summary.labelled += 1
            bar.update()
            if store.pending >= CHUNK_ROWS or time.perf_counter() - last_flush > CHUNK_SECONDS:
                store.flush()
                last_flush = time.perf_counter()


def build_row(
    zoo: Zoo, plan: LabelPlan, result: dict[str, Any], checkpoint_scores: dict[str, Any], seed: int
) -> dict[str, Any]:
    """One labels row (docs/labels.md): raw scores of merge, parents and base, and the normalised scores."""
    experts = list(dict.fromkeys(plan.models))
    parents = {e: checkpoint_scores[e]["scores"] for e in experts}
    trained_on = {e: zoo.checkpoint(e).tasks for e in experts}
    metrics = {t.name: t.metric for t in zoo.tasks}
    in_tasks = held_in_tasks(experts, trained_on, zoo.task_names())
    out_tasks = zoo.held_out_tasks()
    base_scores = checkpoint_scores[plan.base]["scores"] if plan.base else None
    merged = result["scores"]
    return {
        "plan_id": plan.plan_id,
        "plan_json": json.dumps(plan.plan.to_dict(), sort_keys=True),
        "kind": plan.kind,
        "method": plan.method,
        "params_json": plan.params_json,
        "models": list(plan.models),
        "model_a": plan.models[0],
        "model_b": plan.models[1] if len(plan.models) > 1 else None,
        "base": plan.base,
        "n_models": len(plan.models),
        "seed": seed,
        "scores_json": json.dumps(merged, sort_keys=True),
        "parent_scores_json": json.dumps(parents, sort_keys=True),
        "base_scores_json": json.dumps(base_scores, sort_keys=True) if base_scores is not None else None,
        "held_in_tasks": in_tasks,
        "held_out_tasks": out_tasks,
        "held_in_score": held_in_score(merged, parents, trained_on, in_tasks, metrics),
        "held_out_score": held_out_score(merged, base_scores, out_tasks, metrics),
        "merge_seconds": float(result["merge_seconds"]),
        "eval_seconds": float(result["eval_seconds"]),
        "created_at": datetime.now(UTC),
    }
