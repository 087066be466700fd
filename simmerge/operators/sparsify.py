"""Sparsifiers for task vectors: magnitude top-k (TIES), random keep (DARE), outlier-trimmed (breadcrumbs).

Each keeps a ``density`` fraction of a task vector and, with ``rescale``, multiplies the survivors so
that the L1 norm of the task vector is unchanged (mergekit's rule; for DARE that is ``1/density`` in
expectation). At ``density >= 1`` the task vector is returned untouched, rescale or not. They work in
place on the task vector they are given (the caller's fresh ``θ_i − θ_base``), so sparsifying adds no
full-size copy to the merge's peak memory.
"""

from __future__ import annotations

import torch

# Below this L1 norm (before or after masking) rescaling is skipped: there is nothing to match.
RESCALE_EPS = 1e-7


def masked(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta`` zeroed where not ``keep``, in place (callers pass a fresh task vector); with
    ``rescale`` scaled back to the original L1 norm. In place because a sparsified copy of a large
    embedding is one more full-size tensor at the merge's peak."""
    before = delta.abs().sum() if rescale else None
    kept = delta.mul_(keep)
    if before is None:
        return kept
    after = kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def keep_top_magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES trim: keep the ``max(1, int(density·n))`` entries of largest magnitude."""
    if density >= 1:
        return delta
    count = max(1, int(density * delta.numel()))
    magnitude = delta.abs()
    # The count-th largest magnitude, then exactly `count` entries: all above it and, of those equal
    # to it, the first in index order. A threshold costs one copy for the selection where topk's
    # values and int64 indices cost three tensors' worth at density 0.5.
    threshold = torch.kthvalue(magnitude.reshape(-1), magnitude.numel() - count + 1).values
    keep = magnitude > threshold
    missing = count - int(keep.sum())
    if missing > 0:
        at_threshold = (magnitude.reshape(-1) == threshold).nonzero().reshape(-1)[:missing]
        keep.reshape(-1)[at_threshold] = True
    del magnitude
    return masked(delta, keep, rescale)


def keep_random(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``.

    The uniform draw is taken on the generator's device and depends only on its state and the
    tensor's size, so the same seed gives the same mask.
    """
    if density >= 1:
        return delta
    device = generator.device if generator is not None else delta.device
    uniform = torch.rand(delta.numel(), generator=generator, device=device, dtype=torch.float32)
    keep = (uniform < density).to(delta.device).reshape(delta.shape)
    return masked(delta, keep, rescale)


def keep_between_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the ``int(gamma·n)`` largest magnitudes and enough of the smallest that
    ``int(density·n)`` remain; when ``density + gamma > 1`` fewer of the largest are dropped."""
    if density >= 1:
        return delta
    total = delta.numel()
    kept_count = int(density * total)
    top_count = int(gamma * total)
    bottom_count = max(0, total - kept_count - top_count)
    order = torch.sort(delta.abs().reshape(-1)).indices
    keep = torch.zeros(total, dtype=torch.bool, device=delta.device)
    keep[order[bottom_count : bottom_count + kept_count]] = True
    return masked(delta, keep.reshape(delta.shape), rescale)
