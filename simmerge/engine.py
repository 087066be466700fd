"""The merge engine: runs a plan tensor by tensor.

For each output tensor the engine reads that tensor from every source checkpoint, runs the plan's
steps in order (an intermediate step's result for this tensor stays in memory only until the
steps after it have used it) and hands the result to the writer. Peak memory is therefore about
(inputs + steps + 1) tensors of the largest size, never the sum of the models.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import simmerge
from simmerge.checkpoint import LM_HEAD, Checkpoint, check_compatible
from simmerge.errors import PlanError, SimMergeError
from simmerge.operators import get_operator
from simmerge.plan import MergeStep, Plan
from simmerge.resources import check_device
from simmerge.writer import (
    OutputTensor,
    ShardedSafetensorsWriter,
    parse_size,
    staged_directory,
    write_model_files,
)

Resolver = Callable[[str], Path]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_path(model: str) -> Path:
    """Default resolver: a model string is a path."""
    return Path(model).expanduser()


@dataclass
class ResolvedStep:
    """A plan step with operator parameters validated and defaults filled."""

    step: MergeStep
    inputs: list[str]
    model_params: list[dict]
    params: dict
    index: int

    @property
    def operator(self):
        return get_operator(self.step.method)


@dataclass
class PreparedPlan:
    plan: Plan
    sources: dict[str, Checkpoint]
    reference: Checkpoint
    names: list[str]
    steps: list[ResolvedStep]


def prepare(
    plan: Plan, resolve: Resolver | None = None, checkpoints: Mapping[str, Checkpoint] | None = None
) -> PreparedPlan:
    """Open every source, validate every step and check that the sources are compatible."""
    resolve = resolve or resolve_path
    sources: dict[str, Checkpoint] = dict(checkpoints or {})
    for model in plan.checkpoints():
        if model not in sources:
            sources[model] = Checkpoint.open(resolve(model))
    step_names = plan.step_names()
    steps = [_resolve_step(step, i, step_names, sources) for i, step in enumerate(plan.steps)]
    reference = _reference_checkpoint(plan, sources)
    others = [c for c in dict.fromkeys(sources.values()) if c is not reference]
    names = check_compatible([reference, *others])
    return PreparedPlan(plan, sources, reference, names, steps)


def _resolve_step(step: MergeStep, index: int, step_names: set[str], sources: Mapping[str, Checkpoint]):
    try:
        operator = get_operator(step.method)
    except KeyError as exc:
        raise PlanError(f"unknown merge method {step.method!r}") from exc
    if step.base_model and step.base_model not in sources and step.base_model not in step_names:
        raise PlanError(
            f"step {index + 1}: base_model {step.base_model!r} is not a checkpoint or earlier step"
        )
    inputs = step.non_base_models()
    params, model_params = operator.validate(
        dict(step.parameters), [dict(m.parameters) for m in inputs], len(inputs), step.base_model is not None
    )
    return ResolvedStep(step, [m.model for m in inputs], model_params, params, index)


def _reference_checkpoint(plan: Plan, sources: Mapping[str, Checkpoint]) -> Checkpoint:
    """The checkpoint whose config and tokenizer the output inherits: the base, else the first model."""
    for step in reversed(plan.steps):
        if step.base_model in sources:
            return sources[step.base_model]
    return sources[plan.checkpoints()[0]]


def tensor_seed(seed: int, tensor_name: str, step_index: int) -> int:
    """Seed for one tensor of one step: the same plan and seed give the same bytes, whatever the order."""
    digest = hashlib.sha256(f"{seed}\0{step_index}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def iter_merged(
    prepared: PreparedPlan, device: str = "cpu", seed: int = 0, digest: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 result on `device`) for every output tensor, in the reference's order."""
    torch_device = torch.device(device)
    for name in prepared.names:
        if not prepared.reference.info(name).torch_dtype.is_floating_point:
            yield name, prepared.reference.read(name)  # integer buffers are copied, never averaged
            continue
        yield name, _merge_tensor(prepared, name, torch_device, seed, digest)


def _merge_tensor(
    prepared: PreparedPlan, name: str, device: torch.device, seed: int, digest: bool
) -> torch.Tensor:
    """Run every step for one tensor; each source is read once even if several steps use it."""
    values: dict[str, torch.Tensor] = {}  # leaf checkpoints and earlier steps' results

    def fetch(model: str) -> torch.Tensor:
        if model not in values:
            values[model] = prepared.sources[model].read(name, digest=digest).to(device, torch.float32)
        return values[model]

    for model in prepared.plan.checkpoints():
        fetch(model)  # every input in hand (as float32) before any step runs
    if digest:
        for source in prepared.sources.values():
            source.finish_digests()  # drop the raw buffers the hashing thread held before the peak
    result: torch.Tensor | None = None
    for resolved in prepared.steps:
        step = resolved.step
        base = fetch(step.base_model) if step.base_model else None
        tensors = [fetch(m) for m in resolved.inputs]
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(seed, name, resolved.index))
        result = resolved.operator.merge(
            tensors, base, resolved.model_params, resolved.params, generator=generator, tensor_name=name
        )
        if step.name:
            values[step.name] = result
    assert result is not None
    return result


