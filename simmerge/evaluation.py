"""Task evaluation for any Hugging Face causal LM: token accuracy, exact match, log-likelihood.

One code path scores a checkpoint on disk and weights held in memory (`load_model_with_state_dict`),
so the label harness can score `merge_state_dict` output without writing it, and both give the same
numbers. Prompts and completions are tokenized separately and concatenated, so the completion's
tokens are exactly the ones scored whatever the tokenizer does at the boundary. Batches are padded
with an attention mask and explicit position ids, so a score never depends on the batch size or on
which side is padded.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simmerge.errors import CheckpointError, NotFoundError, SimMergeError
from simmerge.paths import checked_path

if TYPE_CHECKING:
    import torch

METRICS = ("token_accuracy", "exact_match", "loglik")
DEFAULT_METRIC = "token_accuracy"


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Task:
    """A named evaluation: its name is the file's stem unless a catalog says otherwise."""

    name: str
    examples: tuple[Example, ...]
    metric: str = DEFAULT_METRIC
    path: Path | None = None
    held_out: bool = False


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise SimMergeError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def _line(where: str, number: int) -> str:
    """`file.jsonl:3` for a file; `task 'x', line 3` for an upload named by its label."""
    return f"{where}, line {number}" if where.startswith("task ") else f"{where}:{number}"


def _read_jsonl(path: Path, kind: str, label: str | None = None) -> Iterable[tuple[str, dict[str, Any]]]:
    """Yield (location, object), skipping blank lines; a line that is not UTF-8 JSON names the file
    (or `label`, for an upload whose stored name means nothing to its sender) and the line."""
    path = Path(checked_path(path, f"{kind} file"))
    if not path.is_file():
        raise NotFoundError(f"{kind} file {path} does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            at = _line(label or str(path), number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SimMergeError(f"{at}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SimMergeError(f"{at}: not valid JSON ({exc.msg})") from None
            except (ValueError, RecursionError):
                raise SimMergeError(f"{at}: not valid JSON") from None
            if not isinstance(item, dict):
                raise SimMergeError(f"{at}: expected a JSON object, got {type(item).__name__}")
            yield at, item


def _string_field(item: dict[str, Any], field: str, at: str, empty_ok: bool = True) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        problem = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise SimMergeError(f"{at}: field {field!r} is {problem}")
    if not empty_ok and not value:
        raise SimMergeError(f"{at}: field {field!r} is empty")
    return value


def load_task(
    path: str | Path,
    metric: str = DEFAULT_METRIC,
    name: str | None = None,
    held_out: bool = False,
    label: str | None = None,
) -> Task:
    """Read a `{"prompt", "completion"}` JSON Lines file; an empty file or a bad line is an error
    (an empty completion too: it has no tokens to score)."""
    path = Path(checked_path(path, "task file"))
    examples = tuple(
        Example(_string_field(item, "prompt", at), _string_field(item, "completion", at, empty_ok=False))
        for at, item in _read_jsonl(path, "task", label)
    )
    if not examples:
        raise SimMergeError(f"{label or path}: task file has no examples")
    return Task(name or path.stem, examples, _check_metric(metric), path, held_out)


def load_probes(path: str | Path) -> list[str]:
    """Read a `{"text"}` JSON Lines file of unlabeled probes; an empty file or a bad line is an error."""
    path = Path(path)
    texts = [_string_field(item, "text", at) for at, item in _read_jsonl(path, "probe")]
    if not texts:
        raise SimMergeError(f"{path}: probe file has no probes")
    return texts


def load_tasks(source: str | Path, names: Sequence[str] | None = None) -> list[Task]:
    """Tasks from a zoo directory (its catalog.json gives metrics), a folder of .jsonl files, or one file."""
    source = Path(checked_path(source, "task source"))
    if source.is_file():
        tasks = [load_task(source)]
    elif (source / "catalog.json").is_file():
        from simmerge.zoo.build import read_catalog

        catalog = read_catalog(source)
        tasks = [
            load_task(source / t["file"], t.get("metric", DEFAULT_METRIC), t["name"], bool(t.get("held_out")))
            for t in catalog.get("tasks", [])
        ]
    elif source.is_dir():
        tasks = [load_task(p) for p in sorted(source.glob("*.jsonl"))]
        if not tasks:
            raise SimMergeError(f"{source}: no *.jsonl task files")
    else:
        raise NotFoundError(f"task source {source} does not exist")
    if names:
        by_name = {t.name: t for t in tasks}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise NotFoundError(f"{source}: no task named {missing[0]!r}; known: {', '.join(by_name)}")
        tasks = [by_name[n] for n in names]
    return tasks


# --------------------------------------------------------------------------- models


def load_model(checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint directory, offline, in eval mode (float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from simmerge.checkpoint import Checkpoint

    path = Checkpoint.open(checkpoint_dir).path  # safetensors only, headers validated: no pickle
    with quiet_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True
        )
    return model.to(device).eval(), load_tokenizer(path)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """No transformers progress bars (loading, saving): the label harness loads hundreds of tiny models."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(checkpoint_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(checkpoint_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_dir}: no loadable tokenizer ({exc})") from None


def load_model_with_state_dict(
    checkpoint_dir: str | Path, state_dict: Mapping[str, torch.Tensor], device: str = "cpu"
):
    """A float32 model with `checkpoint_dir`'s config and `state_dict`'s weights, never written to disk.

    Every parameter must come from `state_dict` (a tied lm_head may be absent); a missing or unknown
    name is an error, so a merge that dropped a tensor cannot be scored with random weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(checkpoint_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    try:
        result = model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=False)
    except RuntimeError as exc:  # a shape that does not fit the config
        detail = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"state dict does not fit {checkpoint_dir}'s config: {detail}") from None
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"state dict for {checkpoint_dir} lacks tensor {missing[0]!r}")
    if result.unexpected_keys:
        raise CheckpointError(
            f"state dict for {checkpoint_dir} has unknown tensor {result.unexpected_keys[0]!r}"
        )
    if tied:
        model.tie_weights()
    return model.to(device).eval()


