"""The demo zoo: real HF checkpoints, catalog layout, experts that learned, caching, determinism."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from simmerge.checkpoint import Checkpoint, check_compatible
from simmerge.errors import CheckpointError, ConflictError, NotFoundError, SimMergeError
from simmerge.evaluation import evaluate_checkpoint, load_probes, load_task, load_tasks
from simmerge.zoo import RECIPES, ZOO_VERSION, build_zoo, read_catalog, select_tasks
from simmerge.zoo import build as zoo_build
from simmerge.zoo.tasks import TASKS, make_examples, sample_stream, vocabulary
from simmerge.zoo.tokenizer import build_tokenizer, save_verified_tokenizer


def test_catalog_layout(ci_zoo):
    catalog = read_catalog(ci_zoo)
    assert catalog["zoo_version"] == ZOO_VERSION and catalog["size"] == "ci" and catalog["seed"] == 0
    tasks = {t["name"]: t for t in catalog["tasks"]}
    for task in tasks.values():
        assert (ci_zoo / task["file"]).is_file() and task["file"].endswith(f"{task['name']}.jsonl")
        assert load_task(ci_zoo / task["file"]).examples
    assert tasks["copy"]["held_out"] and tasks["revshift"]["held_out"]
    assert load_probes(ci_zoo / catalog["probes"])
    checkpoints = {c["name"]: c for c in catalog["checkpoints"]}
    bases = [c for c in checkpoints.values() if c["role"] == "base"]
    assert {b["family"] for b in bases} == {"a", "b"} and all(b["base"] is None for b in bases)
    trained = set()
    for entry in checkpoints.values():
        assert (ci_zoo / entry["path"] / "model.safetensors").is_file()
        assert set(entry["train"]) == {"seed", "lr", "steps", "final_loss", "own_task_score"}
        if entry["role"] == "expert":
            base = checkpoints[entry["base"]]
            assert base["role"] == "base" and base["family"] == entry["family"]
            assert entry["train"]["own_task_score"] >= 0.9
            trained.update(entry["tasks"])
    assert {name for name, t in tasks.items() if not t["held_out"]} == trained
    assert len({c["family"] for c in checkpoints.values() if c["role"] == "expert"}) == 2


def test_checkpoints_load_offline_with_their_word_level_tokenizer(ci_zoo, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = ci_zoo / "checkpoints" / "a-reverse-1"
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("reverse : a b c =")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["reverse", ":", "a", "b", "c", "="]
    assert Checkpoint.open(directory).info("model.embed_tokens.weight").dtype == "F32"


def test_families_share_shapes_but_not_weights(ci_zoo):
    a = Checkpoint.open(ci_zoo / "checkpoints" / "a-base")
    b = Checkpoint.open(ci_zoo / "checkpoints" / "b-base")
    check_compatible([a, b])
    assert not torch.equal(a.read("model.embed_tokens.weight"), b.read("model.embed_tokens.weight"))


def test_experts_beat_their_base_on_their_own_task(ci_zoo):
    catalog = read_catalog(ci_zoo)
    tasks = {t.name: t for t in load_tasks(ci_zoo)}
    base_scores = {}
    for entry in catalog["checkpoints"]:
        if entry["role"] != "expert":
            continue
        own = [tasks[name] for name in entry["tasks"]]
        if entry["base"] not in base_scores:
            base_scores[entry["base"]] = evaluate_checkpoint(
                ci_zoo / "checkpoints" / entry["base"], list(tasks.values())
            )
        scores = evaluate_checkpoint(ci_zoo / entry["path"], own)
        for task in own:
            assert scores[task.name] >= 0.9
            assert scores[task.name] > base_scores[entry["base"]][task.name] + 0.3, entry["name"]


def test_second_build_of_same_zoo_is_a_no_op(ci_zoo):
    weights = ci_zoo / "checkpoints" / "a-base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_zoo(ci_zoo, "ci", 0, progress=False) == ci_zoo
    assert weights.stat().st_mtime_ns == before


def test_a_different_zoo_into_an_existing_directory_is_refused(ci_zoo):
    with pytest.raises(ConflictError, match="--force"):
        build_zoo(ci_zoo, "ci", seed=1, progress=False)


@pytest.fixture
def micro_recipe(monkeypatch):
    """The ci recipe cut to a few steps with no score bar: a whole build in seconds, for build mechanics."""
    micro = RECIPES["ci"].__class__(
        **{**RECIPES["ci"].__dict__, "base_steps": 3, "expert_steps": 2, "eval_examples": 8, "probes": 4}
    )
    monkeypatch.setitem(zoo_build.RECIPES, "ci", micro)
    monkeypatch.setattr(zoo_build, "MIN_EXPERT_SCORE", 0.0)
    return micro


def _weights_hashes(root):
    return {
        c["name"]: Checkpoint.open(root / c["path"]).content_hash() for c in read_catalog(root)["checkpoints"]
    }


def test_builds_are_deterministic_per_seed_and_subset(tmp_path, micro_recipe):
    first = build_zoo(tmp_path / "one", "ci", 5, ["rotate", "inc"], progress=False)
    second = build_zoo(tmp_path / "two", "ci", 5, ["rotate", "inc"], progress=False)
    other_seed = build_zoo(tmp_path / "three", "ci", 6, ["rotate", "inc"], progress=False)
    assert _weights_hashes(first) == _weights_hashes(second)
    assert (first / "tasks" / "inc.jsonl").read_bytes() == (second / "tasks" / "inc.jsonl").read_bytes()
    assert (first / "probes.jsonl").read_bytes() == (second / "probes.jsonl").read_bytes()
    assert set(_weights_hashes(first).values()).isdisjoint(_weights_hashes(other_seed).values())
    catalog = read_catalog(first)
    assert [t["name"] for t in catalog["tasks"]] == ["copy", "rotate", "inc"]
    assert {t["name"] for t in catalog["tasks"] if t["held_out"]} == {"copy"}
    assert {c["name"] for c in catalog["checkpoints"]} == {
        "a-base", "a-rotate-1", "a-rotate-2", "a-inc-1", "b-base", "b-rotate-1", "b-inc-1"
    }  # fmt: skip


def test_force_replaces_another_zoo_and_leaves_no_staging(tmp_path, micro_recipe):
    target = build_zoo(tmp_path / "zoo", "ci", 1, ["sort"], progress=False)
    (target / "stray.txt").write_text("old")
    with pytest.raises(ConflictError, match="different zoo"):
        build_zoo(target, "ci", 2, ["sort"], progress=False)
    assert build_zoo(target, "ci", 2, ["sort"], force=True, progress=False) == target
    assert read_catalog(target)["seed"] == 2 and not (target / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["zoo"]


def test_expert_that_misses_the_bar_fails_the_build_by_name(tmp_path, monkeypatch):
    weak = RECIPES["ci"].__class__(**{**RECIPES["ci"].__dict__, "base_steps": 3, "expert_steps": 2})
    monkeypatch.setitem(zoo_build.RECIPES, "ci", weak)
    target = tmp_path / "zoo"
    with pytest.raises(SimMergeError, match=r"a-reverse-1 .*token_accuracy"):
        build_zoo(target, "ci", 0, ["reverse"], progress=False)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []  # staging removed


def test_task_subset_selection_and_plan():
    assert select_tasks("ci", ["rotate", "inc"]) == ["copy", "rotate", "inc"]
    with pytest.raises(NotFoundError, match="nope"):
        select_tasks("ci", ["nope"])
    with pytest.raises(SimMergeError, match="trainable"):
        select_tasks("ci", ["copy", "revshift"])
    with pytest.raises(SimMergeError, match="huge"):
        select_tasks("huge", None)
    full_tasks = select_tasks("full", None)
    runs = zoo_build.plan_runs(RECIPES["full"], full_tasks, seed=0)
    experts = [r for r in runs if r.base]
    per_task = {t: [r for r in experts if r.tasks == [t]] for t in full_tasks if TASKS[t].trainable}
    assert all(len(rs) >= 2 for rs in per_task.values()) and len(per_task) >= 8
    assert any(len(r.tasks) > 1 for r in experts)  # the multi-task expert
    for runs_of_task in per_task.values():  # experts of one task differ in seed, lr and steps
        for field in ("seed", "lr", "steps"):
            family_a = [getattr(r, field) for r in runs_of_task if r.family == "a"]
            assert len(set(family_a)) == len(family_a)
    assert len({r.seed for r in runs}) == len(runs)


def test_training_is_deterministic_for_a_seed():
    from simmerge.zoo.training import train

    recipe = RECIPES["ci"]
    tokenizer = build_tokenizer(vocabulary())
    draw_args = ([TASKS["reverse"]], 7, recipe.min_len, recipe.max_len, set())
    states = []
    for _ in range(2):
        model = zoo_build._init_model(recipe, seed=3)
        train(model, tokenizer, sample_stream(*draw_args), steps=5, lr=1e-3, seed=3, batch_size=8,
              desc="t", progress=False)  # fmt: skip
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_task_generators_compute_their_answers():
    rng = random.Random(0)
    for _ in range(20):
        prompt, completion = TASKS["revshift"].example(rng, 3, 6)
        source = prompt.split(" : ")[1].removesuffix(" =").split()
        shifted = [chr((ord(t) - ord("a") + 1) % 12 + ord("a")) for t in reversed(source)]
        assert completion.split() == shifted
        prompt, completion = TASKS["dedupe"].example(rng, 3, 6)
        source = prompt.split(" : ")[1].removesuffix(" =").split()
        assert completion.split() == [t for i, t in enumerate(source) if t not in source[:i]]
        prompt, completion = TASKS["swap"].example(rng, 3, 6)
        source = prompt.split(" : ")[1].removesuffix(" =").split()
        assert len(source) % 2 == 0
        assert completion.split() == [t for pair in zip(source[1::2], source[::2], strict=True) for t in pair]


def test_training_stream_never_yields_an_evaluation_prompt():
    held = {p for p, _ in make_examples(TASKS["sort"], 200, 0, 3, 3)}
    draw = sample_stream([TASKS["sort"]], 1, 3, 3, held)
    assert not {p for p, _ in draw(500)} & held


def test_tokenizer_round_trip_check_catches_a_rebuilt_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="AutoTokenizer"):
        save_verified_tokenizer(build_tokenizer(vocabulary()), tmp_path, ["reverse : a b c = c b a"])


def test_cli_build_reports_cached_zoo_and_rejects_unknown_task(ci_zoo, tmp_path):
    from simmerge.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["zoo", "build", str(ci_zoo), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 bases" in result.output
    result = runner.invoke(cli, ["zoo", "build", str(tmp_path / "z"), "--tasks", "reverse,nope"])
    assert isinstance(result.exception, NotFoundError) and "nope" in str(result.exception)


def test_zoo_imports_into_the_catalog(ci_zoo, tmp_path):
    from simmerge.catalog import Catalog

    with Catalog.open(tmp_path / "home") as catalog:
        added = catalog.import_zoo(ci_zoo)
        assert {e.name for e in added} == {c["name"] for c in read_catalog(ci_zoo)["checkpoints"]}
        assert catalog.get("a-reverse-1").base == "a-base"


@pytest.mark.slow
def test_full_zoo_builds_with_every_expert_over_the_bar(tmp_path):
    root = build_zoo(tmp_path / "full", "full", 0, progress=False)
    catalog = read_catalog(root)
    tasks = {t["name"]: t for t in catalog["tasks"]}
    experts = [c for c in catalog["checkpoints"] if c["role"] == "expert"]
    assert len(tasks) >= 8 and sum(t["held_out"] for t in tasks.values()) >= 2
    for name, task in tasks.items():
        single = [e for e in experts if e["tasks"] == [name] and e["family"] == "a"]
        assert task["held_out"] or 2 <= len(single) <= 3
    assert any(len(e["tasks"]) > 1 for e in experts)
    assert all(e["train"]["own_task_score"] >= 0.9 for e in experts)
