"""`simmerge label`: grid, normalisation, Parquet schema, resuming, identity merges, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simmerge import evaluation
from simmerge.errors import CheckpointError, ConflictError, IncompatibleCheckpointsError, NotFoundError
from simmerge.labels import (
    GRIDS,
    SCHEMA,
    LabelPlan,
    enumerate_plans,
    held_in_score,
    held_out_score,
    label_plans,
    label_zoo,
    read_zoo,
)
from simmerge.labels import run as label_run
from simmerge.plan import Plan

DOCS = Path(__file__).resolve().parent.parent / "docs" / "labels.md"
IDENTITY_EXPERT = "a-shift-1"


def identity_plan(expert: str, base: str) -> LabelPlan:
    plan = Plan.single("linear", [expert, expert], parameters={"weight": 1.0})
    return LabelPlan(plan, "pair", (expert, expert), base, "linear", {"weight": 1.0})


@pytest.fixture(scope="module")
def labelled(ci_zoo, tmp_path_factory) -> tuple[Path, list[LabelPlan]]:
    """The small grid's first three plans plus an identity merge, labelled once for the module."""
    zoo = read_zoo(ci_zoo)
    plans = [*enumerate_plans(zoo, "small")[:3], identity_plan(IDENTITY_EXPERT, "a-base")]
    out = tmp_path_factory.mktemp("labels") / "labels.parquet"
    summary = label_plans(zoo, plans, out, progress=False)
    assert summary.labelled == len(plans) and summary.skipped == 0
    return out, plans


