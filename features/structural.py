"""Structural signatures: task-vector statistics from one streaming pass over the weights.

The pass is tensor-major over a base and its experts: each base tensor is read once and every expert's
tensor of that name is read beside it, so memory is one base tensor plus one expert tensor and the
base's read is shared by all its experts. Per tensor we keep exact ‖τ‖², ‖θ_base‖², max |τ|, |τ|
quantiles (estimated on a seeded sub-sample) and τ at a seeded sample of coordinates that depends only
on (seed, tensor name, shape) and the base's layout, so every checkpoint of one base samples the same
coordinates and pairwise sums over the sample, weighted by numel/count, are unbiased estimates of the
full-tensor sums.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from features.schema import KINDS, QUANTILE_LEVELS, SignatureConfig, depth_thirds
from features.signature import SignaturePart
from simmerge.checkpoint import Checkpoint, check_compatible
from simmerge.errors import SimMergeError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


CHUNK_ELEMENTS = 1 << 18  # per read (1 MB as float32): stays in cache while widened and reduced


class ChunkBuffers:
    """Read and widen buffers reused across tensors (fresh ones would cost a page fault per 4 KB)."""

    def __init__(self) -> None:
        self.raw = bytearray(0)
        self.wide = np.empty(0, dtype=np.float32)

    def get(self, nbytes: int, count: int) -> tuple[bytearray, np.ndarray]:
        if len(self.raw) < nbytes:
            self.raw = bytearray(nbytes)
        if len(self.wide) < count:
            self.wide = np.empty(count, dtype=np.float32)
        return self.raw, self.wide


def read_chunks(
    checkpoint: Checkpoint, name: str, buffers: ChunkBuffers | None = None, chunk: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """The one place weights are read: (first element, float32 values) chunk by chunk.

    Each chunk is one pread of the tensor's byte range (from the checkpoint's safetensors header) into
    a reused buffer, widened to float32 in place of a full-tensor conversion: bf16 by a 16-bit shift,
    which costs less than torch's conversion here and keeps the pass close to one read. The yielded
    array is reused for the next chunk; the caller may modify it.
    """
    chunk = chunk or CHUNK_ELEMENTS
    info = checkpoint.info(name)
    if info.dtype not in _WIDEN:
        yield 0, checkpoint.read(name).reshape(-1).to(torch.float32).numpy()
        return
    source = _WIDEN[info.dtype]
    size = min(chunk, max(info.numel, 1))
    raw, wide = (buffers or ChunkBuffers()).get(size * source.itemsize, size)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        for start in range(0, info.numel, chunk):
            count = min(chunk, info.numel - start)
            view = memoryview(raw)[: count * source.itemsize]
            _pread(fd, view, info.start + start * source.itemsize, info.file)
            values = np.frombuffer(view, dtype=source)
            if info.dtype == "BF16":
                np.left_shift(values, 16, out=wide[:count].view(np.uint32), dtype=np.uint32)
                yield start, wide[:count]
            elif info.dtype == "F32":
                yield start, values
            else:
                wide[:count] = values.astype(np.float32, copy=False)
                yield start, wide[:count]
    finally:
        os.close(fd)


def _pread(fd: int, buffer: memoryview, offset: int, path) -> None:
    done = 0
    while done < len(buffer):  # one preadv may return fewer bytes than asked
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise SimMergeError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


_WIDEN = {"BF16": np.dtype(np.uint16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}


def tensor_kind(name: str) -> int:
    """Index into KINDS; norms first, since `post_attention_layernorm` also mentions attention."""
    lowered = name.lower()
    if "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_"):
        return KINDS.index("norm")
    if any(k in lowered for k in ("embed", "wte", "wpe", "lm_head")):
        return KINDS.index("embedding")
    if any(k in lowered for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return KINDS.index("attention")
    if any(k in lowered for k in ("mlp", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc")):
        return KINDS.index("mlp")
    return KINDS.index("other")


def tensor_layer(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def allocate_samples(numels: Sequence[int], total: int, minimum: int) -> list[int]:
    """Coordinates per tensor: at least `minimum` (or all), the rest proportional to size, summing to
    `total` exactly whenever the model has that many coordinates (so signature size is fixed)."""
    numels = [int(n) for n in numels]
    if sum(numels) <= total:
        return numels
    counts = [min(n, minimum) for n in numels]
    for _ in range(len(numels) + 1):  # re-share while caps bind; terminates as capped tensors drop out
        left = total - sum(counts)
        room = [n - c for n, c in zip(numels, counts, strict=True)]
        weight = sum(r for r in room if r > 0)
        if left <= 0 or weight == 0:
            break
        shares = [left * r / weight for r in room]
        extra = [min(int(s), r) for s, r in zip(shares, room, strict=True)]
        if sum(extra) == 0:  # hand out the remainder by largest fraction
            order = sorted(range(len(numels)), key=lambda i: (-(shares[i] - int(shares[i])), i))
            for i in order[:left]:
                if room[i] > 0:
                    extra[i] = 1
        counts = [c + e for c, e in zip(counts, extra, strict=True)]
    return counts


def sample_indices(seed: int, name: str, shape: Sequence[int], count: int, salt: str = "") -> np.ndarray:
    """Sorted flat indices of `count` distinct coordinates, a function of (seed, name, shape) only."""
    numel = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if count >= numel:
        return np.arange(numel, dtype=np.int64)
    digest = hashlib.sha256(f"{seed}|{name}|{list(shape)}|{salt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.choice(numel, size=count, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class Layout:
    """Which tensors are sampled and how many coordinates each; shared by all checkpoints of a base."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    counts: list[int]
    kinds: np.ndarray
    depths: np.ndarray
    key: str

    @classmethod
    def of(cls, base: Checkpoint, config: SignatureConfig) -> Layout:
        names = [n for n in base.names() if base.tensors[n].dtype in _FLOAT_DTYPES]
        if not names:
            raise SimMergeError(f"{base.path}: no floating-point tensors to take a signature of")
        shapes = [tuple(base.tensors[n].shape) for n in names]
        numels = [base.tensors[n].numel for n in names]
        counts = allocate_samples(numels, config.sample_size, config.min_per_tensor)
        layers = [tensor_layer(n) for n in names]
        n_layers = max((layer for layer in layers if layer is not None), default=-1) + 1
        thirds = depth_thirds(n_layers)
        depths = np.array([-1 if ly is None else thirds[ly] for ly in layers], dtype=np.int8)
        kinds = np.array([tensor_kind(n) for n in names], dtype=np.int8)
        text = "|".join(f"{n}:{list(s)}:{c}" for n, s, c in zip(names, shapes, counts, strict=True))
        key = hashlib.sha256(f"{config.structural_key()}|{text}".encode()).hexdigest()[:16]
        return cls(names, shapes, counts, kinds, depths, key)