# --------------------------------------------------------------------------- scoring


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's special tokens, completion ids without any)."""
    prompt = tokenizer(example.prompt)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if not prompt:  # nothing would predict the completion's first token
        raise SimMergeError(f"prompt {example.prompt!r} has no tokens")
    if not completion:
        raise SimMergeError(f"completion {example.completion!r} of prompt {example.prompt!r} has no tokens")
    return list(prompt), list(completion)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """(input_ids, attention_mask, position_ids): positions count real tokens only, so left padding
    gives every sequence the positions it would have alone."""
    import torch

    if side not in ("left", "right"):
        raise SimMergeError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _teacher_forced(
    model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, side: str
) -> list[tuple[int, int, float]]:
    """Per example: (correct completion tokens, completion tokens, summed log-likelihood)."""
    import torch

    device = _model_device(model)
    ids, mask, positions = pad_batch([p + c for p, c in encoded], pad_id, side)
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    width = ids.shape[1]
    results = []
    for row, (prompt, completion) in enumerate(encoded):
        offset = width - len(prompt) - len(completion) if side == "left" else 0
        start = offset + len(prompt)  # first completion token; predicted at start - 1
        targets = torch.tensor(completion, dtype=torch.long)
        predicted = logprobs[row, start - 1 : start - 1 + len(completion)]
        correct = int((predicted.argmax(dim=-1) == targets).sum())
        loglik = float(predicted.gather(1, targets[:, None]).sum())
        results.append((correct, len(completion), loglik))
    return results


def _greedy(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[bool]:
    """Greedy-decode as many tokens as each completion has (left padded, KV cache); True on a match."""
    import torch

    device = _model_device(model)
    ids, mask, positions = pad_batch([p for p, _ in encoded], pad_id, "left")
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    steps = max(len(c) for _, c in encoded)
    generated = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range(steps):
            next_ids = out.logits[:, -1].argmax(dim=-1)
            generated.append(next_ids.cpu())
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    tokens = torch.stack(generated, dim=1).tolist()
    return [row[: len(c)] == c for row, (_, c) in zip(tokens, encoded, strict=True)]


def score_task(
    model, tokenizer, task: Task, metric: str | None = None, batch_size: int = 32, padding_side: str = "right"
) -> float:
    """One task's score: token accuracy (micro over completion tokens), exact match, or mean log-likelihood."""
    metric = _check_metric(metric or task.metric)
    if batch_size < 1:
        raise SimMergeError(f"batch size must be positive, got {batch_size}")
    encoded = [encode_example(tokenizer, e) for e in task.examples]
    pad_id = _pad_id(tokenizer)
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    if metric == "exact_match":
        matches = [m for batch in batches for m in _greedy(model, batch, pad_id)]
        return sum(matches) / len(matches)
    counts = [r for batch in batches for r in _teacher_forced(model, batch, pad_id, padding_side)]
    tokens = sum(n for _, n, _ in counts)
    if metric == "token_accuracy":
        return sum(c for c, _, _ in counts) / tokens
    loglik = sum(ll for _, _, ll in counts) / tokens
    return loglik if math.isfinite(loglik) else float("-inf")


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[Task],
    metric: str | None = None,
    batch_size: int = 32,
    padding_side: str = "right",
) -> dict[str, float]:
    """{task name: score} for a loaded model; `metric` overrides each task's own metric."""
    if metric is not None:
        _check_metric(metric)
    was_training = model.training
    model.eval()
    try:
        return {t.name: score_task(model, tokenizer, t, metric, batch_size, padding_side) for t in tasks}
    finally:
        model.train(was_training)


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    tasks: Sequence[Task],
    metric: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, float]:
    """{task name: score} for a checkpoint directory."""
    model, tokenizer = load_model(checkpoint_dir, device)
    return evaluate_model(model, tokenizer, tasks, metric, batch_size)


def evaluate_state_dict(
    checkpoint_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    metric: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, float]:
    """Score in-memory weights (a merge's output) with `checkpoint_dir`'s config and tokenizer."""
    model = load_model_with_state_dict(checkpoint_dir, state_dict, device)
    return evaluate_model(model, load_tokenizer(checkpoint_dir), tasks, metric, batch_size)
