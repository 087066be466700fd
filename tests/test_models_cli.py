"""`simmerge train / evaluate-selector / recommend / score-catalog` end to end on a synthetic catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations

import pandas as pd
import pytest
from click.testing import CliRunner

from models.synthetic import make_catalog, make_labels
from simmerge.cli import cli
from simmerge.plan import Plan


def _write_inputs(root, seed: int, task_offset: int = 0):
    catalog = make_catalog(n_tasks=3, per_task=3, seed=seed, task_offset=task_offset)
    labels = root / f"labels-{seed}.parquet"
    make_labels(catalog, seed=seed, triples=4).to_parquet(labels)
    pairs = list(combinations(catalog.names, 2))
    table = pd.DataFrame(catalog.pair_features(pairs), columns=catalog.feature_names)
    table.insert(0, "model_b", [b for _, b in pairs])
    table.insert(0, "model_a", [a for a, _ in pairs])
    features = root / f"pairs-{seed}.parquet"
    table.to_parquet(features)
    return catalog, labels, features


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("models-cli")
    home = root / "home"
    catalog, labels, features = _write_inputs(root, seed=0)
    holdout = _write_inputs(root, seed=5, task_offset=10)
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(home),
            "train",
            "--labels",
            str(labels),
            "--pair-features",
            str(features),
            "--seed",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root, home, catalog, labels, features, holdout


def test_train_writes_text_boosters_and_metadata(trained):
    _, home, _, labels, _, _ = trained
    out = home / "predictor"
    meta = json.loads((out / "meta.json").read_text())
    assert {"mean.txt", "q10.txt", "q90.txt"} <= {p.name for p in out.iterdir()}
    assert (out / "lasso" / "meta.json").exists() and (out / "best_fixed" / "meta.json").exists()
    from models.dataset import file_sha256

    assert meta["labels_sha256"] == file_sha256(labels)
    assert meta["validation"]["lightgbm"]["n_pools"] > 0
    assert meta["feature_schema_version"].startswith("table:")


def test_evaluate_selector_reports_every_protocol(trained):
    _, home, _, labels, features, (_, holdout_labels, holdout_features) = trained
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(home),
            "evaluate-selector",
            "--labels",
            str(labels),
            "--pair-features",
            str(features),
            "--holdout-labels",
            str(holdout_labels),
            "--holdout-pair-features",
            str(holdout_features),
            "--folds",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    reports = json.loads(result.output)
    assert set(reports) == {"held-out pairs", "leave-one-task-out", "held-out catalog"}  # tasks from labels
    assert set(reports["held-out catalog"]) == {"lightgbm", "lasso", "best_fixed", "random", "oracle"}
    catalog_reports = reports["held-out catalog"]
    assert catalog_reports["oracle"]["mean_regret"] == 0
    assert catalog_reports["lightgbm"]["mean_regret"] <= catalog_reports["random"]["mean_regret"]


def test_recommend_json_contract(trained):
    _, home, catalog, _, features, _ = trained
    a, b, c = catalog.names[:3]
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(home),
            "recommend",
            "--models",
            a,
            b,
            c,
            "--top",
            "4",
            "--base",
            "base",
            "--pair-features",
            str(features),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    plans = json.loads(result.output)["plans"]
    assert len(plans) == 4
    for plan in plans:
        assert {
            "rank",
            "models",
            "steps",
            "predicted_score",
            "uncertainty",
            "mergekit_yaml",
            "drivers",
        } <= set(plan)
        parsed = Plan.from_yaml(plan["mergekit_yaml"])
        assert set(parsed.experts()) <= {a, b, c}
    assert [p["predicted_score"] for p in plans] == sorted(
        (p["predicted_score"] for p in plans), reverse=True
    )


def test_score_catalog_writes_table_and_plot(trained, tmp_path):
    _, home, catalog, _, features, _ = trained
    names = catalog.names[:5]
    args = ["--home", str(home), "score-catalog", "--pair-features", str(features)]
    args += [x for n in names for x in ("--models", n)]
    args += ["--out", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = pd.read_csv(tmp_path / "s.csv")
    meta = json.loads((home / "predictor" / "meta.json").read_text())
    assert len(table) == 10 * len(meta["settings"])
    assert {json.loads(p) == {} or isinstance(json.loads(p), dict) for p in table["parameters"]} == {True}
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_bad_input_exits_2_naming_the_value(trained):
    _, home, catalog, _, features, _ = trained
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "simmerge",
            "--home",
            str(home),
            "recommend",
            "--models",
            catalog.names[0],
            "--pair-features",
            str(features),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith("error:") and catalog.names[0] in run.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "simmerge",
            "--home",
            str(home),
            "train",
            "--labels",
            str(home / "nope.parquet"),
            "--pair-features",
            str(features),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "nope.parquet" in run.stderr


def test_feedback_on_the_command_line_reranks_recommend(trained, tmp_path):
    """`simmerge feedback` stores a measured score in the home's store; the next `recommend` is ranked
    by the bandit, and plan #1, measured far below its prediction, is no longer first."""
    import shutil

    _, home, catalog, _, features, _ = trained
    home = shutil.copytree(home, tmp_path / "home")
    a, b = catalog.names[:2]
    ask = [
        "--home",
        str(home),
        "recommend",
        "--models",
        a,
        b,
        "--top",
        "3",
        "--pair-features",
        str(features),
        "--json",
    ]
    first = json.loads(CliRunner().invoke(cli, ask).output)
    assert first["ranked_by"] == "regressor"
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(first["plans"][0]))
    low = first["plans"][0]["predicted_score"] - 0.5
    tell = [
        "--home",
        str(home),
        "feedback",
        "--plan",
        str(plan_file),
        "--task",
        "task0",
        "--pair-features",
        str(features),
    ]
    for _ in range(3):
        result = CliRunner().invoke(cli, [*tell, "--score", str(low)])
        assert result.exit_code == 0, result.output
    after = json.loads(CliRunner().invoke(cli, ask).output)
    assert after["ranked_by"] == "bandit (exploit)"
    assert after["plans"][0]["plan"] != first["plans"][0]["plan"] and "bandit_score" in after["plans"][0]
    bad = CliRunner().invoke(cli, [*tell, "--score", "1e308"])
    assert bad.exit_code != 0 and "outside [-10, 10]" in str(bad.exception)
    single = tmp_path / "single.json"
    single.write_text(json.dumps(Plan.single("linear", [a]).to_dict()))
    result = CliRunner().invoke(cli, [*tell[:4], str(single), *tell[5:], "--score", "0.5"])
    assert result.exit_code != 0 and "at least two" in str(result.exception)
