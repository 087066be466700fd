"""linear (model soup): a weighted average of the checkpoints themselves, no base involved."""

from __future__ import annotations

import math
from typing import Any

import torch

from simmerge.errors import PlanError
from simmerge.operators.base import MergeOperator, Param, as_float32, check_shapes

WEIGHT = Param("weight", float, doc="coefficient of this model; required, as in mergekit")


class Linear(MergeOperator):
    """``Σ w_i θ_i / Σ w_i`` (``normalize``, default true), else ``Σ w_i θ_i``."""

    name = "linear"
    description = "weighted average of the checkpoints (model soup)"
    method_params = (Param("normalize", bool, True, doc="divide by the sum of the weights"),)
    model_params = (WEIGHT,)
    accepts_base = False
    elementwise = True

    def preserves_identity(self, params, n_inputs):
        """A normalised average of copies is the copy; an unnormalised sum only when the weights sum to 1."""
        return bool(params.get("normalize", True)) or math.isclose(
            float(params.get("weight", 1.0)) * n_inputs, 1.0
        )

    def check(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        total = sum(mp["weight"] for mp in model_params)
        if params["normalize"] and abs(total) < 1e-8:
            weights = [mp["weight"] for mp in model_params]
            raise PlanError(f"linear with normalize: parameter 'weight' values {weights} sum to 0")

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        check_shapes(tensors, base, tensor_name)
        result = torch.zeros_like(as_float32(tensors[0]))
        for tensor, mp in zip(tensors, model_params, strict=True):
            result.add_(as_float32(tensor), alpha=mp["weight"])
        if params["normalize"]:
            result.div_(sum(mp["weight"] for mp in model_params))
        return result
