"""What every merge operator declares (parameters, model counts, base policy) and how plans are checked.

An operator is a family such as ``ties`` with its parameter specs. The engine calls ``validate`` once
per plan step (so a bad plan fails before any tensor is read) and ``merge`` once per tensor.
Parameter names, scopes and defaults follow mergekit 0.1.5 so that a plan exported as mergekit YAML
means the same thing there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from simmerge.errors import IncompatibleCheckpointsError, PlanError


class _Required:
    """Marker for a parameter without a default (mergekit's ``weight`` and slerp's ``t``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class UnknownOperatorError(PlanError, KeyError):
    """No operator of that name; a KeyError too, so mapping-style callers can catch it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default (or REQUIRED) and valid range.

    ``low``/``high`` bound numbers; ``low_open``/``high_open`` make a bound exclusive. ``nullable``
    admits ``None`` (a few delegated mergekit parameters are optional floats).
    """

    name: str
    type: type
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        """The valid range in interval notation, '' when unbounded."""
        if self.low is None and self.high is None:
            return ""
        left = ("(" if self.low_open else "[") + ("-inf" if self.low is None else f"{self.low:g}")
        right = ("inf" if self.high is None else f"{self.high:g}") + (")" if self.high_open else "]")
        return f"{left}, {right}"

    def coerce(self, value: Any, where: str) -> Any:
        """The value as this parameter's type, or PlanError naming the parameter and value."""
        if value is None and self.nullable:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise PlanError(f"parameter {self.name!r}{where} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "an integer" if self.type is int else "a number"
            raise PlanError(f"parameter {self.name!r}{where} must be {kind}, got {value!r}")
        if self.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise PlanError(f"parameter {self.name!r}{where} must be an integer, got {value!r}")
            return int(value)
        number = float(value)
        if not math.isfinite(number):
            raise PlanError(f"parameter {self.name!r}{where} must be finite, got {value!r}")
        self._check_range(number, where)
        return number

    def _check_range(self, number: float, where: str) -> None:
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if too_low or too_high:
            raise PlanError(f"parameter {self.name!r}{where} = {number:g} is outside {self.range_text()}")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for docs and the REST API."""
        return {
            "name": self.name,
            "type": self.type.__name__,
            "required": self.required,
            "default": None if self.required else self.default,
            "range": self.range_text() or None,
            "doc": self.doc,
        }


class MergeOperator:
    """A merge family. Subclasses set the class attributes and implement ``merge``.

    Model counts exclude the base. ``accepts_base`` is false for families where mergekit treats a
    ``base_model`` as one more ordinary input (linear, karcher): SimMerge's engine hands the base over
    separately, so such plans are refused rather than silently meaning something else.
    ``elementwise`` is true when an output coordinate depends only on the same coordinate of the
    inputs (so a tensor may be merged in independent slices); ``random`` when ``merge`` draws from the
    generator.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    method_params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    needs_base: bool = False
    accepts_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    elementwise: bool = False
    random: bool = False
    # Traits selection reads (models/table.py describes a plan with them, so a family the predictor never
    # saw still lands near the families it resembles): sign election per coordinate, magnitude trimming,
    # spherical interpolation. ``random`` above is the random drop.
    sign_election: bool = False
    magnitude_trim: bool = False
    spherical: bool = False
    # True where the step's first input plays the base (slerp between two experts in a recommended
    # plan): such a step needs no catalog base.
    interpolates_inputs: bool = False

    # -- validation -----------------------------------------------------------------------------
    def validate(
        self,
        method_params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
        n_models: int,
        has_base: bool,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fill defaults and check a step; raises PlanError naming the bad parameter or count.

        As in mergekit, a per-model parameter given at method level applies to every model that does
        not set it itself.
        """
        self._check_structure(len(model_params), n_models, has_base)
        method_names = {p.name for p in self.method_params}
        model_names = {p.name for p in self.model_params}
        for key in method_params:
            if key not in method_names and key not in model_names:
                raise PlanError(f"unknown parameter {key!r} for {self.name} (known: {self._known()})")
        params = {p.name: self._value(p, method_params, (), "") for p in self.method_params}
        filled = [self._model_values(i, dict(mp), method_params) for i, mp in enumerate(model_params)]
        self.check(params, filled)
        return params, filled

    def _check_structure(self, given: int, n_models: int, has_base: bool) -> None:
        if given != n_models:
            raise PlanError(f"{self.name}: {given} per-model parameter sets for {n_models} models")
        if self.needs_base and not has_base:
            raise PlanError(f"{self.name} needs a base_model (task vectors are taken against it)")
        if has_base and not self.accepts_base:
            raise PlanError(
                f"{self.name} takes no base_model (mergekit would treat it as one more input); "
                "list that checkpoint under models instead"
            )
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            raise PlanError(f"{self.name} takes {self._count_text()} besides the base, got {n_models} models")

    def _count_text(self) -> str:
        if self.max_models == self.min_models:
            return f"exactly {self.min_models} model{'s' if self.min_models != 1 else ''}"
        if self.max_models is None:
            return f"at least {self.min_models} model{'s' if self.min_models != 1 else ''}"
        return f"{self.min_models} to {self.max_models} models"

    def _known(self) -> str:
        return ", ".join(p.name for p in (*self.method_params, *self.model_params)) or "none"

    def _model_values(
        self, index: int, given: dict[str, Any], method_params: Mapping[str, Any]
    ) -> dict[str, Any]:
        method_names = {p.name for p in self.method_params}
        for key in given:
            if key in method_names:
                raise PlanError(
                    f"parameter {key!r} of {self.name} is method-level; give it under the step's parameters"
                )
            if key not in {p.name for p in self.model_params}:
                raise PlanError(
                    f"unknown parameter {key!r} for model {index + 1} of {self.name} (known: {self._known()})"
                )
        where = f" (model {index + 1})"
        return {p.name: self._value(p, given, (method_params,), where) for p in self.model_params}

    def _value(
        self, param: Param, given: Mapping[str, Any], fallbacks: Sequence[Mapping[str, Any]], where: str
    ) -> Any:
        for source in (given, *fallbacks):
            if param.name in source:
                return param.coerce(source[param.name], where)
        if param.required:
            raise PlanError(f"{self.name} needs parameter {param.name!r}{where}; it has no default")
        return param.default

    def check(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        """Checks across parameters after defaults are filled; families override it."""

    def preserves_identity(self, params: Mapping[str, Any], n_inputs: int) -> bool:
        """Whether merging ``n_inputs`` copies of one checkpoint returns it unchanged; recommendations put
        such merges first for copies. ``params`` are method-level with a shared ``weight``. Trimming,
        dropping and rescaling families do not; the families that do say so."""
        return False

    @property
    def uses_base(self) -> bool:
        """The step reads a base (task vectors, or slerp's starting point)."""
        return self.needs_base

    def traits(self) -> dict[str, bool]:
        """The behaviour flags selection describes an operator with, by name (see ``TRAITS``)."""
        return {
            "uses_base": self.uses_base,
            "sign_election": self.sign_election,
            "random_drop": self.random,
            "magnitude_trim": self.magnitude_trim,
            "spherical": self.spherical,
        }

    # -- merging --------------------------------------------------------------------------------
    def merge(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        model_params: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        tensor_name: str = "",
    ) -> torch.Tensor:
        """Merge one tensor (float32 in and out); inputs are never modified."""
        raise NotImplementedError

    # -- description ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for docs, the CLI and the REST API)."""
        return {
            "name": self.name,
            "description": self.description,
            "needs_base": self.needs_base,
            "accepts_base": self.accepts_base,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "elementwise": self.elementwise,
            "random": self.random,
            "traits": self.traits(),
            "interpolates_inputs": self.interpolates_inputs,
            "method_params": [p.describe() for p in self.method_params],
            "model_params": [p.describe() for p in self.model_params],
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# The behaviour flags of ``MergeOperator.traits``, in the order selection's descriptors list them.
TRAITS = ("uses_base", "sign_election", "random_drop", "magnitude_trim", "spherical")

# Entries per slice where an operator works slice by slice (1 MiB of float32): scratch memory stays
# bounded and cache-sized whatever the tensor's size.
CHUNK = 1 << 18


def chunks(numel: int) -> list[slice]:
    """Consecutive slices of at most CHUNK entries covering ``range(numel)``."""
    return [slice(start, min(start + CHUNK, numel)) for start in range(0, numel, CHUNK)]


def check_shapes(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, tensor_name: str) -> None:
    """Inputs of one merge must share a shape; the error names the tensor (the engine checks earlier)."""
    shapes = [tuple(t.shape) for t in ([base] if base is not None else []) + list(tensors)]
    if len(set(shapes)) > 1:
        raise IncompatibleCheckpointsError(
            f"tensor {tensor_name!r} has different shapes across inputs: {shapes}"
        )


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 (no copy when it already is)."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