class CountingEvaluations:
    """Wraps `evaluate_model` to count evaluations, optionally failing on the n-th (a crash mid-run)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on
        self.real = evaluation.evaluate_model

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.real(*args, **kwargs)


# -- grid ----------------------------------------------------------------------------------------


def test_default_grid_covers_every_same_base_pair_with_every_setting(ci_zoo):
    zoo = read_zoo(ci_zoo)
    plans = enumerate_plans(zoo, "default", seed=3)
    spec = GRIDS["default"]
    pairs = [p for p in plans if p.kind == "pair"]
    expected_pairs = {
        frozenset(pair) for experts in zoo.experts_by_base().values() for pair in combinations(experts, 2)
    }
    per_pair = Counter(frozenset(p.models) for p in pairs)
    assert set(per_pair) == expected_pairs
    assert set(per_pair.values()) == {len(spec.pair_settings) + 2 * len(spec.slerp_t)}
    for plan in pairs:
        step = plan.plan.steps[0]
        assert zoo.checkpoint(plan.models[0]).base == plan.base == zoo.checkpoint(plan.models[1]).base
        if plan.method == "slerp":  # interpolates from the first model; the family base is not read
            assert step.base_model == plan.models[0] and [m.model for m in step.models] == list(plan.models)
        elif plan.method == "linear":
            assert step.base_model is None
        else:
            assert step.base_model == plan.base
    slerps = Counter((frozenset(p.models), p.params["t"]) for p in pairs if p.method == "slerp")
    assert set(slerps.values()) == {2}  # both orders of every t
    assert len({p.plan_id for p in plans}) == len(plans)
    # each expert with itself under every pair setting but slerp (whose base is one of its models)
    own = Counter(p.models for p in plans if p.kind == "self")
    experts = [e for group in zoo.experts_by_base().values() for e in group]
    assert own == {(e, e): len(spec.pair_settings) for e in experts}
    assert not any(p.kind == "self" for p in enumerate_plans(zoo, "small"))


def test_triples_and_cross_family_are_sampled_by_seed(ci_zoo):
    zoo = read_zoo(ci_zoo)
    plans = enumerate_plans(zoo, "default", triples=2, cross_family=3, seed=5)
    spec = GRIDS["default"]
    kinds = Counter(p.kind for p in plans)
    assert kinds["kway"] == 2 * len(spec.kway_settings)
    assert kinds["fold"] == 2 * spec.fold_orders * len(spec.fold_settings)
    assert kinds["cross_family"] == 3 * len(spec.cross_settings)
    folds = [p for p in plans if p.kind == "fold"]
    assert {p.method for p in folds} == {f"{a[0]}>{b[0]}" for a, b in spec.fold_settings}
    for fold in folds:  # ((A ⊕ B) ⊕ C): the second step merges the first step's result with C
        first, second = fold.plan.steps
        assert [m.model for m in second.models] == [first.name, fold.models[2]]
    last_in = Counter((frozenset(p.models), p.models[-1]) for p in folds if p.method == "linear>linear")
    assert len(last_in) == 2 * 3  # each member of each triple is folded in last once
    for plan in (p for p in plans if p.kind == "cross_family"):
        a, b = (zoo.checkpoint(m) for m in plan.models)
        assert a.base != b.base and plan.base == a.base
    assert plans == enumerate_plans(zoo, "default", triples=2, cross_family=3, seed=5)
    other = enumerate_plans(zoo, "default", triples=2, cross_family=3, seed=6)
    assert [p.plan_id for p in plans if p.kind == "pair"] == [p.plan_id for p in other if p.kind == "pair"]


def test_plan_ids_are_stable_across_processes(ci_zoo):
    here = [p.plan_id for p in enumerate_plans(read_zoo(ci_zoo), "small")]
    script = (
        "import sys; from simmerge.labels import enumerate_plans, read_zoo; "
        "print(' '.join(p.plan_id for p in enumerate_plans(read_zoo(sys.argv[1]), 'small')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(ci_zoo)], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == here
    assert all(re.fullmatch(r"[0-9a-f]{16}", pid) for pid in here)


# -- normalisation --------------------------------------------------------------------------------


def test_held_in_uses_the_best_parent_per_task_and_held_out_the_base():
    merged = {"t1": 0.6, "t2": 0.3, "h": 0.4}
    parents = {"x": {"t1": 0.8, "t2": 0.1}, "y": {"t1": 0.5, "t2": 0.6}}
    trained = {"x": ["t1"], "y": ["t1", "t2"]}
    assert held_in_score(merged, parents, trained, ["t1", "t2"]) == pytest.approx((0.6 / 0.8 + 0.3 / 0.6) / 2)
    assert held_out_score(merged, {"h": 0.5}, ["h"]) == pytest.approx(0.8)
    assert held_out_score(merged, None, ["h"]) is None
    assert held_out_score(merged, {"h": 0.0}, ["h"]) is None  # no ratio to a zero reference
    loglik = held_out_score({"h": -1.0}, {"h": -2.0}, ["h"], {"h": "loglik"})
    assert loglik == pytest.approx(math.exp(-1.0) / math.exp(-2.0))


# -- labelling on the ci zoo --------------------------------------------------------------------


def test_label_rows_follow_the_documented_schema(labelled, ci_zoo):
    out, plans = labelled
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMA
    schema_section = DOCS.read_text().split("## Schema", 1)[1]
    documented = re.findall(r"^\| `([a-z_]+)` \|", schema_section, flags=re.M)
    assert documented == SCHEMA.names
    zoo = read_zoo(ci_zoo)
    rows = {r["plan_id"]: r for r in table.to_pylist()}
    assert list(rows) == [p.plan_id for p in plans]
    for plan in plans:
        row = rows[plan.plan_id]
        assert Plan.from_dict(json.loads(row["plan_json"])).plan_id() == plan.plan_id
        assert row["models"] == list(plan.models) and row["n_models"] == len(plan.models)
        assert (row["model_a"], row["model_b"]) == plan.models[:2]
        assert json.loads(row["params_json"]) == plan.params
        assert set(json.loads(row["scores_json"])) == set(zoo.task_names())
        parents = json.loads(row["parent_scores_json"])
        assert set(parents) == set(plan.models)
        base = json.loads(row["base_scores_json"])
        trained = {t for m in plan.models for t in zoo.checkpoint(m).tasks}
        assert set(row["held_in_tasks"]) == trained and row["held_out_tasks"] == zoo.held_out_tasks()
        merged = json.loads(row["scores_json"])
        expected_in = sum(merged[t] / max(parents[m][t] for m in plan.models) for t in trained) / len(trained)
        assert row["held_in_score"] == pytest.approx(expected_in)
        expected_out = [merged[t] / base[t] for t in zoo.held_out_tasks() if base[t] > 0]
        assert row["held_out_score"] == pytest.approx(sum(expected_out) / len(expected_out))
        assert row["merge_seconds"] >= 0 and row["eval_seconds"] > 0 and row["created_at"] is not None


def test_identity_merge_normalises_to_one(labelled, ci_zoo):
    out, _ = labelled
    row = next(r for r in pq.read_table(out).to_pylist() if r["models"] == [IDENTITY_EXPERT] * 2)
    parent = json.loads(row["parent_scores_json"])[IDENTITY_EXPERT]
    assert json.loads(row["scores_json"]) == parent
    assert row["held_in_tasks"] == list(read_zoo(ci_zoo).checkpoint(IDENTITY_EXPERT).tasks)
    assert row["held_in_score"] == 1.0


def test_a_crashed_run_keeps_finished_rows_and_a_rerun_redoes_nothing(ci_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(label_run, "CHUNK_ROWS", 1)
    out = tmp_path / "labels.parquet"
    plans = enumerate_plans(read_zoo(ci_zoo), "small")[:3]  # one pair, so three checkpoints to score
    checkpoints = {m for p in plans for m in (*p.models, p.base)}
    crash = CountingEvaluations(fail_on=len(checkpoints) + 3)  # the third plan's evaluation fails
    monkeypatch.setattr(evaluation, "evaluate_model", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_zoo(ci_zoo, out, grid="small", limit=3, progress=False)
    assert pq.read_table(out).column("plan_id").to_pylist() == [p.plan_id for p in plans[:2]]

    counting = CountingEvaluations()
    monkeypatch.setattr(evaluation, "evaluate_model", counting)
    summary = label_zoo(ci_zoo, out, grid="small", limit=3, progress=False)
    assert (summary.skipped, summary.labelled, summary.checkpoints_scored) == (2, 1, 0)
    assert counting.calls == 1  # parents and base came from the file's metadata
    assert pq.read_table(out).column("plan_id").to_pylist() == [p.plan_id for p in plans]

    before = out.read_bytes()
    again = label_zoo(ci_zoo, out, grid="small", limit=3, progress=False)
    assert (again.labelled, counting.calls) == (0, 1) and out.read_bytes() == before


@pytest.mark.slow
def test_worker_processes_give_the_same_labels(labelled, ci_zoo, tmp_path):
    out, plans = labelled
    pooled = tmp_path / "pooled.parquet"
    label_plans(read_zoo(ci_zoo), plans, pooled, workers=2, progress=False)
    columns = ["plan_id", "scores_json", "held_in_score", "held_out_score"]
    key = "plan_id"
    serial = sorted(pq.read_table(out).select(columns).to_pylist(), key=lambda r: r[key])
    assert sorted(pq.read_table(pooled).select(columns).to_pylist(), key=lambda r: r[key]) == serial


# -- bad input ------------------------------------------------------------------------------------


def copy_zoo(source: Path, target: Path) -> Path:
    """A zoo whose catalog points at `source`'s checkpoints by absolute path (nothing copied but JSON)."""
    target.mkdir()
    shutil.copytree(source / "tasks", target / "tasks")
    catalog = json.loads((source / "catalog.json").read_text())
    for entry in catalog["checkpoints"]:
        entry["path"] = str(source / entry["path"])
    (target / "catalog.json").write_text(json.dumps(catalog))
    return target


