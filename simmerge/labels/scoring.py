"""Merge in memory and score on every zoo task, in whichever process runs it.

A `Scorer` keeps what repeats across plans (opened checkpoints, loaded tasks, tokenizers) so a plan
costs one in-memory merge plus one evaluation. Checkpoints are scored through the same path as
merges (their own tensors as a float32 state dict), so an identity merge scores exactly like its parent.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simmerge import evaluation
from simmerge.labels.zoo import Zoo, read_zoo
from simmerge.resources import available_cores


@dataclass
class PlanScores:
    scores: dict[str, float]
    merge_seconds: float
    eval_seconds: float


class Scorer:
    def __init__(self, zoo: Zoo, seed: int = 0) -> None:
        self.zoo = zoo
        self.seed = seed
        self.tasks = [evaluation.load_task(t.file, t.metric, t.name, t.held_out) for t in zoo.tasks]
        self._checkpoints: dict[str, Any] = {}
        self._tokenizers: dict[Path, Any] = {}

    def checkpoint(self, name: str):
        from simmerge.checkpoint import Checkpoint

        if name not in self._checkpoints:
            self._checkpoints[name] = Checkpoint.open(self.zoo.resolve(name))
        return self._checkpoints[name]

    def content_hash(self, name: str) -> str:
        return self.checkpoint(name).content_hash()

    def score_checkpoint(self, name: str) -> dict[str, float]:
        import torch

        ckpt = self.checkpoint(name)
        state = {n: ckpt.read(n).to(torch.float32) for n in ckpt.names()}
        return self._evaluate(ckpt.path, state)

    def checkpoint_record(self, name: str) -> dict[str, Any]:
        """What the labels file caches per checkpoint: its scores and the weights' hash they belong to."""
        return {"name": name, "hash": self.content_hash(name), "scores": self.score_checkpoint(name)}

    def score_plan(self, plan_dict: dict[str, Any]) -> PlanScores:
        from simmerge.engine import merge_state_dict
        from simmerge.plan import Plan

        plan = Plan.from_dict(plan_dict)
        leaves = plan.checkpoints()
        started = time.perf_counter()
        state = merge_state_dict(
            plan,
            resolve=self.zoo.resolve,
            seed=self.seed,
            checkpoints={n: self.checkpoint(n) for n in leaves},
        )
        merged = time.perf_counter()
        scores = self._evaluate(self.checkpoint(leaves[0]).path, state)
        return PlanScores(scores, merged - started, time.perf_counter() - merged)

    def _evaluate(self, config_dir: Path, state: dict) -> dict[str, float]:
        if config_dir not in self._tokenizers:
            self._tokenizers[config_dir] = evaluation.load_tokenizer(config_dir)
        model = evaluation.load_model_with_state_dict(config_dir, state)
        return evaluation.evaluate_model(model, self._tokenizers[config_dir], self.tasks)


# -- worker processes: arguments and results travel as JSON text ---------------------------------
_WORKER: Scorer | None = None


def threads_per_worker(workers: int) -> int:
    """Split the machine's cores between worker processes so torch does not oversubscribe them."""
    return max(1, available_cores() // max(1, workers))


def init_worker(zoo_root: str, seed: int, threads: int) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    _WORKER = Scorer(read_zoo(zoo_root), seed)


def worker_score_checkpoint(name: str) -> str:
    assert _WORKER is not None
    return json.dumps(_WORKER.checkpoint_record(name))


def worker_score_plan(plan_json: str) -> str:
    assert _WORKER is not None
    return json.dumps(asdict(_WORKER.score_plan(json.loads(plan_json))))
