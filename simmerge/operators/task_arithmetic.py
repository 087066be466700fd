"""Task-vector merges: ``θ_base + λ · combine(w_i · sparsify(θ_i − θ_base))``.

task_arithmetic, ties, dare_* and breadcrumbs* share this shape and differ in two choices, as in
mergekit's generalised task arithmetic: how each task vector is sparsified, and whether a sign is
elected per coordinate (TIES consensus) before summing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from simmerge.operators.base import MergeOperator, Param, as_float32, check_shapes, chunks

# Below this |Σ w_i| the non-consensus divisor is taken as 1 (mergekit's rule), so normalising
# weights that cancel leaves the weighted sum undivided instead of exploding.
ZERO_DIVISOR = 1e-8


def common_method_params(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """The method-level parameters every task-vector family has; only the defaults differ."""
    return (
        Param("normalize", bool, normalize, doc="divide by the (kept) weights' sum"),
        Param("rescale", bool, rescale, doc="rescale sparsified task vectors to their L1 norm"),
        Param("int8_mask", bool, False, doc="mask storage in mergekit; no numerical effect"),
        Param("lambda", float, 1.0, doc="scale of the combined task vector"),
    )


WEIGHT = Param("weight", float, doc="coefficient of this task vector; required, as in mergekit")
DENSITY = Param("density", float, 1.0, low=0.0, high=1.0, low_open=True, doc="fraction of entries kept")


def agrees_with_elected_sign(weighted: torch.Tensor, elected_positive: torch.Tensor) -> torch.Tensor:
    """TIES consensus for one weighted task vector: True where its sign is the coordinate's elected one.

    Zero entries have no sign and never agree.
    """
    return torch.where(elected_positive, weighted > 0, weighted < 0)


class TaskVectorMerge(MergeOperator):
    """Base of the task-vector families; subclasses set ``sign_election`` and override ``sparsify``.

    Sparsifiers act on the flattened task vector (top-k, sorting and the random draw are all in
    flat order). Everything after sparsification is per coordinate, so it runs in slices of
    ``base.CHUNK`` entries: scratch memory stays a few MiB, and only families that really sparsify
    hold whole task vectors.
    """

    sign_election = False
    needs_base = True
    model_params: tuple[Param, ...] = (WEIGHT, DENSITY)

    def sparsifies(self, model_params: dict[str, Any]) -> bool:
        """Whether ``sparsify`` changes this model's task vector (it needs the whole tensor then)."""
        return False

    def sparsify(
        self,
        delta: torch.Tensor,
        model_params: dict[str, Any],
        rescale: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Flat task vector → sparsified task vector; identity here (task_arithmetic ignores density)."""
        return delta

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        check_shapes(tensors, base, tensor_name)
        assert base is not None
        base_flat = as_float32(base).reshape(-1)
        flats = [as_float32(t).reshape(-1) for t in tensors]
        weights = [mp["weight"] for mp in model_params]
        if any(self.sparsifies(mp) for mp in model_params):
            sparse = [
                self.sparsify(flat - base_flat, mp, params["rescale"], generator)
                for flat, mp in zip(flats, model_params, strict=True)
            ]

            def delta(index: int, part: slice) -> torch.Tensor:
                return sparse[index][part]
        else:

            def delta(index: int, part: slice) -> torch.Tensor:
                return flats[index][part] - base_flat[part]

        out = torch.empty_like(base_flat)
        for part in chunks(base_flat.numel()):
            weighted = [delta(i, part) * w for i, w in enumerate(weights)]
            combined, divisor = self._combine(weighted, weights)
            if params["normalize"]:
                combined.div_(divisor)
            if params["lambda"] != 1:
                combined.mul_(params["lambda"])
            out[part] = combined.add_(base_flat[part])
        return out.reshape(base.shape)

    def _combine(
        self, weighted: list[torch.Tensor], weights: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Combined weighted task vectors of one slice, and the divisor ``normalize`` uses."""
        combined = weighted[0].clone() if self.sign_election else weighted[0]
        for value in weighted[1:]:
            combined = combined.add_(value)
        if not self.sign_election:
            total = float(torch.tensor(weights, dtype=torch.float32).sum())
            return combined, 1.0 if abs(total) < ZERO_DIVISOR else total
        elected_positive = combined >= 0  # a zero sum elects +
        combined.zero_()
        divisor = torch.zeros_like(combined)
        for value, weight in zip(weighted, weights, strict=True):
            keep = agrees_with_elected_sign(value, elected_positive).to(torch.float32)
            combined.addcmul_(value, keep)
            divisor.add_(keep, alpha=weight)
        return combined, divisor.masked_fill_(divisor == 0, 1.0)


class TaskArithmetic(TaskVectorMerge):
    """``θ_base + λ Σ w_i τ_i`` (``/ Σ w_i`` with ``normalize``); ``density`` is accepted but unused."""

    name = "task_arithmetic"
    description = "base plus the weighted sum of task vectors"
    method_params = common_method_params(normalize=False, rescale=False)
    elementwise = True

    def preserves_identity(self, params, n_inputs):
        """base + λ·Σwᵢ·τ = base + τ exactly when λ × Σ weights is one (divided by Σ w with normalize)."""
        if params.get("normalize", False):
            return math.isclose(float(params.get("lambda", 1.0)), 1.0)
        return math.isclose(
            float(params.get("lambda", 1.0)) * float(params.get("weight", 1.0)) * n_inputs, 1.0
        )
