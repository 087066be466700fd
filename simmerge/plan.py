"""Merge plans: what to merge, in which order, with which operator per step.

A plan is one k-way step, or a chain of steps where a later step names an earlier step's output
(a sequential fold `((A ⊕ B) ⊕ C)`). On disk it is mergekit's YAML schema: one document for a
single step (which `mergekit-yaml` runs as is), several documents each with a `name` for a chain,
as `mergekit-multi` writes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from simmerge.errors import PlanError

_STEP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "name", "tokenizer_source"}
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
# libyaml's emitter writes the same text as the pure-Python one, ~20x faster.
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class ModelRef:
    """A model in a step: a catalog name, a path, or the name of an earlier step."""

    model: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        return out


@dataclass(frozen=True)
class MergeStep:
    method: str
    models: tuple[ModelRef, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["merge_method"] = self.method
        if self.base_model:
            out["base_model"] = self.base_model
        out["models"] = [m.to_dict() for m in self.models]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        return out

    def non_base_models(self) -> list[ModelRef]:
        """The models an operator combines; a listed base is the reference, not an input (as in mergekit)."""
        return [m for m in self.models if m.model != self.base_model]

    def symbol(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in sorted(self.parameters.items()))
        return f"{self.method}({params})" if params else self.method


@dataclass(frozen=True)
class Plan:
    steps: tuple[MergeStep, ...]
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise PlanError("a plan needs at least one step")
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise PlanError(f"dtype {self.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            if not step.models:
                raise PlanError(f"step {index + 1} ({step.method}) lists no models")
            if len(self.steps) > 1 and not step.name:
                raise PlanError(f"step {index + 1} of a multi-step plan needs a name")
            if step.name in seen:
                raise PlanError(f"step name {step.name!r} is used twice")
            if step.name:
                seen.add(step.name)
        self._check_step_order()

    def _check_step_order(self) -> None:
        """A step may use only earlier steps: one that lists itself, a cycle, or a forward reference
        would reach the engine as a model that is neither a checkpoint nor a computed result."""
        position = {step.name: i for i, step in enumerate(self.steps) if step.name}
        for index, step in enumerate(self.steps):
            for used in _step_refs(step, position):
                if used == step.name:
                    raise PlanError(f"step {step.name!r} lists itself as a model")
                if position[used] > index:
                    cycle = _cycle_from(step.name, self.steps, position)
                    if cycle:
                        raise PlanError(f"steps {' -> '.join(map(repr, cycle))} form a cycle")
                    raise PlanError(
                        f"step {step.name!r} uses step {used!r}, which comes after it; list steps in run order"
                    )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def single(
        cls,
        method: str,
        models: Sequence[str],
        base: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        model_parameters: Sequence[Mapping[str, Any]] | None = None,
        dtype: str | None = None,
    ) -> Plan:
        per_model = list(model_parameters) if model_parameters is not None else [{} for _ in models]
        if len(per_model) != len(models):
            raise PlanError(f"{len(per_model)} parameter sets for {len(models)} models")
        refs = tuple(ModelRef(m, dict(p)) for m, p in zip(models, per_model, strict=True))
        return cls((MergeStep(method, refs, base, dict(parameters or {})),), dtype)

    @classmethod
    def fold(
        cls,
        models: Sequence[str],
        steps: Sequence[tuple[str, Mapping[str, Any]]],
        base: str | None = None,
        dtype: str | None = None,
    ) -> Plan:
        """`((m0 ⊕s0 m1) ⊕s1 m2) …`: step i merges the running result with model i+1.

        A slerp step interpolates from the running result (its base) towards the next model; other
        steps that take a base use `base` (the experts' common base).
        """
        from simmerge.operators import get_operator

        if len(steps) != len(models) - 1 or len(models) < 2:
            raise PlanError(f"a fold of {len(models)} models needs {len(models) - 1} steps, got {len(steps)}")
        built: list[MergeStep] = []
        running = models[0]
        for index, ((method, params), nxt) in enumerate(zip(steps, models[1:], strict=True)):
            params = dict(params)
            weights = params.pop("weights", None)
            model_params: list[dict[str, Any]] = (
                [{}, {}] if weights is None else [{"weight": w} for w in weights]
            )
            operator = get_operator(method)
            step_base = running if operator.interpolates_inputs else (base if operator.needs_base else None)
            refs = (ModelRef(running, model_params[0]), ModelRef(nxt, model_params[1]))
            built.append(MergeStep(method, refs, step_base, params, name=f"step{index + 1}"))
            running = f"step{index + 1}"
        return cls(tuple(built), dtype)

    # -- queries ------------------------------------------------------------------------------
    @property
    def output(self) -> MergeStep:
        return self.steps[-1]

    def step_names(self) -> set[str]:
        return {s.name for s in self.steps if s.name}

    def checkpoints(self) -> list[str]:
        """Every checkpoint the plan reads (leaf models and bases), first appearance first."""
        names = self.step_names()
        leaves: list[str] = []
        for step in self.steps:
            for ref in ([step.base_model] if step.base_model else []) + [m.model for m in step.models]:
                if ref not in names and ref not in leaves:
                    leaves.append(ref)
        return leaves

    def experts(self) -> list[str]:
        """The checkpoints being combined (leaves that are not a step's base), in plan order."""
        names = self.step_names()
        out: list[str] = []
        for step in self.steps:
            for ref in step.models if _interpolates_inputs(step.method) else step.non_base_models():
                if ref.model not in names and ref.model not in out:
                    out.append(ref.model)
        return out

    def describe(self) -> str:
        """Human form, e.g. `((A ⊕ties(density=0.5) B) ⊕linear C)`."""
        rendered: dict[str, str] = {}
        text = ""
        for step in self.steps:
            parts = [rendered.get(m.model, m.model) for m in step.models]
            text = (
                f"({f' ⊕{step.symbol()} '.join(parts)})" if len(parts) > 1 else f"{step.symbol()}({parts[0]})"
            )
            if step.name:
                rendered[step.name] = text
        return text

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": [s.to_dict() for s in self.steps]}
        if self.dtype:
            out["dtype"] = self.dtype
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan is a mapping, not {type(data).__name__}")
        if "steps" in data:
            steps = data["steps"]
            if not isinstance(steps, list):
                raise PlanError("plan 'steps' must be a list of steps")
            return cls(tuple(_step_from_dict(s, i) for i, s in enumerate(steps)), data.get("dtype"))
        return cls.from_documents([data])

    def plan_id(self) -> str:
        """Stable id: sha256 of the canonical JSON form (sorted keys), 16 hex digits."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        docs = []
        for step in self.steps:
            doc = step.to_dict()
            if self.dtype:
                doc["dtype"] = self.dtype
            docs.append(doc)
        return yaml.dump_all(docs, Dumper=YAML_DUMPER, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> Plan:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise PlanError(f"{source}: not valid YAML ({exc})") from exc
        except (ValueError, RecursionError) as exc:  # e.g. `2001-13-01` or `!!float abc`
            raise PlanError(f"{source}: a YAML value cannot be read ({exc})") from exc
        if not docs:
            raise PlanError(f"{source}: the YAML holds no merge configuration")
        return cls.from_documents(docs, source)

    @classmethod
    def from_documents(cls, docs: Sequence[Any], source: str = "plan") -> Plan:
        steps = []
        dtypes = set()
        for index, doc in enumerate(docs):
            steps.append(_step_from_dict(doc, index, source))
            dtype = _optional_string(doc, "dtype", index, source)
            if dtype:
                dtypes.add(dtype)
        if len(dtypes) > 1:
            raise PlanError(f"{source}: steps ask for different dtypes {sorted(dtypes)}")
        return cls(tuple(steps), dtypes.pop() if dtypes else None)


def _interpolates_inputs(method: str) -> bool:
    """Whether the step's base is one of the merged inputs (slerp between two experts); False if unknown."""
    from simmerge.operators import get_operator

    try:
        return get_operator(method).interpolates_inputs
    except PlanError:
        return False


def _step_refs(step: MergeStep, position: Mapping[str | None, int]) -> list[str]:
    """The step names among a step's models and base."""
    refs = [m.model for m in step.models] + ([step.base_model] if step.base_model else [])
    return [r for r in refs if r in position]


def _cycle_from(
    start: str | None, steps: Sequence[MergeStep], position: Mapping[str | None, int]
) -> list[str]:
    """A cycle of step names through `start` (closed: first name repeated last), or [] if none."""
    trail: list[str] = []
    explored: set[str] = set()  # no path back to `start` from these

    def visit(name: str) -> bool:
        if name == start and trail:
            return True
        if name in trail or name in explored:
            return False
        trail.append(name)
        if any(visit(used) for used in _step_refs(steps[position[name]], position)):
            return True
        explored.add(trail.pop())
        return False

    return [*trail, trail[0]] if start is not None and visit(start) else []


def _optional_string(doc: Mapping[str, Any], key: str, index: int, source: str) -> str | None:
    """A key whose value, when given, is a string: YAML's `dtype: [1]` is an error naming the key."""
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise PlanError(f"{source}: step {index + 1}: {key!r} must be a string, got {value!r}")
    return value


def _step_from_dict(doc: Any, index: int, source: str = "plan") -> MergeStep:
    if not isinstance(doc, Mapping):
        raise PlanError(f"{source}: document {index + 1} is not a mapping")
    if "slices" in doc:
        raise PlanError(f"{source}: mergekit 'slices' configurations are not supported; use 'models'")
    unknown = sorted(map(str, set(doc) - _STEP_KEYS))
    if unknown:
        raise PlanError(f"{source}: unknown key {unknown[0]!r} in document {index + 1}")
    method = _optional_string(doc, "merge_method", index, source)
    if not method:
        raise PlanError(f"{source}: document {index + 1} has no merge_method")
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise PlanError(f"{source}: step {index + 1} ({method}) has no models list")
    refs = []
    for entry in raw_models:
        if isinstance(entry, str) and entry:
            refs.append(ModelRef(entry))
        elif isinstance(entry, Mapping) and isinstance(entry.get("model"), str) and entry["model"]:
            params = entry.get("parameters") or {}
            if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
                raise PlanError(
                    f"{source}: parameters of model {entry['model']!r} must be a mapping of names to values"
                )
            refs.append(ModelRef(entry["model"], dict(params)))
        else:
            raise PlanError(f"{source}: step {index + 1} has a model entry without 'model': {entry!r}")
    params = doc.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise PlanError(f"{source}: step {index + 1} parameters must be a mapping")
    if not all(isinstance(key, str) for key in params):
        raise PlanError(f"{source}: step {index + 1} parameter names must be strings")
    base = _optional_string(doc, "base_model", index, source)
    name = _optional_string(doc, "name", index, source)
    _optional_string(doc, "tokenizer_source", index, source)
    return MergeStep(method, tuple(refs), base or None, dict(params), name or None)
