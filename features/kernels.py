"""Compiled per-element loop for the structural pass, where NumPy would make one memory pass per step.

One call per chunk of a tensor computes everything the signature keeps from it for a base and all
its experts: the raw values (just read into a cache-sized buffer) are widened in registers (bf16 is
the high half of a float32), and each expert's block is compared with the base's while that is in
L1 cache. So each value is touched once after the read, with no widened copy (numba, vectorised by
LLVM); see BENCHMARKS.md (features). Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic, overload

BLOCK = 4096  # elements per step: the base's block stays in L1 cache while every expert's is compared


@intrinsic
def _bf16_to_float32(typingctx, bits):  # pragma: no cover - compiled
    """A bf16 bit pattern (uint16) as float32: its 16 bits become the high half of the float's 32 (numba
    has no scalar `view`, so the zero-extend, shift and reinterpretation are written in LLVM IR)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _pointer_like(typingctx, address, like):  # pragma: no cover - compiled
    """An int64 address as a pointer to `like`'s element type, for `numba.carray`."""
    if address != types.int64 or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(types.int64, like), codegen


def as_float32(source, i):  # pragma: no cover - replaced by the overload in compiled code
    """`source[i]` as float32; uint16 arrays hold bf16 bit patterns."""
    raise NotImplementedError


@overload(as_float32, inline="always")
def _as_float32(source, i):  # pragma: no cover - compiled
    if source.dtype == types.uint16:  # bf16: its 16 bits are the high half of a float32's
        return lambda source, i: _bf16_to_float32(source[i])
    return lambda source, i: np.float32(source[i])


@njit(nogil=True, fastmath=True, cache=True)
def _sum_of_squares(values) -> float:  # pragma: no cover - compiled
    total = np.float32(0.0)
    for i in range(values.shape[0]):
        value = as_float32(values, i)
        total += value * value
    return total


@njit(nogil=True, fastmath=True, cache=True)
def _sum_of_squared_differences(values, reference) -> float:  # pragma: no cover - compiled
    total = np.float32(0.0)
    for i in range(values.shape[0]):
        difference = as_float32(values, i) - as_float32(reference, i)
        total += difference * difference
    return total


@njit(nogil=True, fastmath=True, cache=True)
def tensor_statistics(
    base: np.ndarray,
    expert_addresses: np.ndarray,
    sample_at: np.ndarray,
    quantile_at: np.ndarray,
    sq_norm: np.ndarray,
    samples: np.ndarray,
    magnitudes: np.ndarray,
) -> float:  # pragma: no cover - compiled
    """One chunk of a tensor for a base and its experts: `base` is float32, or uint16 holding
    bf16; `expert_addresses` are the data addresses of same-length, same-type contiguous arrays that
    the caller keeps alive (a typed list of arrays would cost more to build than the call itself).

    Adds each expert's Σ(expert − base)² to `sq_norm[e]`, writes its task vector at the sorted
    positions `sample_at` into `samples[e]` and its magnitude at `quantile_at` into `magnitudes[e]`,
    and returns the base's Σ base². Sums are float32 within a block and float64 across blocks, in a
    fixed order, so the result does not depend on threads. Loops run over slices: numba's check for
    negative indices on `a[first + i]` would stop LLVM vectorising them.
    """
    n = base.shape[0]
    experts = [carray(_pointer_like(address, base), n) for address in expert_addresses]
    base_total = 0.0
    s_lo = 0
    q_lo = 0
    for first in range(0, n, BLOCK):
        last = min(first + BLOCK, n)
        base_block = base[first:last]
        base_total += _sum_of_squares(base_block)
        s_hi = s_lo
        while s_hi < sample_at.shape[0] and sample_at[s_hi] < last:
            s_hi += 1
        q_hi = q_lo
        while q_hi < quantile_at.shape[0] and quantile_at[q_hi] < last:
            q_hi += 1
        for e in range(len(experts)):
            block = experts[e][first:last]
            sq_norm[e] += _sum_of_squared_differences(block, base_block)
            for j in range(s_lo, s_hi):
                k = sample_at[j] - first
                samples[e, j] = as_float32(block, k) - as_float32(base_block, k)
            for j in range(q_lo, q_hi):
                k = quantile_at[j] - first
                magnitudes[e, j] = abs(as_float32(block, k) - as_float32(base_block, k))
        s_lo = s_hi
        q_lo = q_hi
    return base_total


@njit(nogil=True, cache=True)
def sorted_row_quantiles(
    ordered: np.ndarray, levels: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover
    """`np.quantile(rows, levels, axis=1)` (its default linear method) of rows already sorted.

    The same arithmetic in the same order as NumPy's, and no fastmath (a fused multiply-add would
    round differently), so the values are NumPy's exactly; the caller sorts with NumPy's SIMD sort,
    which costs less than `np.quantile`'s multi-point partition. A row with a NaN gives NaN, as there.
    """
    n = ordered.shape[1]
    for r in range(ordered.shape[0]):
        row = ordered[r]
        for j in range(levels.shape[0]):
            virtual = (n - 1) * levels[j]
            if np.isnan(row[n - 1]):
                out[r, j] = np.nan
            elif virtual <= 0.0:
                out[r, j] = row[0]
            elif virtual >= n - 1:
                out[r, j] = row[n - 1]
            else:
                below = int(np.floor(virtual))
                gamma = virtual - below
                difference = row[below + 1] - row[below]
                if gamma >= 0.5:
                    out[r, j] = row[below + 1] - difference * (1.0 - gamma)
                else:
                    out[r, j] = row[below] + difference * gamma
