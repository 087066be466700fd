"""Compiled per-element loops for the structural pass, where NumPy would make one memory pass per step.

Per chunk of a tensor, one loop widens the base's and every expert's bf16 values and one call computes
everything the signature keeps from it (numba, vectorised by LLVM), so the pass touches each element
about twice instead of five times and makes two calls per chunk rather than a few per expert; see
BENCHMARKS.md (features). Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def widen_bf16(raw: np.ndarray, out_bits: np.ndarray) -> None:  # pragma: no cover - compiled
    """bf16 bit patterns (uint16) → float32 bit patterns (uint32): the 16 bits become the high half."""
    for i in range(raw.shape[0]):
        out_bits[i] = np.uint32(raw[i]) << np.uint32(16)


@njit(nogil=True, fastmath=True, cache=True)
def chunk_statistics(
    wide: np.ndarray,
    count: int,
    sample_at: np.ndarray,
    quantile_at: np.ndarray,
    sq_norm: np.ndarray,
    samples: np.ndarray,
    magnitudes: np.ndarray,
) -> float:  # pragma: no cover - compiled
    """One chunk of one tensor for a base (row 0 of `wide`) and its experts (rows 1…), in one call.

    Adds each expert's Σ(expert − base)² to `sq_norm[e]`, writes its task vector at the chunk's sampled
    coordinates into `samples[e]` and its magnitude at the quantile coordinates into `magnitudes[e]`,
    and returns the base's Σ base² (float32 lanes, float64 totals).
    """
    base = wide[0]
    base_total = np.float32(0.0)
    for i in range(count):
        base_total += base[i] * base[i]
    for e in range(wide.shape[0] - 1):
        row = wide[e + 1]
        total = np.float32(0.0)
        for i in range(count):
            difference = row[i] - base[i]
            total += difference * difference
        sq_norm[e] += total
        for j in range(sample_at.shape[0]):
            samples[e, j] = row[sample_at[j]] - base[sample_at[j]]
        for j in range(quantile_at.shape[0]):
            magnitudes[e, j] = abs(row[quantile_at[j]] - base[quantile_at[j]])
    return float(base_total)
