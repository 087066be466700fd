"""Tensor-level agreement with mergekit's own in-memory API (the reference implementation).

Every native family is run on the same random float32 tensors through SimMerge and through
``mergekit.merge_methods.api.merge_tensors``; results must agree to 1e-6. DARE families are compared
at density 1, where no random draw happens.
"""

from __future__ import annotations

import pytest
import torch

from simmerge.operators import get_operator, list_operators, native_operators

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
# mergekit's checkpoint loader touches numpy.core on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TOLERANCE = 1e-6
SHAPES = [(17, 23), (64,), (3, 5, 7)]


def random_inputs(
    shape: tuple[int, ...], n_models: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(n_models)]
    return base, experts


def simmerge_merge(method, experts, base, method_params, model_params):
    operator = get_operator(method)
    params, filled = operator.validate(method_params, model_params, len(experts), base is not None)
    generator = torch.Generator().manual_seed(0)
    return operator.merge(experts, base, filled, params, generator=generator, tensor_name="t")


def mergekit_merge(method, experts, base, method_params, model_params):
    """mergekit with the base listed last, as mergekit appends a base that is not among the models."""
    parameters = dict(method_params)
    for key in {k for mp in model_params for k in mp}:
        parameters[key] = [mp[key] for mp in model_params]
    tensors = [*experts, base] if base is not None else list(experts)
    base_index = len(experts) if base is not None else None
    return mergekit_api.merge_tensors(tensors, method, parameters=parameters, base_index=base_index)


def assert_agree(method, experts, base, method_params, model_params):
    ours = simmerge_merge(method, experts, base, method_params, model_params)
    theirs = mergekit_merge(method, experts, base, method_params, model_params)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    diff = (ours - theirs.to(torch.float32)).abs().max().item()
    assert diff <= TOLERANCE, f"{method} {method_params} {model_params}: max abs diff {diff}"


WEIGHTS = [0.7, 0.2, 0.5]
MIXED_WEIGHTS = [1.0, -0.4, 0.6]