def merge_state_dict(
    plan: Plan,
    *,
    resolve: Resolver | None = None,
    device: str = "cpu",
    seed: int = 0,
    checkpoints: Mapping[str, Checkpoint] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in memory (float32 on CPU): for small checkpoints that are scored without touching disk."""
    prepared = prepare(plan, resolve, checkpoints)
    return {name: tensor.to("cpu") for name, tensor in iter_merged(prepared, device, seed)}


@dataclass
class MergeReport:
    out_dir: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float


def run_merge(
    plan: Plan,
    out_dir: str | Path,
    *,
    resolve: Resolver | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    overwrite: bool = False,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    on_progress: Callable[[float], None] | None = None,
    protected: Iterable[Path] = (),
) -> MergeReport:
    """Merge to a checkpoint directory, streaming; the directory appears only when complete.

    The output may not be, contain or lie inside one of the merge's inputs or a `protected` path
    (the catalog's checkpoints), so `--overwrite` can never replace what the merge or catalog reads.
    """
    started = time.perf_counter()
    check_device(device)
    prepared = prepare(plan, resolve, checkpoints)
    check_output_path(Path(out_dir), [c.path for c in prepared.sources.values()], protected)
    out_dtype_name = dtype or plan.dtype
    if out_dtype_name is not None and out_dtype_name not in DTYPES:
        raise PlanError(f"dtype {out_dtype_name!r} is not one of {', '.join(DTYPES)}")
    layout = [_output_tensor(prepared.reference, name, out_dtype_name) for name in prepared.names]
    bytes_read = sum(
        c.info(n).nbytes for c in dict.fromkeys(prepared.sources.values()) for n in prepared.names
    )
    out_path = Path(out_dir)
    with staged_directory(out_path, overwrite) as staging:
        writer = ShardedSafetensorsWriter(staging, layout, parse_size(max_shard_size))
        bar = tqdm(total=len(layout), desc="merging", unit="tensor", disable=not progress, leave=False)
        with bar:
            # Plain iteration: zip/enumerate would keep the previous (name, tensor) tuple alive in
            # their reused result tuple while the generator computes the next tensor.
            merged = iter_merged(prepared, device, seed, digest=True)
            for done, spec in enumerate(layout, start=1):
                name, tensor = next(merged)
                writer.write(name, tensor.to(spec.dtype))
                del tensor
                bar.update()
                if on_progress:
                    on_progress(done / len(layout))
        writer.close()
        main_dtype = max(
            (t.dtype for t in layout), key=lambda d: sum(x.nbytes for x in layout if x.dtype == d)
        )
        write_model_files(staging, prepared.reference, main_dtype, ties_lm_head=LM_HEAD not in prepared.names)
        _write_provenance(staging, prepared, seed, out_dtype_name)
    return MergeReport(out_path, len(layout), bytes_read, writer.bytes_written, time.perf_counter() - started)


def check_output_path(
    out_dir: Path, inputs: Iterable[Path], protected: Iterable[Path] = (), *, choose: str = "--out"
) -> None:
    """Refuse an output that is, contains or lies inside an input or a protected checkpoint; the error
    names both and what to change (`choose`: the option or field that sets the output)."""
    out = out_dir.expanduser().resolve()
    for kind, paths in (("an input of this merge", inputs), ("a registered checkpoint", protected)):
        for path in paths:
            other = Path(path).expanduser().resolve()
            if out == other or out in other.parents or other in out.parents:
                relation = "is" if out == other else ("contains" if out in other.parents else "lies inside")
                raise SimMergeError(f"output {out_dir} {relation} {other}, {kind}; choose another {choose}")


def _output_tensor(reference: Checkpoint, name: str, dtype_name: str | None) -> OutputTensor:
    info = reference.info(name)
    dtype = info.torch_dtype
    if dtype_name is not None and dtype.is_floating_point:
        dtype = DTYPES[dtype_name]
    return OutputTensor(name, dtype, info.shape)


def _write_provenance(directory: Path, prepared: PreparedPlan, seed: int, dtype: str | None) -> None:
    record = {
        "simmerge_version": simmerge.__version__,
        "plan": prepared.plan.to_dict(),
        "plan_id": prepared.plan.plan_id(),
        "seed": seed,
        "dtype": dtype,
        "sources": {model: ckpt.content_hash() for model, ckpt in prepared.sources.items()},
    }
    (directory / "simmerge.json").write_text(json.dumps(record, indent=2) + "\n")
