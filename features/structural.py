"""Structural signatures: task-vector statistics from one streaming pass over the weights.

The pass is tensor-major over a base and its experts: each tensor is read chunk by chunk from the base
and every expert in step, so memory is a few chunks per thread and the base's read is shared by all
its experts. Per tensor we keep exact ‖τ‖² and ‖θ_base‖², |τ| quantiles (estimated on a seeded
sub-sample) and τ at a seeded sample of coordinates that depends only
on (seed, tensor name, shape) and the base's layout, so every checkpoint of one base samples the same
coordinates and pairwise sums over the sample, weighted by numel/count, are unbiased estimates of the
full-tensor sums.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from features.kernels import sorted_row_quantiles, tensor_statistics
from features.schema import KINDS, QUANTILE_LEVELS, SignatureConfig, depth_thirds
from features.signature import SignaturePart
from simmerge.checkpoint import Checkpoint, check_compatible
from simmerge.errors import SimMergeError
from simmerge.resources import available_cores

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


CHUNK_ELEMENTS = 1 << 18  # elements per checkpoint per read: a family's chunk stays in the L2/L3 cache
_IN_PLACE = {"BF16": np.dtype(np.uint16), "F32": np.dtype(np.float32)}  # what the kernel reads as is
_WIDENED = {"F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}  # converted to float32 first
_LEVELS = np.array(QUANTILE_LEVELS, dtype=np.float64)


class ChunkBuffers:
    """Read buffers reused across tensors (fresh ones would cost a page fault per 4 KB)."""

    def __init__(self) -> None:
        self.raw = np.empty(0, dtype=np.uint8)
        self.wide = np.empty(0, dtype=np.float32)

    def get(self, rows: int, size: int, dtype: np.dtype) -> np.ndarray:
        """A (rows, size) array of `dtype`, each row contiguous (one pread each)."""
        if len(self.raw) < rows * size * dtype.itemsize:
            self.raw = np.empty(rows * size * dtype.itemsize, dtype=np.uint8)
        return self.raw[: rows * size * dtype.itemsize].view(dtype).reshape(rows, size)

    def get_wide(self, rows: int, size: int) -> np.ndarray:
        if len(self.wide) < rows * size:
            self.wide = np.empty(rows * size, dtype=np.float32)
        return self.wide[: rows * size].reshape(rows, size)


def read_chunks(
    checkpoints: Sequence[Checkpoint],
    name: str,
    buffers: ChunkBuffers | None = None,
    chunk: int | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The one place weights are read: tensor `name` of every checkpoint in step, chunk by chunk.

    Yields (first element, element count, array of shape (checkpoints, chunk)) whose first `count`
    columns hold the chunk, row i from `checkpoints[i]`: float32, or uint16 holding bf16 bit patterns,
    which the kernel widens in registers (float16 and float64 are converted to float32 here). Each row
    is one pread of the tensor's byte range (from the safetensors header) into a reused buffer, small
    enough that the kernel then reads it from cache. The array is reused for the next chunk.
    """
    chunk = chunk or CHUNK_ELEMENTS
    buffers = buffers or ChunkBuffers()
    infos = [c.info(name) for c in checkpoints]
    numel, dtype = infos[0].numel, infos[0].dtype
    if any(i.dtype != dtype for i in infos):
        yield 0, numel, np.stack([c.read(name).reshape(-1).to(torch.float32).numpy() for c in checkpoints])
        return
    source = _IN_PLACE[dtype] if dtype in _IN_PLACE else _WIDENED[dtype]
    size = min(chunk, max(numel, 1))
    raw = buffers.get(len(infos), size, source)
    fds = [os.open(info.file, os.O_RDONLY) for info in infos]
    try:
        for start in range(0, numel, chunk):
            count = min(chunk, numel - start)
            for row, (fd, info) in enumerate(zip(fds, infos, strict=True)):
                view = memoryview(raw[row]).cast("B")[: count * source.itemsize]
                _pread(fd, view, info.start + start * source.itemsize, info.file)
            if dtype in _IN_PLACE:
                yield start, count, raw
            else:
                wide = buffers.get_wide(len(infos), size)
                np.copyto(wide, raw, casting="same_kind")
                yield start, count, wide
    finally:
        for fd in fds:
            os.close(fd)