def edit_catalog(zoo: Path, name: str, **changes) -> None:
    catalog = json.loads((zoo / "catalog.json").read_text())
    next(c for c in catalog["checkpoints"] if c["name"] == name).update(changes)
    (zoo / "catalog.json").write_text(json.dumps(catalog))


def test_zoo_without_catalog_is_named(tmp_path, capsys):
    from simmerge.cli import main

    with pytest.raises(NotFoundError, match=re.escape(f"zoo {tmp_path}: no catalog.json")):
        label_zoo(tmp_path, tmp_path / "l.parquet", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "--zoo", str(tmp_path), "--out", str(tmp_path / "l.parquet"), "--no-progress"])
    assert exit_info.value.code == 2 and "catalog.json" in capsys.readouterr().err


def test_checkpoint_of_another_shape_is_named(ci_zoo, tmp_path, tiny_llama_factory):
    zoo = copy_zoo(ci_zoo, tmp_path / "zoo")
    edit_catalog(zoo, "a-reverse-2", path=str(tiny_llama_factory("alien", hidden=32, tokenizer=True)))
    with pytest.raises(IncompatibleCheckpointsError, match="checkpoint 'a-reverse-2'"):
        label_zoo(zoo, tmp_path / "l.parquet", grid="small", limit=1, progress=False)
    assert not (tmp_path / "l.parquet").exists()


