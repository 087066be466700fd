"""Native merge operators against docs/design.md §3 on hand-made tensors, and plan validation.

Expected numbers are worked out by hand from the formulas (in the comments), not from the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from simmerge import operators
from simmerge.errors import PlanError, SimMergeError
from simmerge.operators import MergeOperator, Param, get_operator, list_operators, register

T = torch.tensor


def run(method, tensors, base=None, method_params=None, model_params=None, seed=0):
    """validate + merge one tensor, as the engine does."""
    operator = get_operator(method)
    model_params = model_params if model_params is not None else [{"weight": 1.0} for _ in tensors]
    params, filled = operator.validate(method_params or {}, model_params, len(tensors), base is not None)
    generator = torch.Generator().manual_seed(seed)
    out = operator.merge(list(tensors), base, filled, params, generator=generator, tensor_name="w")
    assert out.dtype == torch.float32
    return out


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


# -- linear -------------------------------------------------------------------------------------
def test_linear_weighted_mean_and_sum():
    a, b = T([1.0, 2.0, 3.0]), T([3.0, 0.0, -1.0])
    weights = [{"weight": 1.0}, {"weight": 3.0}]
    close(run("linear", [a, b], model_params=weights), [2.5, 0.5, 0.0])  # (a + 3b) / 4
    close(run("linear", [a, b], method_params={"normalize": False}, model_params=weights), [10.0, 2.0, 0.0])


def test_linear_weights_summing_to_zero():
    a, b = T([1.0, 2.0, 3.0]), T([3.0, 0.0, -1.0])
    cancelling = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(PlanError, match="'weight'"):
        run("linear", [a, b], model_params=cancelling)
    close(
        run("linear", [a, b], method_params={"normalize": False}, model_params=cancelling), [-2.0, 2.0, 4.0]
    )


# -- task arithmetic ----------------------------------------------------------------------------
BASE3 = T([1.0, 1.0, 1.0])
EXPERT1 = T([2.0, 0.0, 1.0])  # τ1 = [1, -1, 0]
EXPERT2 = T([1.0, 3.0, 0.0])  # τ2 = [0, 2, -1]


def test_task_arithmetic_formula():
    weights = [{"weight": 1.0}, {"weight": 0.5}]
    # base + λ(τ1 + 0.5 τ2) = [1,1,1] + 2·[1, 0, -0.5]
    close(run("task_arithmetic", [EXPERT1, EXPERT2], BASE3, {"lambda": 2.0}, weights), [3.0, 1.0, 0.0])
    # normalize divides the weighted sum by Σw = 1.5
    close(
        run("task_arithmetic", [EXPERT1, EXPERT2], BASE3, {"normalize": True}, weights),
        [1 + 1 / 1.5, 1.0, 1 - 0.5 / 1.5],
    )


def test_task_arithmetic_normalize_with_cancelling_weights_leaves_sum_undivided():
    cancelling = [{"weight": 1.0}, {"weight": -1.0}]
    # Σw = 0: the divisor is taken as 1 (mergekit), so base + τ1 − τ2 = [1,1,1] + [1, -3, 1]
    out = run("task_arithmetic", [EXPERT1, EXPERT2], BASE3, {"normalize": True}, cancelling)
    close(out, [2.0, -2.0, 2.0])


def test_task_arithmetic_ignores_density():
    weights = [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.3}]
    close(run("task_arithmetic", [EXPERT1, EXPERT2], BASE3, model_params=weights), [2.0, 2.0, 0.0])


# -- ties ---------------------------------------------------------------------------------------
ZERO4 = torch.zeros(4)
TAU = [T([1.0, -2.0, 3.0, 0.0]), T([-3.0, 1.0, 2.0, 0.0]), T([1.0, 1.0, -1.0, 0.0])]


def test_ties_density_one_is_sign_elected_mean():
    # column sums [-1, 0, 4, 0] → elected [-, +, +, +] (a zero sum counts as +)
    # coord 0 keeps -3 → -3; coord 1 keeps 1, 1 → 1; coord 2 keeps 3, 2 → 2.5; coord 3: nothing → 0
    base = T([10.0, 20.0, 30.0, 40.0])
    experts = [base + t for t in TAU]
    close(run("ties", experts, base), base + T([-3.0, 1.0, 2.5, 0.0]))


def test_ties_sign_election_uses_weighted_values_and_kept_weights():
    weights = [{"weight": 2.0}, {"weight": 1.0}, {"weight": 1.0}]
    # weighted: [2,-4,6,0], [-3,1,2,0], [1,1,-1,0]; sums [0, -2, 7, 0]
    # coord 0: sum 0 → + → (2 + 1) / (2 + 1); coord 1: − → -4 / 2; coord 2: + → (6 + 2) / (2 + 1)
    close(run("ties", TAU, ZERO4, model_params=weights), [1.0, -2.0, 8 / 3, 0.0])
    close(run("ties", TAU, ZERO4, {"normalize": False}, weights), [3.0, -4.0, 8.0, 0.0])
    close(run("ties", TAU, ZERO4, {"normalize": False, "lambda": 0.5}, weights), [1.5, -2.0, 4.0, 0.0])


def test_ties_trims_each_task_vector_to_its_largest_entries():
    taus = [T([4.0, -1.0, 0.5, -3.0]), T([-1.0, 2.0, -5.0, 0.1]), T([-2.0, 0.1, 1.0, 0.2])]
    per_model = [{"weight": 1.0, "density": 0.5} for _ in taus]
    # top-2 by magnitude: [4,0,0,-3], [0,2,-5,0], [-2,0,1,0]; sums [2,2,-4,-3] → [+,+,-,-]
    # coord 0 keeps 4 (the -2 disagrees), coord 2 keeps -5 (the 1 disagrees)
    close(run("ties", taus, ZERO4, model_params=per_model), [4.0, 2.0, -5.0, -3.0])
    # density 0.3 of 4 entries keeps int(1.2) = 1; density 0.01 still keeps one (the largest)
    close(run("ties", taus[:1], ZERO4, model_params=[{"weight": 1.0, "density": 0.3}]), [4.0, 0, 0, 0])
    close(run("ties", taus[1:2], ZERO4, model_params=[{"weight": 1.0, "density": 0.01}]), [0, 0, -5.0, 0])


def test_ties_rescale_keeps_the_l1_norm():
    tau = T([4.0, -1.0, 0.5, -3.0])  # |τ|₁ = 8.5; top-2 keeps [4, 0, 0, -3] (|.|₁ = 7)
    out = run("ties", [tau], ZERO4, {"rescale": True}, [{"weight": 1.0, "density": 0.5}])
    close(out, T([4.0, 0.0, 0.0, -3.0]) * 8.5 / 7)


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
)
def test_all_zero_task_vectors_give_the_base(method):
    base = T([[0.5, -1.0], [2.0, 3.0]])
    per_model = {"weight": 1.0, "density": 0.5}
    out = run(method, [base.clone(), base.clone()], base, {"normalize": True}, [per_model, per_model])
    assert torch.equal(out, base)


# -- dare ---------------------------------------------------------------------------------------
def dare_delta(seed, density=0.5, rescale=True, method="dare_linear", n=256):
    base = torch.zeros(n)
    tau = torch.linspace(-1.0, 1.0, n) + 0.01
    out = run(method, [tau], base, {"rescale": rescale}, [{"weight": 1.0, "density": density}], seed=seed)
    return tau, out - base


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_same_seed_same_bytes_other_seed_other_bytes(method):
    _, first = dare_delta(1, method=method)
    torch.manual_seed(12345)  # the global RNG must not matter, only the generator
    _, again = dare_delta(1, method=method)
    _, other = dare_delta(2, method=method)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert first.numpy().tobytes() != other.numpy().tobytes()


def test_dare_keeps_about_density_and_rescale_matches_the_l1_norm():
    tau, delta = dare_delta(3, density=0.3)
    kept = delta != 0
    assert 0.2 < kept.float().mean().item() < 0.4
    # survivors are scaled by one common factor ‖τ‖₁ / ‖kept τ‖₁ (≈ 1/density)
    factor = tau.abs().sum() / tau[kept].abs().sum()
    torch.testing.assert_close(delta[kept], tau[kept] * factor)
    assert 2.0 < factor.item() < 5.0
    _, plain = dare_delta(3, density=0.3, rescale=False)
    torch.testing.assert_close(plain[kept], tau[kept], rtol=0, atol=0)
    assert torch.equal(plain != 0, kept)  # the draw does not depend on rescale


def test_dare_rescale_keeps_the_expectation():
    draws = torch.stack([dare_delta(seed, density=0.4, n=64)[1] for seed in range(1500)])
    tau = dare_delta(0, n=64)[0]
    # per coordinate the spread is about |τ|·√(1/0.4 − 1) ≈ 1.2|τ|; over 1500 draws ≈ 0.03|τ|
    assert (draws.mean(dim=0) - tau).abs().max().item() < 0.15 * tau.abs().max().item()
    without = torch.stack([dare_delta(seed, density=0.4, rescale=False, n=64)[1] for seed in range(300)])
    assert (without.mean(dim=0) - 0.4 * tau).abs().max().item() < 0.15


def test_dare_at_density_one_is_task_arithmetic():
    weights = [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    expected = run("task_arithmetic", [EXPERT1, EXPERT2], BASE3, model_params=weights)
    assert torch.equal(run("dare_linear", [EXPERT1, EXPERT2], BASE3, model_params=weights), expected)


# -- breadcrumbs --------------------------------------------------------------------------------
BREAD_TAU = T([0.1, -5.0, 2.0, -0.3, 1.0, 0.05, -3.0, 0.7, 4.0, -0.2])


def test_breadcrumbs_drops_outliers_and_small_values():
    # n = 10, density 0.5 keeps 5, gamma 0.1 drops the 1 largest (|-5|), so the 4 smallest go too
    out = run(
        "breadcrumbs",
        [BREAD_TAU],
        torch.zeros(10),
        model_params=[{"weight": 1.0, "density": 0.5, "gamma": 0.1}],
    )
    close(out, [0, 0, 2.0, 0, 1.0, 0, -3.0, 0.7, 4.0, 0])


def test_breadcrumbs_with_density_plus_gamma_above_one_drops_fewer_outliers():
    # density 0.9 keeps 9, gamma 0.2 would drop 2: only the largest can go
    per_model = [{"weight": 1.0, "density": 0.9, "gamma": 0.2}]
    out = run("breadcrumbs", [BREAD_TAU], torch.zeros(10), model_params=per_model)
    close(out, BREAD_TAU * (BREAD_TAU.abs() < 5))


def test_breadcrumbs_defaults_keep_everything():
    # mergekit's defaults: density 1 (no sparsification at all), gamma 0.01
    _, filled = get_operator("breadcrumbs").validate({}, [{"weight": 1.0}], 1, True)
    assert filled == [{"weight": 1.0, "density": 1.0, "gamma": 0.01}]
    close(run("breadcrumbs", [BREAD_TAU], torch.zeros(10)), BREAD_TAU)


def test_breadcrumbs_ties_elects_signs_after_trimming():
    a = T([1.0, -4.0, 2.0, 0.5])
    b = T([-3.0, 1.0, 1.0, 0.2])
    per_model = [{"weight": 1.0, "density": 0.5, "gamma": 0.25} for _ in range(2)]
    # each keeps its 2nd and 3rd largest magnitudes: a → [1,0,2,0], b → [0,1,1,0]
    # sums [1,1,3,0] all + → coord 0: 1; coord 1: 1; coord 2: (2+1)/2 with normalize
    close(
        run("breadcrumbs_ties", [a, b], torch.zeros(4), {"normalize": True}, per_model), [1.0, 1.0, 1.5, 0.0]
    )


# -- slerp --------------------------------------------------------------------------------------
def test_slerp_of_orthogonal_tensors():
    # θ = π/2: coefficients sin(π/4)/sin(π/2) = √2/2 on each of the raw tensors
    out = run("slerp", [T([0.0, 2.0])], T([1.0, 0.0]), {"t": 0.5}, [{}])
    close(out, [math.sqrt(2) / 2, math.sqrt(2)])


def test_slerp_of_colinear_tensors_falls_back_to_lerp():
    base = T([1.0, 2.0, 3.0])
    close(run("slerp", [2 * base], base, {"t": 0.25}, [{}]), [1.25, 2.5, 3.75])
    close(run("slerp", [-base], base, {"t": 0.5}, [{}]), [0.0, 0.0, 0.0])  # antipodal too


def test_slerp_endpoints_and_asymmetry():
    generator = torch.Generator().manual_seed(0)
    base, other = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    close(run("slerp", [other], base, {"t": 0.0}, [{}]), base)
    close(run("slerp", [other], base, {"t": 1.0}, [{}]), other)
    forward = run("slerp", [other], base, {"t": 0.3}, [{}])
    close(run("slerp", [base], other, {"t": 0.7}, [{}]), forward)  # swapping ends mirrors t
    assert not torch.allclose(run("slerp", [base], other, {"t": 0.3}, [{}]), forward)


# -- validation ---------------------------------------------------------------------------------
def validate(method, method_params=None, model_params=None, n_models=2, has_base=True):
    model_params = model_params if model_params is not None else [{"weight": 1.0}] * n_models
    return get_operator(method).validate(method_params or {}, model_params, n_models, has_base)


def test_validate_fills_mergekit_defaults():
    params, filled = validate("ties", model_params=[{"weight": 0.5}, {"weight": 1.0, "density": 0.2}])
    assert params == {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.0}
    assert filled == [{"weight": 0.5, "density": 1.0}, {"weight": 1.0, "density": 0.2}]
    assert validate("dare_ties")[0]["normalize"] is False and validate("dare_ties")[0]["rescale"] is True
    assert validate("task_arithmetic")[0]["normalize"] is False


def test_method_level_value_of_a_per_model_parameter_is_a_fallback():
    _, filled = validate("ties", {"weight": 0.3, "density": 0.5}, [{}, {"weight": 2.0}])
    assert filled == [{"weight": 0.3, "density": 0.5}, {"weight": 2.0, "density": 0.5}]


@pytest.mark.parametrize(
    ("method", "method_params", "model_params", "n_models", "has_base", "named"),
    [
        ("ties", {"densty": 0.5}, None, 2, True, "'densty'"),
        ("ties", {}, [{"weight": 1.0, "gama": 0.1}, {"weight": 1.0}], 2, True, "'gama'"),
        ("ties", {}, [{"weight": 1.0, "normalize": False}, {"weight": 1.0}], 2, True, "'normalize'"),
        ("ties", {"normalize": "yes"}, None, 2, True, "'normalize'"),
        ("ties", {}, [{"weight": "heavy"}, {"weight": 1.0}], 2, True, "'weight'"),
        ("ties", {"lambda": True}, None, 2, True, "'lambda'"),
        ("ties", {}, [{"weight": 1.0, "density": 0.0}, {"weight": 1.0}], 2, True, "'density'"),
        ("dare_linear", {}, [{"weight": 1.0, "density": 1.5}, {"weight": 1.0}], 2, True, "'density'"),
        ("breadcrumbs", {}, [{"weight": 1.0, "gamma": 1.0}, {"weight": 1.0}], 2, True, "'gamma'"),
        ("breadcrumbs", {}, [{"weight": 1.0, "gamma": -0.1}, {"weight": 1.0}], 2, True, "'gamma'"),
        ("slerp", {"t": 1.5}, [{}], 1, True, "'t'"),
        ("slerp", {}, [{}], 1, True, "'t'"),
        ("ties", {}, [{}, {"weight": 1.0}], 2, True, "'weight'"),
        ("linear", {}, [{"weight": 0.5}, {"weight": -0.5}], 2, False, "'weight'"),
        ("ties", {"lambda": float("nan")}, None, 2, True, "'lambda'"),
    ],
)
def test_bad_parameters_are_named(method, method_params, model_params, n_models, has_base, named):
    with pytest.raises(PlanError, match=named):
        validate(method, method_params, model_params, n_models, has_base)


def test_bad_structure_is_named():
    with pytest.raises(PlanError, match="slerp takes exactly 1 model"):
        validate("slerp", {"t": 0.5}, [{}, {}], 2, True)
    with pytest.raises(PlanError, match="ties needs a base_model"):
        validate("ties", has_base=False)
    with pytest.raises(PlanError, match="linear takes no base_model"):
        validate("linear", has_base=True)
    with pytest.raises(PlanError, match="at least 1 model"):
        validate("ties", n_models=0, model_params=[])
    with pytest.raises(PlanError, match="2 per-model parameter sets for 3 models"):
        get_operator("ties").validate({}, [{"weight": 1.0}] * 2, 3, True)


def test_unknown_method_is_a_plan_error_and_a_key_error():
    with pytest.raises(PlanError, match="'frankenmerge'") as info:
        get_operator("frankenmerge")
    assert isinstance(info.value, KeyError) and isinstance(info.value, SimMergeError)
    assert str(info.value).startswith("unknown merge method 'frankenmerge'")


# -- registry and properties --------------------------------------------------------------------
def test_registry_lists_native_families_with_their_declarations():
    by_name = {op.name: op for op in list_operators()}
    natives = {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
    }
    assert natives <= set(by_name)
    assert (by_name["slerp"].min_models, by_name["slerp"].max_models, by_name["slerp"].needs_base) == (
        1,
        1,
        True,
    )
    assert not by_name["linear"].needs_base and by_name["ties"].needs_base
    assert {n for n in natives if by_name[n].elementwise} == {"linear", "task_arithmetic"}
    assert {n for n in natives if by_name[n].random} == {"dare_linear", "dare_ties"}
    description = by_name["breadcrumbs"].describe()
    assert {p["name"] for p in description["model_params"]} == {"weight", "density", "gamma"}
    assert next(p for p in description["model_params"] if p["name"] == "density")["range"] == "(0, 1]"


def test_a_family_is_one_class_and_one_register_line(monkeypatch):
    monkeypatch.setattr(operators, "_NATIVE", dict(operators._NATIVE))

    class Scale(MergeOperator):
        name = "scale_first"
        method_params = (Param("factor", float, 2.0, low=0.0),)
        elementwise = True

        def merge(self, tensors, base, model_params, params, *, generator=None, tensor_name=""):
            return tensors[0] * params["factor"]

    register(Scale())
    assert "scale_first" in {op.name for op in list_operators()}
    close(run("scale_first", [T([1.0, -2.0])], model_params=[{}], method_params={"factor": 3.0}), [3.0, -6.0])
    with pytest.raises(ValueError, match="already registered"):
        register(Scale())


def test_elementwise_families_merge_slices_independently():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(8, 6, generator=generator)
    experts = [base + torch.randn(8, 6, generator=generator) for _ in range(3)]
    per_model = [{"weight": w, "density": 0.5} for w in (0.5, 1.0, 0.25)]
    for method in ("task_arithmetic", "ties"):
        whole = run(method, experts, base, model_params=per_model)
        halves = torch.cat(
            [
                run(method, [e[:4] for e in experts], base[:4], model_params=per_model),
                run(method, [e[4:] for e in experts], base[4:], model_params=per_model),
            ]
        )
        # top-k trimming is per tensor, so ties differs when merged in slices
        assert torch.allclose(whole, halves) == get_operator(method).elementwise


def test_inputs_are_left_untouched_and_other_dtypes_come_out_float32():
    base = T([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    experts = [base + 1, base - 2]
    copies = [base.clone(), *(e.clone() for e in experts)]
    out = run("ties", experts, base, model_params=[{"weight": 1.0, "density": 0.5}] * 2)
    assert out.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip([base, *experts], copies, strict=True))


@pytest.mark.parametrize(
    ("method", "method_params", "per_model"),
    [
        ("task_arithmetic", {"normalize": True}, {}),
        ("ties", {}, {}),
        ("ties", {"rescale": True}, {"density": 0.4}),
        ("dare_ties", {}, {"density": 0.6}),
        ("breadcrumbs_ties", {}, {"density": 0.7, "gamma": 0.1}),
        ("slerp", {"t": 0.4}, None),
    ],
)
def test_slice_by_slice_work_gives_the_whole_tensor_result(monkeypatch, method, method_params, per_model):
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(9, 13, generator=generator)
    n = 1 if per_model is None else 3
    experts = [base + torch.randn(9, 13, generator=generator) for _ in range(n)]
    model_params = [{}] if per_model is None else [{"weight": w, **per_model} for w in (0.5, 1.0, -0.25)]
    whole = run(method, experts, base, method_params, model_params, seed=3)
    monkeypatch.setattr(operators.base, "CHUNK", 10)  # 117 entries → 12 slices, the last partial
    sliced = run(method, experts, base, method_params, model_params, seed=3)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6 if method == "slerp" else 0)


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "task_arithmetic"])
def test_mismatched_shapes_name_the_tensor(method):
    from simmerge.errors import IncompatibleCheckpointsError

    operator = get_operator(method)
    method_params = {"t": 0.5} if method == "slerp" else {}
    model_params = [{}] if method == "slerp" else [{"weight": 1.0}]
    has_base = operator.needs_base
    params, filled = operator.validate(method_params, model_params, 1, has_base)
    tensors, base = [torch.zeros(3, 4)], torch.zeros(4, 3) if has_base else None
    if not has_base:  # linear: two models of different shapes
        tensors, filled = [torch.zeros(3, 4), torch.zeros(4, 3)], filled * 2
    with pytest.raises(IncompatibleCheckpointsError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'"):
        operator.merge(tensors, base, filled, params, tensor_name="model.layers.0.mlp.up_proj.weight")


def test_without_mergekit_only_native_families_are_listed(monkeypatch):
    from simmerge.operators import delegate

    monkeypatch.setattr(operators, "_DELEGATED", None)
    monkeypatch.setattr(delegate, "mergekit_methods", lambda: {})
    names = {op.name for op in list_operators()}
    assert names == {op.name for op in operators.native_operators()}
    with pytest.raises(PlanError, match="'model_stock'"):
        get_operator("model_stock")
