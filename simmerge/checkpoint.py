"""Read Hugging Face safetensors checkpoints one tensor at a time.

Only the safetensors headers are parsed up front; a tensor's bytes are read with `os.preadv` into a
buffer of exactly its size, so reading costs one tensor of memory, never a whole shard (no mmap of
multi-GB files whose touched pages would count towards the process's resident set).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from simmerge.errors import CheckpointError, IncompatibleCheckpointsError
from simmerge.paths import checked_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors file we should trust
# Weight files that are pickles (PyTorch's formats): refused by name, never opened.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
# Files that describe the model rather than its weights; a merge copies them from its reference.
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Names under which architectures store their input embedding, for resolving a tied lm_head.
_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight")
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching any other."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header into absolute byte ranges, validating every field.

    The header is attacker-shaped input (a catalog registers files it did not write), so every
    deviation from the format is a CheckpointError naming the file and tensor, never a crash later
    inside a merge.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _HEADER_LIMIT:
                raise CheckpointError(f"{file}: safetensors header of {header_len} bytes is implausible")
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{file}: safetensors header length {header_len} runs past the end of the file ({size} bytes)"
                )
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise CheckpointError(f"{file}: safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise CheckpointError(f"{file}: __metadata__ is not an object")
            continue
        infos[name] = _tensor_info(file, name, entry, data_start, size)
    return infos


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(file: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked: known dtype, non-negative integer shape, a byte range inside the file
    whose length is exactly shape × itemsize."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is described by a JSON {type(entry).__name__}, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end or data_start + end > size:
        raise CheckpointError(f"{where} has byte range [{begin}, {end}) outside the file")
    info = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, end - begin)
    expected = info.numel * DTYPES[dtype].itemsize
    if expected != info.nbytes:
        raise CheckpointError(
            f"{where} has shape {shape} of {dtype} ({expected} bytes) over a byte range of {info.nbytes} bytes"
        )
    return info


@lru_cache(maxsize=1)
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="simmerge-digest")


def _sha256(buffer: bytearray) -> bytes:
    return hashlib.sha256(buffer).digest()


def _pread_exact(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` from `offset`, looping because one preadv may return fewer bytes than asked."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def _read_json_object(path: Path, missing: str) -> dict:
    """A JSON file that must hold an object; anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid JSON") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def _check_config(config: dict, path: Path) -> None:
    """The config fields SimMerge itself reads must have their documented types."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: 'architectures' must be a list of strings, not {archs!r}")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise CheckpointError(f"{path}: 'model_type' must be a string, not {config['model_type']!r}")
    if "text_config" in config and not isinstance(config["text_config"], dict):
        raise CheckpointError(f"{path}: 'text_config' must be an object")


def _shard_path(root: Path, index: Path, name: str) -> Path:
    """A shard named by an index: a file name inside the checkpoint, never an absolute path or `..`."""
    relative = Path(checked_path(name, f"{index}: shard name"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise CheckpointError(f"{index}: shard {name!r} is not a file inside {root}")
    return root / relative


class Checkpoint:
    """A Hugging Face model directory whose weights are safetensors (one file or an index of shards)."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.config = config
        self.tensors = tensors
        self._hash: str | None = None
        self._tensor_digests: dict[str, bytes] = {}
        self._pending_digests: dict[str, Future[bytes]] = {}
        self.weight_files: list[Path] = sorted({t.file for t in tensors.values()})

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        root = Path(checked_path(path))
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such checkpoint directory")
        config = _read_json_object(root / "config.json", f"{root}: not a checkpoint (no config.json)")
        _check_config(config, root / "config.json")
        tensors: dict[str, TensorInfo] = {}
        weight_files = cls._weight_files(root)
        for file in weight_files:
            for name, info in read_safetensors_header(file).items():
                if name in tensors:  # which copy is the weight would depend on shard order
                    raise CheckpointError(
                        f"{root}: tensor {name!r} is in both {tensors[name].file} and {file}"
                    )
                tensors[name] = info
        if not tensors:
            raise CheckpointError(f"{root}: the safetensors files hold no tensors")
        checkpoint = cls(root, config, tensors)
        checkpoint.weight_files = weight_files
        return checkpoint

    def files(self) -> list[Path]:
        """Every file this checkpoint makes SimMerge read: config, index, shards, tokenizer and the
        other model files a merge copies. A service checks each one (not only the directory) against
        its roots, since any of them may be a symlink."""
        names = ["config.json", INDEX_FILE, *AUX_FILES]
        described = [self.path / n for n in names if (self.path / n).is_file()]
        return list(dict.fromkeys([*described, *self.weight_files]))

    @staticmethod
    def _weight_files(root: Path) -> list[Path]:
        index = root / INDEX_FILE
        if index.is_file():
            data = _read_json_object(index, f"{index}: no such file")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must be an object of tensor name to shard file")
            files = [_shard_path(root, index, name) for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard {missing[0]}, which does not exist")
            return files
        if (root / SINGLE_FILE).is_file():
            return [root / SINGLE_FILE]
        try:
            pickled = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        except OSError as exc:
            raise CheckpointError(f"{root}: cannot list the directory ({exc.strerror or exc})") from exc
        if pickled:
            raise CheckpointError(
                f"{pickled[0]}: pickle weights are never loaded; SimMerge reads safetensors only"
            )
        raise CheckpointError(f"{root}: not a checkpoint (no {SINGLE_FILE} or {INDEX_FILE})")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tied_embeddings(self) -> bool:
        """True when the lm_head is the input embedding (stored once, or not at all)."""
        text_config = self.config.get("text_config", self.config)
        return bool(text_config.get("tie_word_embeddings", self.config.get("tie_word_embeddings", False)))

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    def names(self) -> list[str]:
        """Stored tensor names in file order (shard by shard, offset by offset)."""
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.start))]

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def _resolve(self, name: str) -> TensorInfo | None:
        info = self.tensors.get(name)
        if info is None and name == LM_HEAD and self.tied_embeddings:
            info = next((self.tensors[n] for n in _EMBEDDING_NAMES if n in self.tensors), None)
        return info

    def info(self, name: str) -> TensorInfo:
        info = self._resolve(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return info

    def read(self, name: str, device: str | torch.device = "cpu", *, digest: bool = False) -> torch.Tensor:
        """Read one tensor; memory cost is that tensor alone.

        With `digest`, the tensor's sha256 is taken on the way, on a helper thread (hashlib releases
        the GIL), so a caller that reads every tensor anyway (the merge engine) gets `content_hash()`
        without a second pass over the files and without waiting for the hash. Such a caller calls
        `finish_digests()` once it has converted the tensor, so the raw bytes are not held longer.
        """
        info = self.info(name)
        buffer = bytearray(info.nbytes)
        if info.nbytes:
            try:
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    _pread_exact(fd, memoryview(buffer), info.start, info.file)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise CheckpointError(
                    f"{info.file}: cannot read tensor {name!r} ({exc.strerror or exc})"
                ) from exc
        if digest and info.name not in self._tensor_digests and info.name not in self._pending_digests:
            self._pending_digests[info.name] = _hash_pool().submit(_sha256, buffer)
        flat = (
            torch.frombuffer(buffer, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
        )
        tensor = flat.view(info.torch_dtype).reshape(info.shape)
        return tensor.to(device) if torch.device(device).type != "cpu" else tensor

    def iter_tensors(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.read(name, device)

    @cached_property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def content_hash(self) -> str:
        """sha256 over (name, dtype, shape, sha256 of bytes) of every tensor, in name order.

        Hashing tensors rather than files makes the hash independent of sharding and header layout,
        so a re-sharded copy of the same weights is recognised as the same checkpoint; per-tensor
        digests let a full read that happens anyway (a merge) provide them.
        """
        if self._hash is None:
            self.finish_digests()
            combined = hashlib.sha256()
            for name in sorted(self.tensors):
                info = self.tensors[name]
                if name not in self._tensor_digests:
                    self._tensor_digests[name] = self._digest_tensor(info)
                combined.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0".encode())
                combined.update(self._tensor_digests[name])
            self._hash = combined.hexdigest()
        return self._hash

    def finish_digests(self) -> None:
        """Wait for the digests of tensors read so far."""
        for name, future in self._pending_digests.items():
            self._tensor_digests[name] = future.result()
        self._pending_digests.clear()

    @staticmethod
    def _digest_tensor(info: TensorInfo) -> bytes:
        digest = hashlib.sha256()
        try:
            with info.file.open("rb") as handle:
                handle.seek(info.start)
                remaining = info.nbytes
                while remaining:
                    chunk = handle.read(min(remaining, 16 * 2**20))
                    if not chunk:
                        raise CheckpointError(f"{info.file}: truncated inside tensor {info.name!r}")
                    digest.update(chunk)
                    remaining -= len(chunk)
        except OSError as exc:
            raise CheckpointError(
                f"{info.file}: cannot read tensor {info.name!r} ({exc.strerror or exc})"
            ) from exc
        return digest.digest()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.tensors)})"


