"""Shared fixtures: the ci zoo (built once per machine and reused) and tiny random Llamas."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.factories import write_tiny_llama


@pytest.fixture(autouse=True, scope="session")
def torch_threads():
    """One torch thread per test process unless SIMMERGE_TEST_THREADS says otherwise.

    Test models are tiny; on a small shared machine extra intra-op threads only spin against other
    processes (a 3 s test measured 100 s with two threads under load).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SIMMERGE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def _test_cache() -> Path:
    return Path(os.environ.get("SIMMERGE_TEST_CACHE", "/tmp/simmerge-test-cache"))


@pytest.fixture(scope="session")
def ci_zoo() -> Path:
    """The `ci` zoo (seed 0): built on first use into the test cache, reused while its version holds."""
    from simmerge.zoo import ZOO_VERSION, build_zoo

    return build_zoo(_test_cache() / f"zoo-ci-0-v{ZOO_VERSION}", size="ci", seed=0, progress=False)


@pytest.fixture
def tiny_llama_factory(tmp_path: Path) -> Callable[..., Path]:
    """`make(name="m", seed=0, dtype=torch.float32, tie=False, tokenizer=False, **sizes) -> Path`.

    Random-init LlamaForCausalLM checkpoints (safetensors) under tmp_path; the same sizes give the
    same shapes, so checkpoints of one size can be merged. `tokenizer=True` adds the zoo's word-level
    tokenizer (vocab 64 covers it), so AutoTokenizer loads the directory too.
    """

    def make(
        name: str = "m",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        tie: bool = False,
        tokenizer: bool = False,
        **sizes,
    ) -> Path:
        path = write_tiny_llama(tmp_path / name, seed=seed, dtype=dtype, tie=tie, **sizes)
        if tokenizer:
            from simmerge.zoo.tasks import vocabulary
            from simmerge.zoo.tokenizer import build_tokenizer, save_verified_tokenizer

            save_verified_tokenizer(build_tokenizer(vocabulary()), path, ["copy : a b c = a b c"])
        return path

    return make