class _Accumulator:
    """Per-checkpoint arrays filled chunk by chunk."""

    def __init__(self, layout: Layout) -> None:
        n = len(layout.names)
        self.sq_norm = np.zeros(n, dtype=np.float64)
        self.quantiles = np.zeros((n, len(QUANTILE_LEVELS)), dtype=np.float32)
        self.sample = np.zeros(sum(layout.counts), dtype=np.float32)
        self.magnitudes = np.zeros(0, dtype=np.float32)

    def start_tensor(self, qcount: int) -> None:
        self.magnitudes = np.zeros(qcount, dtype=np.float32)

    def add_chunk(self, i: int, start: int, tau: np.ndarray, picks: _Picks) -> None:
        self.sq_norm[i] += float(np.dot(tau, tau))
        lo, hi, local = picks.sample(start, len(tau))
        self.sample[picks.offset + lo : picks.offset + hi] = tau[local]
        lo, hi, local = picks.quantile(start, len(tau))
        self.magnitudes[lo:hi] = np.abs(tau[local])

    def end_tensor(self, i: int) -> None:
        self.quantiles[i] = np.quantile(self.magnitudes, QUANTILE_LEVELS)


@dataclass
class _Picks:
    """A tensor's sampled and quantile coordinates, served chunk by chunk."""

    indices: np.ndarray
    qindices: np.ndarray
    offset: int  # where this tensor's samples start in the signature's sample vector

    def sample(self, start: int, count: int) -> tuple[int, int, np.ndarray]:
        return self._within(self.indices, start, count)

    def quantile(self, start: int, count: int) -> tuple[int, int, np.ndarray]:
        return self._within(self.qindices, start, count)

    @staticmethod
    def _within(indices: np.ndarray, start: int, count: int) -> tuple[int, int, np.ndarray]:
        lo, hi = np.searchsorted(indices, [start, start + count])
        return int(lo), int(hi), indices[lo:hi] - start