def _pread(fd: int, buffer: memoryview, offset: int, path) -> None:
    done = 0
    while done < len(buffer):  # one preadv may return fewer bytes than asked
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise SimMergeError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


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
    numel = math.prod(int(d) for d in shape)  # Python ints: np.prod costs more than the draw's hash
    if count >= numel:
        return np.arange(numel, dtype=np.int64)
    digest = hashlib.sha256(f"{seed}|{name}|{list(shape)}|{salt}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))  # = default_rng
    indices = rng.choice(numel, size=count, replace=False)
    indices.sort()
    return indices


@dataclass(frozen=True)
class Layout:
    """Which tensors are sampled and how many coordinates each; shared by all checkpoints of a base."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    counts: list[int]
    kinds: np.ndarray
    depths: np.ndarray
    key: str
    numels: np.ndarray

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
        return cls(names, shapes, counts, kinds, depths, key, np.array(numels, dtype=np.int64))


_PICKS_CACHED = 8  # layouts (bases) whose coordinates are kept: a few MB each for billion-weight models
_picks_cache: OrderedDict[str, LayoutPicks] = OrderedDict()
_picks_lock = threading.Lock()


class LayoutPicks:
    """Every tensor's sampled and quantile coordinates for one base layout, drawn on first use and kept.

    They depend only on (seed, tensor name, shape, count). Drawing them (a seeded generator and a sort
    per tensor, about 150 µs each, holding the GIL) would otherwise cost every family of a base as much
    as reading a small model's weights; on a first pass each tensor's are drawn by the thread that
    streams it, so the draw overlaps the other threads' compiled work. Kept for the last few layouts
    (`_PICKS_CACHED`); `clear_picks_cache` lets a benchmark measure a first pass.
    """

    def __init__(self, layout: Layout, config: SignatureConfig) -> None:
        self.layout, self.config = layout, config
        self.picks: list[_Picks | None] = [None] * len(layout.names)

    def __getitem__(self, i: int) -> _Picks:
        picks = self.picks[i]
        if picks is None:  # two threads never ask for the same tensor; a repeat draw is identical anyway
            layout, config = self.layout, self.config
            name, shape, numel = layout.names[i], layout.shapes[i], int(layout.numels[i])
            picks = self.picks[i] = _Picks(
                sample_indices(config.seed, name, shape, layout.counts[i]),
                sample_indices(
                    config.seed, name, shape, min(config.quantile_sample, numel), salt="quantiles"
                ),
            )
        return picks

    @classmethod
    def of(cls, layout: Layout, config: SignatureConfig) -> LayoutPicks:
        key = layout.key  # hashes the tensors' names, shapes and counts, the seed and the sample sizes
        with _picks_lock:
            if key not in _picks_cache:
                _picks_cache[key] = cls(layout, config)
                while len(_picks_cache) > _PICKS_CACHED:
                    _picks_cache.popitem(last=False)
            _picks_cache.move_to_end(key)
            return _picks_cache[key]


def clear_picks_cache() -> None:
    with _picks_lock:
        _picks_cache.clear()


@dataclass
class _Picks:
    """A tensor's sampled and quantile coordinates, served chunk by chunk."""

    indices: np.ndarray
    qindices: np.ndarray

    def sample(self, start: int, count: int) -> tuple[int, int, np.ndarray]:
        return self._within(self.indices, start, count)

    def quantile(self, start: int, count: int) -> tuple[int, int, np.ndarray]:
        return self._within(self.qindices, start, count)

    @staticmethod
    def _within(indices: np.ndarray, start: int, count: int) -> tuple[int, int, np.ndarray]:
        lo, hi = np.searchsorted(indices, [start, start + count])
        return int(lo), int(hi), indices[lo:hi] - start


@dataclass
class _TensorStats:
    """One tensor's statistics for the base and each expert (row e of each array: expert e)."""

    base_sq: float
    sq_norm: np.ndarray
    quantiles: np.ndarray  # (experts, levels) of |τ| over the quantile coordinates
    samples: np.ndarray


def _tensor_stats(
    base: Checkpoint, experts: Sequence[Checkpoint], name: str, picks: _Picks, buffers: ChunkBuffers
) -> _TensorStats:
    """Stream one tensor of the base and of every expert in step; one compiled call per chunk."""
    n = len(experts)
    sq_norm = np.zeros(n, dtype=np.float64)
    samples = np.zeros((n, len(picks.indices)), dtype=np.float32)
    magnitudes = np.zeros((n, len(picks.qindices)), dtype=np.float32)
    base_sq = 0.0
    for start, count, block in read_chunks([base, *experts], name, buffers):
        s_lo, s_hi, s_local = picks.sample(start, count)
        q_lo, q_hi, q_local = picks.quantile(start, count)
        addresses = np.array([row.ctypes.data for row in block[1:]], dtype=np.int64)
        base_sq += tensor_statistics(
            block[0, :count],
            addresses,
            s_local,
            q_local,
            sq_norm,
            samples[:, s_lo:s_hi],
            magnitudes[:, q_lo:q_hi],
        )
    quantiles = np.zeros((n, len(QUANTILE_LEVELS)), dtype=np.float32)
    if magnitudes.shape[1]:
        sorted_row_quantiles(np.sort(magnitudes, axis=1), _LEVELS, quantiles)
    return _TensorStats(base_sq, sq_norm, quantiles, samples)


def pass_workers() -> int:
    """Threads for the weight pass: the cores this process may use, up to 8 (the compiled kernels and
    pread release the GIL, so tensors are streamed in parallel; beyond a few threads memory bandwidth
    is the limit)."""
    return max(1, min(8, available_cores()))


def structural_signatures(
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    base_hash: str,
    config: SignatureConfig,
    include_base: bool = True,
    on_tensor: Callable[[], None] | None = None,
    workers: int | None = None,
) -> list[SignaturePart]:
    """Structural parts for `experts` (then the base itself, zero task vector, if `include_base`).

    One streaming pass: tensor by tensor and chunk by chunk, the base's chunk is read once and each
    expert's chunk beside it, so memory is a few chunks per thread and the base's read is shared by its
    experts. `workers` threads take tensors in turn; each tensor's statistics are computed by one
    thread alone, so the result does not depend on how many there are.
    """
    layout = Layout.of(base, config)
    for expert in experts:
        check_compatible([base, expert])
    offsets = np.concatenate([[0], np.cumsum(layout.counts)]).astype(np.int64)
    sq_norm = np.zeros((len(experts), len(layout.names)), dtype=np.float64)
    quantiles = np.zeros((len(experts), len(layout.names), len(QUANTILE_LEVELS)), dtype=np.float32)
    samples = np.zeros((len(experts), int(offsets[-1])), dtype=np.float32)
    base_sq = np.zeros(len(layout.names), dtype=np.float64)

    picks = LayoutPicks.of(layout, config)

    local = threading.local()

    def one_tensor(i: int) -> _TensorStats:
        if not hasattr(local, "buffers"):
            local.buffers = ChunkBuffers()
        return _tensor_stats(base, experts, layout.names[i], picks[i], local.buffers)

    with ThreadPoolExecutor(max_workers=workers or pass_workers()) as pool:
        for i, stats in enumerate(pool.map(one_tensor, range(len(layout.names)))):
            base_sq[i] = stats.base_sq
            sq_norm[:, i] = stats.sq_norm
            quantiles[:, i] = stats.quantiles
            samples[:, offsets[i] : offsets[i + 1]] = stats.samples
            if on_tensor is not None:
                on_tensor()
    parts = [
        _part(layout, sq_norm[e], quantiles[e], samples[e], base_sq, base_hash, is_base=False)
        for e in range(len(experts))
    ]
    if include_base:
        zeros = np.zeros(int(offsets[-1]), dtype=np.float32)
        empty = np.zeros((len(layout.names), len(QUANTILE_LEVELS)), dtype=np.float32)
        parts.append(
            _part(layout, np.zeros(len(layout.names)), empty, zeros, base_sq, base_hash, is_base=True)
        )
    return parts


def _part(
    layout: Layout,
    sq_norm: np.ndarray,
    quantiles: np.ndarray,
    sample: np.ndarray,
    base_sq: np.ndarray,
    base_hash: str,
    is_base: bool,
) -> SignaturePart:
    arrays = {
        "numel": layout.numels,
        "counts": np.array(layout.counts, dtype=np.int64),
        "kinds": layout.kinds,
        "depths": layout.depths,
        "sq_norm": np.ascontiguousarray(sq_norm, dtype=np.float64),
        "base_sq_norm": base_sq,
        "quantiles": np.ascontiguousarray(quantiles),
        "sample": np.ascontiguousarray(sample),
    }
    meta = {"base_hash": base_hash, "layout": layout.key, "names": layout.names, "is_base": is_base}
    return SignaturePart("structural", meta, arrays)
