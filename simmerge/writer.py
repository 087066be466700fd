"""Write merged checkpoints: sharded safetensors streamed tensor by tensor, staged then renamed.

The output layout (names, dtypes, shapes) is known before any tensor is computed, so each shard's
header is written first and tensors are appended as they are produced: memory holds one tensor,
not one shard. Everything goes into a temporary sibling directory that is renamed into place only
when complete, so a failure never leaves a half-written checkpoint at the output path.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from simmerge.checkpoint import AUX_FILES, DTYPE_CODES, INDEX_FILE, SINGLE_FILE, Checkpoint
from simmerge.errors import SimMergeError
from simmerge.paths import checked_path

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB' or a byte count → bytes (decimal units as Hugging Face uses them)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
        unit = match.group(2).upper() if match else "?"
        if not match or unit not in _SIZE_UNITS:
            raise SimMergeError(f"max shard size {text!r} is not a size like 5GB or 500MiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise SimMergeError(f"max shard size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for dim in self.shape:
            n *= dim
        return n


def plan_shards(layout: Sequence[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for tensor in layout:
        if shards[-1] and used + tensor.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def _shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedSafetensorsWriter:
    """Appends tensors in layout order to pre-headed shard files; writes the index on close."""

    def __init__(self, directory: Path, layout: Sequence[OutputTensor], max_shard_size: int) -> None:
        self.directory = directory
        self.shards = plan_shards(layout, max_shard_size)
        self.files = _shard_file_names(len(self.shards))
        self._order = [(shard_no, t) for shard_no, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._open_shard = -1
        self.bytes_written = 0

    def _start_shard(self, shard_no: int) -> None:
        if self._handle:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[shard_no]:
            header[tensor.name] = {
                "dtype": DTYPE_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
        self._handle = (self.directory / self.files[shard_no]).open("wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._open_shard = shard_no

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise SimMergeError(f"tensor {name!r} is not in the output layout")
        shard_no, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise SimMergeError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} written out of order; expected "
                f"{expected.name!r} {expected.shape} {expected.dtype}"
            )
        if shard_no != self._open_shard:
            self._start_shard(shard_no)
        assert self._handle is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise SimMergeError(f"output incomplete: tensor {missing!r} was never written")
        if self._handle:
            self._handle.close()
        if len(self.shards) > 1:
            weight_map = {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def staged_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; on success rename it into place, on failure delete it."""
    out_dir = Path(checked_path(out_dir, "output path")).absolute()
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise SimMergeError(f"{out_dir}: output path already exists (use --overwrite to replace it)")
    with _output_errors(out_dir, "cannot create the output there"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with _output_errors(out_dir, "writing the output failed; nothing was left at the output path"):
            yield staging
    except BaseException:  # an error, Ctrl-C or SIGTERM (the CLI turns it into SystemExit)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = None
    with _output_errors(out_dir, "cannot move the finished output into place"):
        if out_dir.exists():
            retired = out_dir.with_name(f".{out_dir.name}.replaced-{staging.name.rsplit('-', 1)[-1]}")
            out_dir.rename(retired)
        staging.rename(out_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def _output_errors(out_dir: Path, what: str) -> Iterator[None]:
    """An OSError while writing (a full disk, a path under a file or in /proc) names the output path.

    Reads raise CheckpointError themselves, so an OSError reaching here comes from writing.
    """
    try:
        yield
    except OSError as exc:
        raise SimMergeError(f"{out_dir}: {what} ({exc.strerror or exc})") from exc


def write_model_files(directory: Path, source: Checkpoint, dtype: torch.dtype, ties_lm_head: bool) -> None:
    """Copy config, generation config and tokenizer files from `source`, with the output dtype set."""
    config = dict(source.config)
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if not ties_lm_head and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # an explicit lm_head was merged and must be used
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in AUX_FILES:
        if (source.path / name).is_file():
            shutil.copy2(source.path / name, directory / name)
