"""Plans: mergekit YAML in and out, folds, stable ids, malformed input named."""

from __future__ import annotations

import pytest
import yaml

from simmerge.errors import PlanError
from simmerge.plan import Plan

MERGEKIT_TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {density: 0.5, weight: 1.0}
  - model: b
    parameters: {density: 0.3, weight: 0.5}
parameters:
  normalize: true
dtype: bfloat16
"""


def test_mergekit_yaml_round_trip():
    plan = Plan.from_yaml(MERGEKIT_TIES)
    assert plan.dtype == "bfloat16"
    step = plan.output
    assert (step.method, step.base_model) == ("ties", "base")
    assert [m.model for m in step.models] == ["a", "b"]
    assert step.models[1].parameters == {"density": 0.3, "weight": 0.5}
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan and again.plan_id() == plan.plan_id()
    # a one-step export is a single mergekit document with the same keys
    (doc,) = list(yaml.safe_load_all(plan.to_yaml()))
    assert set(doc) == {"merge_method", "base_model", "models", "parameters", "dtype"}


def test_fold_refers_to_earlier_steps_and_slerp_uses_running_result():
    plan = Plan.fold(["a", "b", "c"], [("ties", {"density": 0.5}), ("slerp", {"t": 0.3})], base="base")
    first, second = plan.steps
    assert first.name == "step1" and first.base_model == "base"
    assert [m.model for m in second.models] == ["step1", "c"] and second.base_model == "step1"
    assert plan.checkpoints() == ["base", "a", "b", "c"]
    assert plan.experts() == ["a", "b", "c"]
    assert plan.describe() == "((a ⊕ties(density=0.5) b) ⊕slerp(t=0.3) c)"
    docs = list(yaml.safe_load_all(plan.to_yaml()))
    assert [d["name"] for d in docs] == ["step1", "step2"]
    assert Plan.from_yaml(plan.to_yaml()) == plan


def test_plan_id_is_stable_and_sensitive():
    a = Plan.single("linear", ["x", "y"], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    b = Plan.single("linear", ["x", "y"], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    c = Plan.single("linear", ["y", "x"], model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    assert a.plan_id() == b.plan_id() != c.plan_id()
    assert Plan.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: ties\n", "has no models"),
        ("models: [{model: a}]\n", "no merge_method"),
        ("merge_method: ties\nmodels: [a]\nbogus: 1\n", "unknown key 'bogus'"),
        ("merge_method: ties\nmodels: [{model: a, parameters: 3}]\n", "parameters of model 'a'"),
        ("merge_method: [\n", "not valid YAML"),
        ("merge_method: linear\nmodels: [a]\ndtype: int8\n", "dtype 'int8'"),
        ("slices: []\nmerge_method: linear\n", "'slices'"),
        ("", "holds no merge configuration"),
    ],
)
def test_malformed_plans_are_named(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(text, source="plan.yaml")


def test_multi_step_needs_unique_names():
    text = (
        "name: s\nmerge_method: linear\nmodels: [a, b]\n---\nname: s\nmerge_method: linear\nmodels: [s, c]\n"
    )
    with pytest.raises(PlanError, match="'s' is used twice"):
        Plan.from_yaml(text)


def test_fast_yaml_emitter_writes_the_pure_python_text():
    import yaml

    plan = Plan.fold(
        ["a", "b", "c"], [("ties", {"density": 0.5}), ("linear", {"weights": [1.0, 2.0]})], dtype="bfloat16"
    )
    docs = list(yaml.safe_load_all(plan.to_yaml()))
    assert plan.to_yaml() == yaml.dump_all(docs, Dumper=yaml.SafeDumper, sort_keys=False)


NAMES = [
    "a",
    "expert_1",
    "org/model-7b.v2",
    "true",
    "No",
    "null",
    "1.5",
    "0x1F",
    "two words",
    "x: y",
    "#c",
    "é",
]


@pytest.mark.parametrize("name", NAMES)
def test_plan_yaml_round_trips_any_name(name):
    """Names YAML would read as another type (true, 1.5, null) come back as the same strings."""
    plan = Plan.fold([name, f"{name}-b", "c"], [("ties", {"density": 0.5}), ("linear", {})], base="base")
    assert Plan.from_yaml(plan.to_yaml()) == plan
