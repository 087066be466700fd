"""Training the zoo's tiny Llamas: completion-only causal-LM loss on sampled task batches.

Batches are right padded with no attention mask: under a causal mask real tokens never attend to
padding that follows them, and padded positions carry no loss, so the mask would only cost time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

IGNORE = -100


@dataclass(frozen=True)
class TrainResult:
    steps: int
    lr: float
    seed: int
    final_loss: float


def make_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): prompt then completion, labels only on the completion's tokens."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        sequence = torch.tensor(prompt + completion, dtype=torch.long)
        ids[row, : len(sequence)] = sequence
        labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
    return ids, labels


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    tokenizer,
    draw: Callable[[int], list[tuple[str, str]]],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> TrainResult:
    """AdamW for `steps` steps; the final loss is the mean over the last tenth of the steps."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    tail: list[float] = []
    tail_len = max(1, steps // 10)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        ids, labels = make_batch(tokenizer, draw(batch_size))
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        tail = [*tail[-(tail_len - 1) :], value] if tail_len > 1 else [value]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return TrainResult(steps, lr, seed, sum(tail) / len(tail))