def structural_signatures(
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    base_hash: str,
    config: SignatureConfig,
    include_base: bool = True,
    on_tensor: Callable[[], None] | None = None,
) -> list[SignaturePart]:
    """Structural parts for `experts` (then the base itself, zero task vector, if `include_base`).

    One streaming pass: tensor by tensor and chunk by chunk, the base's chunk is read once and each
    expert's chunk beside it, so memory is a few chunks and the base's read is shared by its experts.
    """
    layout = Layout.of(base, config)
    for expert in experts:
        check_compatible([base, expert])
    accs = [_Accumulator(layout) for _ in experts]
    base_pool, pools = ChunkBuffers(), [ChunkBuffers() for _ in experts]
    base_sq = np.zeros(len(layout.names), dtype=np.float64)
    offset = 0
    for i, (name, shape, count) in enumerate(zip(layout.names, layout.shapes, layout.counts, strict=True)):
        qcount = min(config.quantile_sample, base.tensors[name].numel)
        picks = _Picks(
            sample_indices(config.seed, name, shape, count),
            sample_indices(config.seed, name, shape, qcount, salt="quantiles"),
            offset,
        )
        streams = [read_chunks(expert, name, buffers) for expert, buffers in zip(experts, pools, strict=True)]
        for acc in accs:
            acc.start_tensor(qcount)
        for start, base_values in read_chunks(base, name, base_pool):
            base_sq[i] += float(np.dot(base_values, base_values))
            for stream, acc in zip(streams, accs, strict=True):
                expert_start, tau = next(stream)
                if expert_start != start:
                    raise SimMergeError(f"tensor {name!r} is not read in step with its base")
                np.subtract(tau, base_values, out=tau)
                acc.add_chunk(i, start, tau, picks)
        for acc in accs:
            acc.end_tensor(i)
        offset += count
        if on_tensor is not None:
            on_tensor()
    parts = [_part(layout, acc, base_sq, base_hash, is_base=False) for acc in accs]
    if include_base:
        parts.append(_part(layout, _Accumulator(layout), base_sq, base_hash, is_base=True))
    return parts


def _part(
    layout: Layout, acc: _Accumulator, base_sq: np.ndarray, base_hash: str, is_base: bool
) -> SignaturePart:
    numel = np.array([int(np.prod(s, dtype=np.int64)) for s in layout.shapes], dtype=np.int64)
    arrays = {
        "numel": numel,
        "counts": np.array(layout.counts, dtype=np.int64),
        "kinds": layout.kinds,
        "depths": layout.depths,
        "sq_norm": acc.sq_norm,
        "base_sq_norm": base_sq,
        "quantiles": acc.quantiles,
        "sample": acc.sample,
    }
    meta = {"base_hash": base_hash, "layout": layout.key, "names": layout.names, "is_base": is_base}
    return SignaturePart("structural", meta, arrays)
