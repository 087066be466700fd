"""Checkpoint reading: headers without loading, one tensor at a time, hashes, compatibility."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from simmerge.checkpoint import Checkpoint, check_compatible
from simmerge.errors import CheckpointError, IncompatibleCheckpointsError
from tests.factories import write_tiny_llama


def _raw_checkpoint(path, tensors, config=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_lists_tensors_and_reads_exact_values(tmp_path):
    ckpt_dir = write_tiny_llama(tmp_path / "m", seed=1)
    ckpt = Checkpoint.open(ckpt_dir)
    expected = load_file(str(ckpt_dir / "model.safetensors"))
    assert set(ckpt.names()) == set(expected)
    for name, tensor in expected.items():
        info = ckpt.info(name)
        assert info.shape == tuple(tensor.shape) and info.torch_dtype == tensor.dtype
        assert torch.equal(ckpt.read(name), tensor)


def test_sharded_checkpoint_reads_like_single_file(tmp_path):
    single = Checkpoint.open(write_tiny_llama(tmp_path / "single", seed=2))
    sharded = Checkpoint.open(write_tiny_llama(tmp_path / "sharded", seed=2, max_shard_size="20KB"))
    assert (sharded.path / "model.safetensors.index.json").exists()
    assert len({info.file for info in sharded.tensors.values()}) > 1
    assert set(single.names()) == set(sharded.names())
    for name in single.names():
        assert torch.equal(single.read(name), sharded.read(name))
    assert single.content_hash() == sharded.content_hash()  # same weights, other layout


def test_bfloat16_round_trip(tmp_path):
    ckpt = Checkpoint.open(write_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16))
    name = "model.layers.0.mlp.up_proj.weight"
    assert ckpt.info(name).dtype == "BF16"
    expected = load_file(str(ckpt.path / "model.safetensors"))[name]
    assert torch.equal(ckpt.read(name), expected)


def test_tied_lm_head_resolves_to_embedding(tmp_path):
    tied = Checkpoint.open(write_tiny_llama(tmp_path / "tied", tie=True))
    assert "lm_head.weight" not in tied.tensors
    assert torch.equal(tied.read("lm_head.weight"), tied.read("model.embed_tokens.weight"))
    untied = Checkpoint.open(write_tiny_llama(tmp_path / "untied", tie=False, seed=3))
    names = check_compatible([tied, untied])
    assert "lm_head.weight" in names  # the untied model's explicit head is merged too


def test_content_hash_changes_with_one_value(tmp_path):
    a = _raw_checkpoint(tmp_path / "a", {"w": torch.zeros(4, 4)})
    b = _raw_checkpoint(tmp_path / "b", {"w": torch.zeros(4, 4).index_fill_(0, torch.tensor([2]), 1e-7)})
    c = _raw_checkpoint(tmp_path / "c", {"w": torch.zeros(4, 4)})
    hash_a = Checkpoint.open(a).content_hash()
    assert hash_a != Checkpoint.open(b).content_hash()
    assert hash_a == Checkpoint.open(c).content_hash()
    # digests noted during a full read give the same hash as a fresh pass
    noted = Checkpoint.open(a)
    noted.read("w", digest=True)
    assert noted.content_hash() == hash_a


def test_compatibility_names_first_differing_tensor(tmp_path):
    a = Checkpoint.open(_raw_checkpoint(tmp_path / "a", {"x": torch.zeros(2, 3), "y": torch.zeros(4)}))
    shape = Checkpoint.open(_raw_checkpoint(tmp_path / "b", {"x": torch.zeros(2, 3), "y": torch.zeros(5)}))
    dtype = Checkpoint.open(
        _raw_checkpoint(tmp_path / "c", {"x": torch.zeros(2, 3), "y": torch.zeros(4).half()})
    )
    missing = Checkpoint.open(_raw_checkpoint(tmp_path / "d", {"x": torch.zeros(2, 3)}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"'y' has shape \[5\]"):
        check_compatible([a, shape])
    with pytest.raises(IncompatibleCheckpointsError, match=r"'y' has dtype F16"):
        check_compatible([a, dtype])
    with pytest.raises(IncompatibleCheckpointsError, match=r"'y' is missing from .*d"):
        check_compatible([a, missing])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no such checkpoint directory"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "no model.safetensors"),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.json").write_text("{}"),
                (p / "pytorch_model.bin").write_bytes(b"x"),
            ),
            "safetensors only",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.json").write_text("{}"),
                (p / "model.safetensors").write_bytes(b"abc"),
            ),
            "too short",
        ),
    ],
)
def test_bad_directories_are_named(tmp_path, setup, message):
    target = tmp_path / "bad"
    setup(target)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        Checkpoint.open(target)
    assert str(target) in str(excinfo.value)


def test_header_with_range_past_end_of_file(tmp_path):
    target = tmp_path / "trunc"
    target.mkdir()
    (target / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (target / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="'w' has byte range"):
        Checkpoint.open(target)


_READ_ONE = """
import sys, torch
from simmerge.checkpoint import Checkpoint

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

ckpt = Checkpoint.open(sys.argv[1])
before = rss()
tensor = ckpt.read("t3")
assert float(tensor[0, 0]) == 3.0 and float(tensor[-1, -1]) == 3.0
print(rss() - before)
"""


def test_reading_one_tensor_costs_about_that_tensor(tmp_path):
    """In a fresh process, holding one 64 MiB tensor read from a 256 MiB file costs ~64 MiB resident."""
    big = {f"t{i}": torch.full((4096, 4096), float(i)) for i in range(4)}
    path = _raw_checkpoint(tmp_path / "big", big)
    del big
    out = subprocess.run(
        [sys.executable, "-c", _READ_ONE, str(path)], capture_output=True, text=True, check=True
    )
    grown = int(out.stdout.strip())
    assert 60 * 2**20 < grown < 140 * 2**20  # one tensor (+ slack), never the whole file
