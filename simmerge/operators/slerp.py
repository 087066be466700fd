"""slerp: spherical interpolation from the base (v0) towards the one other model (v1)."""

from __future__ import annotations

import torch

from simmerge.operators.base import MergeOperator, Param, as_float32, check_shapes, chunks

# mergekit's choices: directions closer than this are treated as colinear (or antipodal) and
# interpolated linearly; norms at or below NORM_EPS are taken as 1 (a zero tensor has no direction).
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` with θ the angle between the flattened tensors.

    The coefficients come from the normalised directions but multiply the raw tensors, so norms
    are interpolated too; |cos θ| > DOT_THRESHOLD falls back to ``(1-t) v0 + t v1``. Norms, the dot
    product and the result are computed slice by slice, so scratch memory stays small.
    """
    a, b = as_float32(v0).reshape(-1), as_float32(v1).reshape(-1)
    t_ = torch.tensor(t, dtype=torch.float32, device=a.device)
    parts = chunks(a.numel())
    if not parts:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    norm_a = _safe_norm(torch.stack([torch.linalg.vector_norm(a[p]) for p in parts]))
    norm_b = _safe_norm(torch.stack([torch.linalg.vector_norm(b[p]) for p in parts]))
    cos = torch.stack([((a[p] / norm_a) * (b[p] / norm_b)).sum() for p in parts]).sum().clamp(-1.0, 1.0)
    if cos.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(cos)
        coef_a = torch.sin((1 - t_) * theta) / torch.sin(theta)
        coef_b = torch.sin(t_ * theta) / torch.sin(theta)
    out = torch.empty_like(a)
    for p in parts:
        out[p] = coef_a * a[p] + coef_b * b[p]
    return out.reshape(v0.shape)


def _safe_norm(partial_norms: torch.Tensor) -> torch.Tensor:
    """The norm from per-slice norms; at or below NORM_EPS it is taken as 1 (no direction to keep)."""
    norm = torch.linalg.vector_norm(partial_norms)
    return norm if norm > NORM_EPS else torch.ones_like(norm)


class Slerp(MergeOperator):
    """Exactly one model besides the base; ``t = 0`` gives the base, ``t = 1`` the other model."""

    name = "slerp"
    description = "spherical interpolation between the base and one other model"
    method_params = (
        Param("t", float, low=0.0, high=1.0, doc="interpolation factor from the base (0) to the model (1)"),
    )
    needs_base = True
    min_models = 1
    max_models = 1
    spherical = True
    interpolates_inputs = True

    def preserves_identity(self, params, n_inputs):
        """Interpolating between two copies returns the copy, whatever ``t``."""
        return True

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        check_shapes(tensors, base, tensor_name)
        assert base is not None
        return slerp(params["t"], base, tensors[0])
