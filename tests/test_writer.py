"""The streaming writer: shards, index, staging and rename."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from simmerge.errors import SimMergeError
from simmerge.writer import OutputTensor, ShardedSafetensorsWriter, parse_size, staged_directory


def _tensors():
    return {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(100, dtype=torch.bfloat16) * 1.5,
        "c": torch.arange(7, dtype=torch.int64),
    }


@pytest.mark.parametrize("max_size", [10_000, 100])
def test_shards_read_back_exactly(tmp_path, max_size):
    tensors = _tensors()
    layout = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, layout, max_size)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    loaded = {}
    for file in files:
        loaded.update(load_file(str(tmp_path / file)))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    if max_size == 100:
        assert len(files) == 3
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["b"] == "model-00002-of-00003.safetensors"
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in layout)
    else:
        assert files == ["model.safetensors"]


def test_out_of_order_and_incomplete_writes_are_errors(tmp_path):
    layout = [OutputTensor("a", torch.float32, (2,)), OutputTensor("b", torch.float32, (2,))]
    writer = ShardedSafetensorsWriter(tmp_path, layout, 1000)
    with pytest.raises(SimMergeError, match=r"'b'.*expected 'a'"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(SimMergeError, match="'b' was never written"):
        writer.close()


def test_staged_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(out) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_directory(out) as staging:
        (staging / "done").write_text("x")
    assert (out / "done").exists()
    with pytest.raises(SimMergeError, match="already exists"), staged_directory(out):
        pass
    with staged_directory(out, overwrite=True) as staging:
        (staging / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(SimMergeError, match="'5 parsecs'"):
        parse_size("5 parsecs")