def test_checkpoint_of_another_architecture_is_named(ci_zoo, tmp_path):
    zoo = copy_zoo(ci_zoo, tmp_path / "zoo")
    foreign = shutil.copytree(ci_zoo / "checkpoints" / "a-reverse-2", tmp_path / "foreign")
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    edit_catalog(zoo, "a-reverse-2", path=str(foreign))
    with pytest.raises(IncompatibleCheckpointsError, match=r"'a-reverse-2'.*MistralForCausalLM"):
        label_zoo(zoo, tmp_path / "l.parquet", grid="small", limit=1, progress=False)


def test_missing_checkpoint_directory_is_named(ci_zoo, tmp_path):
    zoo = copy_zoo(ci_zoo, tmp_path / "zoo")
    edit_catalog(zoo, "b-shift-1", path=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="checkpoint 'b-shift-1'"):
        label_zoo(zoo, tmp_path / "l.parquet", progress=False)


def test_labels_of_another_zoo_are_not_mixed(labelled, ci_zoo, tmp_path):
    out, _ = labelled
    zoo = copy_zoo(ci_zoo, tmp_path / "zoo")
    with pytest.raises(ConflictError, match="another zoo"):
        label_zoo(zoo, out, grid="small", limit=1, progress=False)


def test_two_runs_never_write_one_labels_file(ci_zoo, tmp_path):
    from simmerge.labels.store import exclusive_writer

    out = tmp_path / "l.parquet"
    with exclusive_writer(out), pytest.raises(ConflictError, match="another `simmerge label` run"):
        label_zoo(ci_zoo, out, grid="small", limit=1, progress=False)
    assert not out.exists()


# -- headroom benchmark arithmetic ----------------------------------------------------------------


def _row(models, method, params, score, kind="pair"):
    return {
        "models": list(models),
        "method": method,
        "params_json": json.dumps(params),
        "kind": kind,
        "held_in_score": score,
        "held_out_score": None,
    }


def test_headroom_best_fixed_must_cover_every_pool_and_oracle_takes_each_pools_best():
    from bench.headroom import headroom, setting_key

    rows = [
        _row("xy", "linear", {"weight": 1.0}, 0.5),
        _row("xy", "ties", {"density": 0.5}, 0.7),
        _row("xy", "slerp", {"t": 0.3}, 0.9),  # best there, but labelled in one pool only
        _row("xz", "linear", {"weight": 1.0}, 0.6),
        _row("xz", "ties", {"density": 0.5}, 0.3),
    ]
    (group,) = headroom(rows)
    assert (group.pools, group.plans) == (2, 5)
    assert group.best_fixed == "linear(weight=1.0)" and group.best_fixed_mean == pytest.approx(0.55)
    assert group.oracle_mean == pytest.approx(0.75) and group.gap == pytest.approx(0.2)
    shares = {s.setting: s.best_share for s in group.settings}
    assert shares == {"linear(weight=1.0)": 0.5, "ties(density=0.5)": 0.0, "slerp(t=0.3) from 1st": 1.0}
    swapped = _row("yx", "slerp", {"t": 0.3}, 0.1)
    assert setting_key(swapped) == "slerp(t=0.3) from 2nd"