def check_compatible(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """Return the tensor names a merge of these checkpoints produces, or name the first mismatch.

    The names are the reference's (the first checkpoint, normally the base) plus any that another
    stores explicitly (an untied lm_head); a tied lm_head resolves to the embedding, so checkpoints
    that differ only in how they store tied embeddings are compatible.
    """
    if not checkpoints:
        raise IncompatibleCheckpointsError("no checkpoints to merge")
    reference = checkpoints[0]
    names = reference.names()
    extra = [n for ckpt in checkpoints[1:] for n in ckpt.names() if n not in reference.tensors]
    names += list(dict.fromkeys(extra))
    for name in names:
        ref_info = reference._resolve(name)
        for ckpt in checkpoints:
            info = ckpt._resolve(name)
            if info is None:
                raise IncompatibleCheckpointsError(f"tensor {name!r} is missing from {ckpt.path}")
            if ref_info is None:
                ref_info = info
            if info.shape != ref_info.shape:
                raise IncompatibleCheckpointsError(
                    f"tensor {name!r} has shape {list(info.shape)} in {ckpt.path} "
                    f"but {list(ref_info.shape)} in {reference.path}"
                )
            if info.dtype != ref_info.dtype:
                raise IncompatibleCheckpointsError(
                    f"tensor {name!r} has dtype {info.dtype} in {ckpt.path} but {ref_info.dtype} in {reference.path}"
                )
    return names
