"""The streaming engine end to end on real tiny Llama checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from simmerge.checkpoint import Checkpoint
from simmerge.engine import merge_state_dict, run_merge
from simmerge.errors import IncompatibleCheckpointsError, PlanError
from simmerge.plan import Plan
from tests.factories import derive_expert, write_tiny_llama


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = write_tiny_llama(root / "base", seed=0)
    experts = [derive_expert(base, root / f"e{i}", seed=i + 1) for i in range(3)]
    return base, experts


def _weights(path):
    ckpt = Checkpoint.open(path)
    return {n: ckpt.read(n).float() for n in ckpt.names()}


def test_linear_merge_writes_a_loadable_checkpoint(tmp_path, family):
    from transformers import AutoModelForCausalLM

    _, (a, b, _) = family
    plan = Plan.single("linear", [str(a), str(b)], model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    report = run_merge(plan, tmp_path / "out", progress=False)
    wa, wb, out = _weights(a), _weights(b), _weights(tmp_path / "out")
    for name in wa:
        torch.testing.assert_close(out[name], (wa[name] + 3 * wb[name]) / 4, rtol=0, atol=1e-6)
    provenance = json.loads((tmp_path / "out" / "simmerge.json").read_text())
    assert Plan.from_dict(provenance["plan"]) == plan
    assert provenance["sources"][str(a)] == Checkpoint.open(a).content_hash()
    assert report.tensors == len(wa)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_bf16_sources_give_bf16_output_unless_dtype_says(tmp_path):
    a = write_tiny_llama(tmp_path / "a", seed=1, dtype=torch.bfloat16)
    b = write_tiny_llama(tmp_path / "b", seed=2, dtype=torch.bfloat16)
    plan = Plan.single("linear", [str(a), str(b)], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    run_merge(plan, tmp_path / "bf16", progress=False)
    run_merge(plan, tmp_path / "f32", progress=False, dtype="float32")
    name = "model.layers.1.self_attn.o_proj.weight"
    assert Checkpoint.open(tmp_path / "bf16").info(name).dtype == "BF16"
    assert Checkpoint.open(tmp_path / "f32").info(name).dtype == "F32"
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_fold_equals_merging_step_by_step(tmp_path, family):
    base, (a, b, c) = family
    plan = Plan.fold(
        [str(a), str(b), str(c)],
        [("task_arithmetic", {"weights": [1.0, 1.0]}), ("linear", {"weights": [1.0, 1.0]})],
        base=str(base),
    )
    folded = merge_state_dict(plan)
    first = Plan.single(
        "task_arithmetic", [str(a), str(b)], base=str(base), model_parameters=[{"weight": 1.0}] * 2
    )
    run_merge(first, tmp_path / "step1", progress=False)
    second = Plan.single("linear", [str(tmp_path / "step1"), str(c)], model_parameters=[{"weight": 1.0}] * 2)
    stepwise = merge_state_dict(second)
    for name, tensor in folded.items():
        torch.testing.assert_close(tensor, stepwise[name], rtol=0, atol=1e-6)


def test_sharded_and_tied_outputs_load(tmp_path):
    from transformers import AutoModelForCausalLM

    a = write_tiny_llama(tmp_path / "a", seed=1, tie=True)
    b = write_tiny_llama(tmp_path / "b", seed=2, tie=True)
    plan = Plan.single("linear", [str(a), str(b)], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    run_merge(plan, tmp_path / "out", progress=False, max_shard_size="8KB")
    out = Checkpoint.open(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in out.tensors and out.tied_embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = (
        Checkpoint.open(a).read("model.embed_tokens.weight")
        + Checkpoint.open(b).read("model.embed_tokens.weight")
    ) / 2
    torch.testing.assert_close(model.lm_head.weight.detach(), expected, rtol=0, atol=1e-6)


def test_dare_is_deterministic_for_a_seed(tmp_path, family):
    base, (a, b, _) = family
    plan = Plan.single(
        "dare_ties", [str(a), str(b)], base=str(base), model_parameters=[{"weight": 1.0, "density": 0.5}] * 2
    )
    run_merge(plan, tmp_path / "s1", seed=7, progress=False)
    run_merge(plan, tmp_path / "s1-again", seed=7, progress=False)
    run_merge(plan, tmp_path / "s2", seed=8, progress=False)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(tmp_path / "s1") == read(tmp_path / "s1-again")
    assert read(tmp_path / "s1") != read(tmp_path / "s2")


def test_incompatible_sources_leave_nothing(tmp_path, family):
    _, (a, _, _) = family
    wide = write_tiny_llama(tmp_path / "wide", hidden=48)
    plan = Plan.single("linear", [str(a), str(wide)], model_parameters=[{"weight": 1.0}] * 2)
    with pytest.raises(IncompatibleCheckpointsError, match=r"has shape \[.*\] in .*wide"):
        run_merge(plan, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]


def test_failure_halfway_leaves_no_output(tmp_path, family, monkeypatch):
    """A tensor that fails late in the stream (after shards were opened) removes the staging dir."""
    import simmerge.engine as engine

    _, (a, b, _) = family
    names = Checkpoint.open(a).names()
    real = engine._merge_tensor

    def failing(prepared, name, *args):
        if name == names[-1]:
            raise RuntimeError(f"disk full while merging {name}")
        return real(prepared, name, *args)

    monkeypatch.setattr(engine, "_merge_tensor", failing)
    plan = Plan.single("linear", [str(a), str(b)], model_parameters=[{"weight": 1.0}] * 2)
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(plan, out_root / "merged", progress=False)
    assert list(out_root.iterdir()) == []


def test_unknown_method_and_bad_parameters_are_plan_errors(family):
    base, (a, b, _) = family
    with pytest.raises(PlanError, match="'frobnicate'"):
        merge_state_dict(Plan.single("frobnicate", [str(a), str(b)]))
    bad_density = Plan.single(
        "ties", [str(a), str(b)], base=str(base), model_parameters=[{"density": 1.5, "weight": 1.0}] * 2
    )
    with pytest.raises(PlanError, match="density"):
        merge_state_dict(bad_density)


_PEAK = """
import sys, torch
from simmerge.engine import run_merge
from simmerge.plan import Plan

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

paths = sys.argv[2:]
plan = Plan.single("task_arithmetic", paths[1:], base=paths[0], model_parameters=[{"weight": 1.0}] * (len(paths) - 1))
baseline = status("VmRSS")
run_merge(plan, sys.argv[1], progress=False)
print(status("VmHWM") - baseline)
"""


def test_peak_memory_is_a_few_tensors_not_the_models(tmp_path):
    """3 inputs of 6 × 32 MiB tensors (576 MiB in all): peak stays near (inputs + 2) × 32 MiB."""
    paths = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        save_file(
            {f"t{j}": torch.full((2048, 4096), float(i + j)) for j in range(6)}, str(d / "model.safetensors")
        )
        paths.append(str(d))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / "out"), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    grown = int(out.stdout.strip())
    tensor = 32 * 2**20
    assert grown < 6 * tensor, f"peak grew by {grown / 2**20:.0f} MiB"  # the models sum to 18 tensors
    merged = Checkpoint.open(tmp_path / "out")
    assert float(merged.read("t5")[0, 0]) == 5.0 + (6 - 5) + (7 - 5)
