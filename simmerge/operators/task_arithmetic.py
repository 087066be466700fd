"""Task-vector merges: ``θ_base + λ · combine(w_i · sparsify(θ_i − θ_base))``.

task_arithmetic, ties, dare_* and breadcrumbs* share this shape and differ in two choices, as in
mergekit's generalised task arithmetic: how each task vector is sparsified, and whether a sign is
elected per coordinate (TIES consensus) before summing.
"""

from __future__ import annotations

from typing import Any

import torch

from simmerge.operators.base import MergeOperator, Param, as_float32

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


def elected_mask(weighted: torch.Tensor) -> torch.Tensor:
    """TIES consensus: True where an entry's sign equals the sign of the coordinate's sum.

    A zero sum elects +; zero entries have no sign and never count.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return torch.sign(weighted) == elected


class TaskVectorMerge(MergeOperator):
    """Base of the task-vector families; subclasses set ``consensus`` and override ``sparsify``."""

    consensus = False
    needs_base = True
    model_params: tuple[Param, ...] = (WEIGHT, DENSITY)

    def sparsify(
        self,
        delta: torch.Tensor,
        model_params: dict[str, Any],
        rescale: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Task vector → sparsified task vector; identity here (task_arithmetic ignores density)."""
        return delta

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        assert base is not None
        base = as_float32(base)
        deltas = torch.stack(
            [
                self.sparsify(as_float32(t) - base, mp, params["rescale"], generator)
                for t, mp in zip(tensors, model_params, strict=True)
            ]
        )
        weights = torch.tensor([mp["weight"] for mp in model_params], dtype=torch.float32, device=base.device)
        weights = weights.reshape(-1, *([1] * base.dim()))
        weighted = deltas * weights
        if self.consensus:
            keep = elected_mask(weighted).to(torch.float32)
            combined = (weighted * keep).sum(dim=0)
            divisor = (weights * keep).sum(dim=0)
            divisor = torch.where(divisor == 0, 1.0, divisor)
        else:
            combined = weighted.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor = torch.where(divisor.abs() < ZERO_DIVISOR, 1.0, divisor)
        if params["normalize"]:
            combined = combined / divisor
        if params["lambda"] != 1:
            combined = combined * params["lambda"]
        return base + combined


class TaskArithmetic(TaskVectorMerge):
    """``θ_base + λ Σ w_i τ_i`` (``/ Σ w_i`` with ``normalize``); ``density`` is accepted but unused."""

    name = "task_arithmetic"
    description = "base plus the weighted sum of task vectors"
    method_params = common_method_params(normalize=False, rescale=False)
    elementwise = True
