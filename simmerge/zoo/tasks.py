"""Synthetic sequence tasks of varying relatedness, generated deterministically from a seed.

Every task shares one prompt format, `<keyword> : <input tokens> =`, with the answer as the
completion, so one word-level vocabulary covers them all and a multi-task model can tell the tasks
apart by their first word. Relatedness is by design: reverse, rotate and swap are permutations; shift
and inc are per-token mappings (of letters, of digits); sort and dedupe filter or reorder; revshift
(reverse then shift) composes two trained skills and is never trained on. Digit-wise addition and
running sums were tried and left out: these tiny models stayed near chance on them within budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = tuple("abcdefghijkl")
DIGITS = tuple("0123456789")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PUNCTUATION = (":", "=")

Sequence = list[str]
Maker = Callable[[random.Random, int], tuple[Sequence, Sequence]]


@dataclass(frozen=True)
class TaskSpec:
    """A named synthetic task: `make(rng, length)` returns (prompt tokens after the colon, answer)."""

    name: str
    make: Maker
    trainable: bool = True  # False: evaluation only, a held-out task no expert trains on
    metric: str = "token_accuracy"
    steps_factor: float = 1.0  # harder tasks train longer (multiplies a recipe's expert steps)

    def example(self, rng: random.Random, min_len: int, max_len: int) -> tuple[str, str]:
        """One (prompt, completion) pair; the completion starts with a space, as text continues."""
        source, answer = self.make(rng, rng.randint(min_len, max_len))
        return f"{self.name} : {' '.join(source)} =", " " + " ".join(answer)


def _letters(rng: random.Random, n: int) -> Sequence:
    return [rng.choice(LETTERS) for _ in range(n)]


def _digits(rng: random.Random, n: int) -> Sequence:
    return [rng.choice(DIGITS) for _ in range(n)]


def _shifted(tokens: Sequence) -> Sequence:
    return [LETTERS[(LETTERS.index(t) + 1) % len(LETTERS)] for t in tokens]


def _copy(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = [rng.choice(LETTERS + DIGITS) for _ in range(n)]
    return tokens, list(tokens)


def _reverse(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n)
    return tokens, tokens[::-1]


def _sort(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n)
    return tokens, sorted(tokens)


def _shift(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n)
    return tokens, _shifted(tokens)


def _revshift(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n)
    return tokens, _shifted(tokens[::-1])


def _rotate(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n)
    return tokens, tokens[1:] + tokens[:1]


def _swap(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, n + n % 2)  # pairs need an even length
    swapped = [tokens[i + 1 - 2 * (i % 2)] for i in range(len(tokens))]
    return tokens, swapped


def _repeat(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _letters(rng, max(1, n - 1))
    return tokens, [t for t in tokens for _ in range(2)]


def _dedupe(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = [rng.choice(LETTERS[:4]) for _ in range(n + 2)]  # few symbols, so repeats are common
    return tokens, list(dict.fromkeys(tokens))


def _inc(rng: random.Random, n: int) -> tuple[Sequence, Sequence]:
    tokens = _digits(rng, n)
    return tokens, [str((int(t) + 1) % 10) for t in tokens]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("copy", _copy, trainable=False),
        TaskSpec("revshift", _revshift, trainable=False),
        TaskSpec("reverse", _reverse),
        TaskSpec("shift", _shift),
        TaskSpec("sort", _sort),
        TaskSpec("rotate", _rotate),
        TaskSpec("swap", _swap),
        TaskSpec("repeat", _repeat),
        TaskSpec("dedupe", _dedupe),
        TaskSpec("inc", _inc),
    )
}


def vocabulary() -> list[str]:
    """Every word any task can produce, in a fixed order (ids are stable across zoo builds)."""
    return [*SPECIAL_TOKENS, *PUNCTUATION, *TASKS, *LETTERS, *DIGITS]


def task_spec(name: str) -> TaskSpec:
    from simmerge.errors import NotFoundError

    if name not in TASKS:
        raise NotFoundError(f"unknown zoo task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def make_examples(
    spec: TaskSpec, count: int, seed: int, min_len: int, max_len: int, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """`count` distinct examples whose prompts are not in `exclude` (keeps evaluation data unseen)."""
    rng = random.Random(f"{spec.name}/{seed}")
    seen = set(exclude or ())
    examples: list[tuple[str, str]] = []
    attempts = 0
    while len(examples) < count and attempts < count * 50:
        attempts += 1
        prompt, completion = spec.example(rng, min_len, max_len)
        if prompt not in seen:
            seen.add(prompt)
            examples.append((prompt, completion))
    return examples


def sample_stream(
    specs: list[TaskSpec], seed: int, min_len: int, max_len: int, exclude: set[str]
) -> Callable[[int], list[tuple[str, str]]]:
    """A seeded batch sampler over a task mixture that never yields an evaluation prompt."""
    rng = random.Random(f"train/{'+'.join(s.name for s in specs)}/{seed}")

    def draw(batch_size: int) -> list[tuple[str, str]]:
        batch = []
        while len(batch) < batch_size:
            prompt, completion = rng.choice(specs).example(rng, min_len, max_len)
            if prompt not in exclude:
                batch.append((prompt, completion))
        return batch

    return draw