TASK_VECTOR_CASES = [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8}, {}),
    ("ties", {}, {"density": 0.4}),
    ("ties", {"normalize": False, "lambda": 1.3}, {"density": 0.7}),
    ("ties", {"rescale": True}, {"density": 0.3}),
    ("ties", {}, {"density": 1.0}),
    ("dare_linear", {}, {"density": 1.0}),
    ("dare_linear", {"normalize": True, "rescale": False}, {"density": 1.0}),
    ("dare_ties", {}, {"density": 1.0}),
    ("dare_ties", {"normalize": True, "lambda": 0.5}, {"density": 1.0}),
    ("breadcrumbs", {}, {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs", {"rescale": True, "normalize": True}, {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs", {}, {"density": 0.9, "gamma": 0.3}),  # density + gamma > 1: fewer outliers dropped
    ("breadcrumbs_ties", {}, {"density": 0.6, "gamma": 0.02}),
    ("breadcrumbs_ties", {"normalize": True}, {"density": 0.8}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [WEIGHTS, MIXED_WEIGHTS])
@pytest.mark.parametrize(("method", "method_params", "per_model"), TASK_VECTOR_CASES)
def test_task_vector_families_agree(method, method_params, per_model, weights, shape):
    base, experts = random_inputs(shape, len(weights), seed=len(shape) + len(method))
    model_params = [{"weight": w, **per_model} for w in weights]
    assert_agree(method, experts, base, method_params, model_params)


def test_per_model_densities_agree():
    base, experts = random_inputs((31, 9), 3, seed=5)
    model_params = [{"weight": 1.0, "density": d} for d in (0.2, 0.5, 0.9)]
    for method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert_agree(method, experts, base, {}, model_params)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_agrees(shape, normalize):
    _, experts = random_inputs(shape, 3, seed=11)
    assert_agree("linear", experts, None, {"normalize": normalize}, [{"weight": w} for w in MIXED_WEIGHTS])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_agrees(shape, t):
    base, (other,) = random_inputs(shape, 1, seed=3)
    assert_agree("slerp", [other], base, {"t": t}, [{}])
    # nearly colinear pair: both take the linear branch
    assert_agree("slerp", [base * 1.5 + 1e-4], base, {"t": t}, [{}])


def test_every_native_family_is_covered():
    covered = {case[0] for case in TASK_VECTOR_CASES} | {"linear", "slerp"}
    assert {op.name for op in native_operators()} <= covered


def delegated_names() -> list[str]:
    native = {op.name for op in native_operators()}
    return [op.name for op in list_operators() if op.name not in native]


def test_delegated_families_are_listed_with_mergekit():
    assert {"model_stock", "multislerp", "della", "nuslerp", "karcher", "sce"} <= set(delegated_names())


@pytest.mark.parametrize(
    ("method", "n_models", "method_params", "per_model"),
    [
        ("model_stock", 3, {}, {}),
        ("multislerp", 3, {}, {"weight": 0.5}),
        ("nuslerp", 2, {}, {"weight": 0.5}),
        ("sce", 3, {"select_topk": 0.5}, {}),
        ("della_linear", 2, {}, {"weight": 0.5, "density": 1.0}),
    ],
)
def test_delegated_method_matches_mergekit(method, n_models, method_params, per_model):
    base, experts = random_inputs((12, 10), n_models, seed=7)
    model_params = [dict(per_model) for _ in experts]
    ours = simmerge_merge(method, experts, base, method_params, model_params)
    theirs = mergekit_merge(method, experts, base, method_params, model_params)
    assert torch.equal(ours, theirs.to(torch.float32))
    assert not torch.equal(ours, base)


def test_delegated_random_method_is_reproducible_per_generator():
    base, experts = random_inputs((40, 40), 2, seed=9)
    operator = get_operator("della")
    params, model_params = operator.validate({}, [{"weight": 1.0, "density": 0.5}] * 2, 2, True)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return operator.merge(experts, base, model_params, params, generator=generator, tensor_name="w")

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("operator", native_operators(), ids=lambda op: op.name)
def test_native_declarations_match_mergekit_registry(operator):
    """Same parameter names, scopes, defaults and required-ness as mergekit's registered method."""
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    spec = get(operator.name).spec
    theirs = {
        p.name: (p.scope == ParameterScope.SHARED, None if p.required else p.default) for p in spec.parameters
    }
    ours = {p.name: (True, None if p.required else p.default) for p in operator.method_params}
    ours |= {p.name: (False, None if p.required else p.default) for p in operator.model_params}
    assert ours == theirs
    assert operator.needs_base == (spec.contract.base == BasePolicy.REQUIRED)


# -- engine level: whole checkpoints through mergekit's run_merge and SimMerge's engine ----------
ENGINE_CASES = [
    ("linear", "none", {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    ("slerp", "base", {"t": 0.35}, [{}]),
    ("task_arithmetic", "base", {"lambda": 0.9}, [{"weight": 1.0}, {"weight": 0.6}]),
    ("ties", "base", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}]),
    ("dare_linear", "base", {}, [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}]),
    (
        "dare_ties",
        "base",
        {"normalize": True},
        [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}],
    ),
    (
        "breadcrumbs",
        "base",
        {},
        [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.8}],
    ),
    ("breadcrumbs_ties", "base", {}, [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.7}]),
    ("model_stock", "base", {}, [{}, {}]),  # delegated to mergekit's in-memory API
]


@pytest.fixture(scope="module")
def three_llamas(tmp_path_factory) -> tuple[str, str, str]:
    """A tiny random Llama base and two experts derived from it (float32, untied embeddings)."""
    from tests.factories import derive_expert, write_tiny_llama

    root = tmp_path_factory.mktemp("llamas")
    base = write_tiny_llama(root / "base", seed=0)
    experts = [derive_expert(base, root / f"expert{i}", seed=10 + i, scale=0.05) for i in (1, 2)]
    return str(base), str(experts[0]), str(experts[1])


def _load(directory) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize(
    ("method", "base_use", "method_params", "model_params"),
    ENGINE_CASES,
    ids=[case[0] for case in ENGINE_CASES],
)
def test_engine_matches_mergekit_run_merge(
    tmp_path, three_llamas, method, base_use, method_params, model_params
):
    """The same plan, exported as mergekit YAML, gives the same checkpoint through both tools."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    from simmerge.engine import run_merge
    from simmerge.plan import Plan

    base, first, second = three_llamas
    if base_use == "none":
        plan = Plan.single(method, [base, first, second], None, method_params, model_params)
    else:
        plan = Plan.single(method, [first, second][: len(model_params)], base, method_params, model_params)
    run_merge(plan, tmp_path / "simmerge", progress=False)
    config = MergeConfiguration.model_validate(yaml.safe_load(plan.to_yaml()))
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    mergekit_run_merge(config, str(tmp_path / "mergekit"), options)

    ours, theirs = _load(tmp_path / "simmerge"), _load(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    differences = {name: (ours[name] - theirs[name]).abs().max().item() for name in ours}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, f"{method}: {worst} differs by {differences[worst]}"
    sources = _load(base)
    assert any(not torch.equal(ours[name], sources[name]) for name in ours)  # a real merge happened
