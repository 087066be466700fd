"""slerp: spherical interpolation from the base (v0) towards the one other model (v1)."""

from __future__ import annotations

import torch

from simmerge.operators.base import MergeOperator, Param, as_float32

# mergekit's choices: directions closer than this are treated as colinear (or antipodal) and
# interpolated linearly; norms at or below NORM_EPS are taken as 1 (a zero tensor has no direction).
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` with θ the angle between the flattened tensors.

    The coefficients come from the normalised directions but multiply the raw tensors, so norms
    are interpolated too; |cos θ| > DOT_THRESHOLD falls back to ``(1-t) v0 + t v1``.
    """
    a, b = as_float32(v0), as_float32(v1)
    t = torch.tensor(t, dtype=torch.float32, device=a.device)
    if a.numel() == 0:
        return (1 - t) * a + t * b
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > NORM_EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > NORM_EPS else torch.ones_like(norm_b)
    cos = ((a / norm_a) * (b / norm_b)).sum().clamp(-1.0, 1.0)
    if cos.abs() > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - t) * theta) / sin_theta
    coef_b = torch.sin(t * theta) / sin_theta
    return coef_a * a + coef_b * b


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

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        assert base is not None
        return slerp(params["t"], base, tensors[0])
