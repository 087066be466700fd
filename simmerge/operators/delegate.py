"""Families SimMerge does not implement itself, run through mergekit's in-memory API when installed.

One class serves every delegated name: parameters, defaults and the input contract are read from
mergekit's own method spec, and ``merge`` calls ``mergekit.merge_methods.api.merge_tensors`` on one
tensor. Random families (della) draw from torch's global generator inside mergekit, so the draw runs
under a forked RNG seeded from the engine's per-tensor generator: the same plan and seed still give
the same bytes.
"""

from __future__ import annotations

import typing
from typing import Any

import torch

from simmerge.errors import PlanError
from simmerge.operators.base import REQUIRED, MergeOperator, Param, as_float32, check_shapes

# mergekit methods that draw random numbers (their results depend on the forked RNG).
RANDOM_METHODS = frozenset({"della", "della_linear"})
# Ranges mergekit checks only when merging (or not at all); checked here when the plan is validated.
KNOWN_RANGES: dict[str, dict[str, Any]] = {"density": {"low": 0.0, "high": 1.0, "low_open": True}}


def mergekit_methods() -> dict[str, Any]:
    """mergekit's registered methods by name, or {} when mergekit is not importable."""
    try:
        from mergekit.merge_methods import registered_methods
    except ImportError:
        return {}
    return {method.spec.name: method for method in registered_methods()}


def _param_from_spec(spec: Any) -> Param | None:
    """A mergekit ParameterSpec as a Param, or None when its type is not a plain scalar."""
    value_type, nullable = spec.value_type, False
    args = typing.get_args(value_type)
    if typing.get_origin(value_type) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        value_type, nullable = (rest[0], True) if len(rest) == 1 else (None, False)
    if value_type not in (bool, int, float):
        return None
    default = REQUIRED if spec.required else spec.default
    doc = f"mergekit {spec.scope.value} parameter"
    return Param(
        spec.name, value_type, default, nullable=nullable, doc=doc, **KNOWN_RANGES.get(spec.name, {})
    )


class MergekitDelegate(MergeOperator):
    """A mergekit method wrapped as a SimMerge operator (built from its spec, one instance per name)."""

    def __init__(self, method: Any):
        from mergekit.merge_methods.base import BasePolicy, ParameterScope

        spec = method.spec
        params = {p.name: (p, _param_from_spec(p)) for p in spec.parameters}
        unsupported = [name for name, (_, param) in params.items() if param is None]
        if unsupported:
            raise ValueError(f"mergekit method {spec.name} has non-scalar parameters {unsupported}")
        self._method = method
        self.name = spec.name  # type: ignore[misc]
        self.description = f"{spec.pretty_name or spec.name} (delegated to mergekit)"  # type: ignore[misc]
        self.method_params = tuple(p for s, p in params.values() if s.scope == ParameterScope.SHARED)
        self.model_params = tuple(p for s, p in params.values() if s.scope != ParameterScope.SHARED)
        contract = spec.contract
        self.needs_base = contract.base == BasePolicy.REQUIRED
        self.accepts_base = contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)
        self._contract = contract
        base_count = 1 if self.needs_base else 0
        self.min_models = max(1, contract.min_non_base or 0, contract.min_inputs - base_count)
        max_inputs = None if contract.max_inputs is None else contract.max_inputs - base_count
        limits = [m for m in (contract.max_non_base, max_inputs) if m is not None]
        self.max_models = min(limits) if limits else None
        self.elementwise = False
        self.random = spec.name in RANDOM_METHODS

    def _check_structure(self, given: int, n_models: int, has_base: bool) -> None:
        super()._check_structure(given, n_models, has_base)
        ids = list(range(n_models + int(has_base)))
        try:  # mergekit's own contract, e.g. limits on the total count with an optional base
            self._contract.validate_ids(ids, n_models if has_base else None)
        except ValueError as exc:
            raise PlanError(f"{self.name}: {exc}") from exc

    def check(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        if self.name in ("della", "della_linear"):
            for index, mp in enumerate(model_params):
                density, epsilon = mp["density"], mp["epsilon"]
                if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                    raise PlanError(
                        f"{self.name}: parameter 'epsilon' = {epsilon:g} (model {index + 1}) must keep "
                        f"density ± epsilon inside (0, 1) for density {density:g}"
                    )

    def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
        from mergekit.merge_methods.api import merge_tensors

        check_shapes(tensors, base, tensor_name)
        inputs = [as_float32(t) for t in tensors]
        base_index = None
        if base is not None:  # mergekit appends a base that is not listed among the models
            inputs.append(as_float32(base))
            base_index = len(tensors)
        parameters: dict[str, Any] = dict(params)
        for param in self.model_params:
            parameters[param.name] = {i: mp[param.name] for i, mp in enumerate(model_params)}
        if not self.random:
            return as_float32(self._call(merge_tensors, inputs, parameters, base_index, tensor_name))
        device = inputs[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_seed_from(generator))
            result = self._call(merge_tensors, inputs, parameters, base_index, tensor_name)
        return as_float32(result)

    def _call(self, merge_tensors, inputs, parameters, base_index, tensor_name) -> torch.Tensor:
        """mergekit's merge of one tensor; its complaints about the inputs come back as PlanError."""
        try:
            return merge_tensors(
                inputs, self._method, parameters=parameters, base_index=base_index, name=tensor_name or None
            )
        except (ValueError, TypeError) as exc:
            raise PlanError(f"{self.name} failed on tensor {tensor_name!r}: {exc}") from exc


def _seed_from(generator: torch.Generator | None) -> int:
    """A seed drawn from the engine's generator (or the global one), for mergekit's global-RNG draws."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=draw_device).item())
