"""Compiled per-element loops for the structural pass, where NumPy would make one memory pass per step.

Widening bf16 and ‖expert − base‖² are each one fused loop (numba, vectorised by LLVM), so the pass
touches every element about twice instead of five times; see BENCHMARKS.md (features). Compiled on
first use and cached on disk by numba.
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
def squared_distance(values: np.ndarray, base: np.ndarray) -> float:  # pragma: no cover - compiled
    """Σ (values − base)² without materialising the difference (float32 lanes, float64 result)."""
    total = np.float32(0.0)
    for i in range(values.shape[0]):
        difference = values[i] - base[i]
        total += difference * difference
    return float(total)
