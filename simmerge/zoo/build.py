"""`build_zoo`: a tiny but real catalog of Llama checkpoints, tasks and probes, built once and cached.

Two families (independent random inits of one config, so same shapes) each get a base trained
briefly on copying, then experts fine-tuned from it on synthetic tasks. Everything is seeded, torch
runs on a fixed number of threads, and a build is written to a temporary directory renamed into
place, with a stamp of (zoo version, size, seed, tasks) that makes a second build of the same
directory instant.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmerge.engine import check_output_path
from simmerge.errors import ConflictError, SimMergeError
from simmerge.evaluation import quiet_hf_progress
from simmerge.writer import staged_directory
from simmerge.zoo.tasks import LETTERS, TASKS, TaskSpec, make_examples, sample_stream, task_spec, vocabulary

ZOO_VERSION = "3"
STAMP_FILE = ".simmerge-zoo.json"
BASE_TASK = "copy"
MIN_EXPERT_SCORE = 0.9


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between `ci` (seconds, for tests) and `full` (minutes, for demos)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    min_len: int
    max_len: int
    batch_size: int
    base_steps: int
    expert_steps: int
    lr: float
    eval_examples: int
    probes: int
    default_tasks: tuple[str, ...]
    experts_per_task: tuple[int, ...]  # by task position; the last value repeats
    multi_task: int  # how many tasks the multi-task expert covers (0: none)
    second_family_tasks: int

    def experts_for(self, position: int) -> int:
        return self.experts_per_task[min(position, len(self.experts_per_task) - 1)]


RECIPES: dict[str, Recipe] = {
    "ci": Recipe(
        hidden=64, layers=2, heads=4, kv_heads=2, min_len=3, max_len=5, batch_size=32,
        base_steps=100, expert_steps=220, lr=3e-3, eval_examples=64, probes=32,
        default_tasks=("copy", "reverse", "shift", "sort", "revshift"),
        experts_per_task=(2, 1), multi_task=0, second_family_tasks=2,
    ),
    "full": Recipe(
        hidden=64, layers=3, heads=4, kv_heads=2, min_len=3, max_len=7, batch_size=32,
        base_steps=200, expert_steps=300, lr=3e-3, eval_examples=200, probes=64,
        default_tasks=("copy", "reverse", "shift", "sort", "rotate", "swap", "repeat", "dedupe", "inc",
                       "revshift"),
        experts_per_task=(3, 2), multi_task=3, second_family_tasks=3,
    ),
}  # fmt: skip

# (learning-rate factor, steps factor) per expert of one task: experts differ in seed, lr and steps.
EXPERT_VARIANTS = ((1.0, 1.0), (0.7, 1.3), (1.4, 0.85))


@dataclass
class RunSpec:
    """One training run: a base (from a fresh init) or an expert (from its family's base)."""

    name: str
    family: str
    tasks: list[str]
    seed: int
    lr: float
    steps: int
    base: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return "expert" if self.base else "base"


# --------------------------------------------------------------------------- planning


def select_tasks(size: str, tasks: Sequence[str] | None) -> list[str]:
    """The task subset: the size's default, or the given names; copy (the bases' skill) is always in."""
    recipe = recipe_for(size)
    names = list(dict.fromkeys(tasks)) if tasks else list(recipe.default_tasks)
    for name in names:
        task_spec(name)
    if not any(TASKS[n].trainable for n in names):
        raise SimMergeError(f"task subset {','.join(names)} has no trainable task; experts need one")
    return names if BASE_TASK in names else [BASE_TASK, *names]


def recipe_for(size: str) -> Recipe:
    if size not in RECIPES:
        raise SimMergeError(f"unknown zoo size {size!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[size]


def plan_runs(recipe: Recipe, task_names: Sequence[str], seed: int) -> list[RunSpec]:
    """Family a: every trainable task's experts and the multi-task expert; family b: a few experts."""
    trainable = [n for n in task_names if TASKS[n].trainable]
    runs_a = _family_runs(recipe, "a", 0, trainable, seed, lambda position: recipe.experts_for(position))
    if recipe.multi_task and len(trainable) >= 2:
        mix = trainable[: recipe.multi_task]
        steps = round(sum(recipe.expert_steps * TASKS[t].steps_factor for t in mix))
        runs_a.append(RunSpec("a-multi", "a", mix, _seed(seed, 0, len(runs_a)), recipe.lr, steps, "a-base"))
    runs_b = _family_runs(recipe, "b", 1, trainable[: recipe.second_family_tasks], seed, lambda _: 1)
    return runs_a + runs_b


def _family_runs(
    recipe: Recipe,
    family: str,
    index: int,
    tasks: Sequence[str],
    seed: int,
    experts_for: Callable[[int], int],
) -> list[RunSpec]:
    """A base, then its experts; experts of one task differ in seed, learning rate and steps."""
    base = f"{family}-base"
    runs = [RunSpec(base, family, [BASE_TASK], _seed(seed, index, 0), recipe.lr, recipe.base_steps)]
    for position, task in enumerate(tasks):
        for variant in range(experts_for(position)):
            lr_factor, steps_factor = EXPERT_VARIANTS[variant % len(EXPERT_VARIANTS)]
            steps = round(recipe.expert_steps * steps_factor * TASKS[task].steps_factor)
            name = f"{family}-{task}-{variant + 1}"
            runs.append(
                RunSpec(
                    name, family, [task], _seed(seed, index, len(runs)), recipe.lr * lr_factor, steps, base
                )
            )
    return runs


def _seed(seed: int, family_index: int, run_index: int) -> int:
    return seed * 10_000 + family_index * 1_000 + run_index


# --------------------------------------------------------------------------- building


def build_zoo(
    root: str | Path,
    size: str = "ci",
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    threads: int = 1,
    protected: Iterable[Path] = (),
) -> Path:
    """Build (or find already built) the zoo in `root`; returns `root`.

    A directory already holding this very zoo (same version, size, seed and tasks) is returned at
    once; one holding anything else is an error unless `force`, which replaces it, and never when it
    is, holds or lies inside a `protected` (registered) checkpoint.
    """
    root = Path(root).expanduser().resolve()
    recipe = recipe_for(size)
    key = {"zoo_version": ZOO_VERSION, "size": size, "seed": seed, "tasks": select_tasks(size, tasks)}
    if _stamp(root) == key:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f".{root.name}.lock"):
        if _stamp(root) == key:  # another process built it while we waited
            return root
        if root.exists() and any(root.iterdir()) and not force:
            found = _stamp(root)
            what = f"a different zoo ({found})" if found else "files that are not a zoo"
            raise ConflictError(f"{root} already holds {what}; pass --force to replace it")
        check_output_path(root, (), protected, choose="DIRECTORY")
        with staged_directory(root, overwrite=True) as staging, _torch_threads(threads), quiet_hf_progress():
            _build_into(staging, recipe, key, progress)
    return root


def _stamp(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One builder per directory at a time (concurrent test sessions share the cache)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Fixed intra-op threads during the build (reproducible numerics), restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build_into(out: Path, recipe: Recipe, key: dict[str, Any], progress: bool) -> None:
    from simmerge.zoo.tokenizer import build_tokenizer

    seed, task_names = key["seed"], key["tasks"]
    tokenizer = build_tokenizer(vocabulary())
    eval_sets = _write_tasks(out / "tasks", recipe, task_names, seed)
    probes = _write_probes(out / "probes.jsonl", recipe, task_names, seed)
    runs = plan_runs(recipe, task_names, seed)
    unseen = {prompt for examples in eval_sets.values() for prompt, _ in examples}
    check_texts = [text for examples in eval_sets.values() for pair in examples[:4] for text in pair]
    check_texts += probes[:8]
    models: dict[str, Any] = {}
    for run in runs:
        model = _init_model(recipe, run.seed) if run.base is None else copy.deepcopy(models[run.base])
        _train_and_check(model, tokenizer, run, recipe, eval_sets, unseen, progress)
        _save_checkpoint(model, tokenizer, out / "checkpoints" / run.name, check_texts)
        if run.base is None:
            models[run.name] = model
    trained = {task for run in runs if run.base for task in run.tasks}
    catalog = {
        **{k: key[k] for k in ("zoo_version", "size", "seed")},
        "tasks": [
            {"name": n, "file": f"tasks/{n}.jsonl", "metric": TASKS[n].metric, "held_out": n not in trained}
            for n in task_names
        ],
        "probes": "probes.jsonl",
        "checkpoints": [_catalog_entry(run) for run in runs],
    }
    (out / "catalog.json").write_text(json.dumps(catalog, indent=2) + "\n")
    (out / STAMP_FILE).write_text(json.dumps(key) + "\n")


def _write_tasks(
    folder: Path, recipe: Recipe, task_names: Sequence[str], seed: int
) -> dict[str, list[tuple[str, str]]]:
    folder.mkdir(parents=True)
    eval_sets = {}
    for name in task_names:
        examples = make_examples(TASKS[name], recipe.eval_examples, seed, recipe.min_len, recipe.max_len)
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in examples]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        eval_sets[name] = examples
    return eval_sets


def _write_probes(path: Path, recipe: Recipe, task_names: Sequence[str], seed: int) -> list[str]:
    """Unlabeled probes: a task's prompt format with random words where the answer would be."""
    rng = random.Random(f"probes/{seed}")
    words = [*LETTERS, *"0123456789"]
    texts = []
    for index in range(recipe.probes):
        spec: TaskSpec = TASKS[task_names[index % len(task_names)]]
        prompt, completion = spec.example(rng, recipe.min_len, recipe.max_len)
        noise = " ".join(rng.choice(words) for _ in completion.split())
        texts.append(f"{prompt} {noise}")
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return texts


def _init_model(recipe: Recipe, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    words = vocabulary()
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.hidden * 2,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=words.index("<pad>"),
        bos_token_id=words.index("<bos>"),
        eos_token_id=words.index("<eos>"),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def _train_and_check(
    model,
    tokenizer,
    run: RunSpec,
    recipe: Recipe,
    eval_sets: dict[str, list[tuple[str, str]]],
    unseen: set[str],
    progress: bool,
) -> None:
    """Train, score on the run's own tasks, and fail the build if an expert missed the bar."""
    from simmerge.evaluation import Example, Task, evaluate_model
    from simmerge.zoo.training import train

    specs = [TASKS[t] for t in run.tasks]
    draw = sample_stream(specs, run.seed, recipe.min_len, recipe.max_len, unseen)
    result = train(model, tokenizer, draw, steps=run.steps, lr=run.lr, seed=run.seed,
                   batch_size=recipe.batch_size, desc=run.name, progress=progress)  # fmt: skip
    own = [Task(t, tuple(Example(p, c) for p, c in eval_sets[t])) for t in run.tasks]
    scores = {t: round(s, 4) for t, s in evaluate_model(model, tokenizer, own, "token_accuracy").items()}
    if run.base is not None:
        failed = {t: s for t, s in scores.items() if s < MIN_EXPERT_SCORE}
        if failed:
            task, score = next(iter(failed.items()))
            raise SimMergeError(
                f"zoo expert {run.name} reached token_accuracy {score:.3f} < {MIN_EXPERT_SCORE} on its task "
                f"{task!r} after {run.steps} steps at lr {run.lr:g}"
            )
    if progress:
        from tqdm import tqdm

        tqdm.write(
            f"{run.name}: token accuracy {scores} after {run.steps} steps (loss {result.final_loss:.4f})"
        )
    run.result = {
        "seed": run.seed,
        "lr": run.lr,
        "steps": run.steps,
        "final_loss": round(result.final_loss, 6),
        "own_task_score": round(sum(scores.values()) / len(scores), 6),
    }


def _save_checkpoint(model, tokenizer, directory: Path, check_texts: Sequence[str]) -> None:
    from simmerge.zoo.tokenizer import save_verified_tokenizer

    model.save_pretrained(directory, safe_serialization=True)
    save_verified_tokenizer(tokenizer, directory, check_texts)


def _catalog_entry(run: RunSpec) -> dict[str, Any]:
    return {
        "name": run.name,
        "path": f"checkpoints/{run.name}",
        "role": run.role,
        "base": run.base,
        "family": run.family,
        "tasks": run.tasks,
        "train": run.result,
    }


def read_catalog(root: str | Path) -> dict[str, Any]:
    """A built zoo's catalog.json."""
    from simmerge.errors import NotFoundError

    path = Path(root) / "catalog.json"
    if not path.is_file():
        raise NotFoundError(f"{root}: no catalog.json (build one with `simmerge zoo build`)")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # bad JSON or not UTF-8
        raise SimMergeError(f"{path}: not valid JSON") from exc
    _check_catalog(data, path)
    return data


# catalog.json's fields: list name -> (required string fields, optional fields and their types).
_CATALOG_ITEMS: dict[str, tuple[tuple[str, ...], dict[str, tuple[type, ...]]]] = {
    "tasks": (("name", "file"), {"metric": (str,), "held_out": (bool,)}),
    "checkpoints": (
        ("name", "path"),
        {"base": (str, type(None)), "family": (str, type(None)), "role": (str,), "tasks": (list,)},
    ),
}


def _check_catalog(data: Any, path: Path) -> None:
    """A catalog.json of the wrong shape is an error naming the file and the field, not a KeyError."""
    if not isinstance(data, dict):
        raise SimMergeError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    for key, (required, optional) in _CATALOG_ITEMS.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            raise SimMergeError(f"{path}: {key!r} must be a list")
        for number, item in enumerate(items, start=1):
            where = f"{path}: {key}[{number}]"
            if not isinstance(item, dict):
                raise SimMergeError(f"{where} is a JSON {type(item).__name__}, not an object")
            for field_name in required:
                if not isinstance(item.get(field_name), str) or not item[field_name]:
                    raise SimMergeError(f"{where} needs a string {field_name!r}")
            for field_name, types in optional.items():
                if field_name in item and not isinstance(item[field_name], types):
                    raise SimMergeError(f"{where} has {field_name!r} of the wrong type: {item[field_name]!r}")
            if not all(isinstance(t, str) for t in item.get("tasks", [])):
                raise SimMergeError(f"{where} has 'tasks' that are not all strings")
