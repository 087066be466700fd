"""`simmerge merge` from flags and from YAML; bad input exits 2 with one line naming the culprit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from simmerge.checkpoint import Checkpoint
from tests.factories import derive_expert, write_tiny_llama


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = write_tiny_llama(root / "base", seed=0)
    experts = [derive_expert(base, root / f"e{i}", seed=i + 1) for i in range(3)]
    wide = write_tiny_llama(root / "wide", hidden=48)
    return base, experts, wide


def simmerge(*args, home):
    return subprocess.run(
        [sys.executable, "-m", "simmerge", "--home", str(home), *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_merge_from_flags_and_from_exported_yaml_agree(tmp_path, family):
    base, (a, b, _), _ = family
    flags = simmerge(
        "merge",
        "--method",
        "ties",
        "--models",
        a,
        "--models",
        b,
        "--base",
        base,
        "--param",
        "density=0.5",
        "--param",
        "weight=1.0",
        "--out",
        tmp_path / "flags",
        "--no-progress",
        home=tmp_path,
    )
    assert flags.returncode == 0, flags.stderr
    (tmp_path / "plan.yaml").write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{density: 0.5, weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{density: 0.5, weight: 1.0}}\n"
    )
    yaml_run = simmerge(
        "merge", "--config", tmp_path / "plan.yaml", "--out", tmp_path / "yaml", home=tmp_path
    )
    assert yaml_run.returncode == 0, yaml_run.stderr
    x, y = Checkpoint.open(tmp_path / "flags"), Checkpoint.open(tmp_path / "yaml")
    for name in x.names():
        assert torch.equal(x.read(name), y.read(name))


def test_merge_by_catalog_name(tmp_path, family):
    base, (a, b, _), _ = family
    for path, extra in [(base, []), (a, ["--base", "base"]), (b, ["--base", "base"])]:
        assert simmerge("catalog", "add", path, *extra, home=tmp_path).returncode == 0
    result = simmerge(
        "merge",
        "--method",
        "task_arithmetic",
        "--models",
        "e0",
        "e1",
        "--base",
        "base",
        "--param",
        "weight=0.5",
        "--out",
        tmp_path / "named",
        "--no-progress",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "named" / "simmerge.json").exists()


TIES = ["--method", "ties", "--models", "{a}", "{b}", "--base", "{base}"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "linear", "--models", "{missing}", "{a}"], "{missing}"),
        (["--method", "linear", "--models", "{notckpt}", "{a}"], "no config.json"),
        (["--method", "linear", "--models", "{a}", "{wide}", "--param", "weight=1"], "{wide}"),
        (["--method", "frobnicate", "--models", "{a}", "{b}"], "'frobnicate'"),
        ([*TIES, "--param", "bogus=1"], "bogus"),
        ([*TIES, "--param", "density=1.5", "--param", "weight=1"], "density"),
        ([*TIES, "--param", "density=0", "--param", "weight=1"], "density"),
        (["--method", "slerp", "--models", "{a}", "{b}", "{c}", "--param", "t=0.5"], "slerp"),
        (["--config", "{missing}"], "{missing}"),
    ],
)
def test_bad_input_exits_2_naming_the_value(tmp_path, family, args, needle):
    base, (a, b, c), wide = family
    (tmp_path / "notckpt").mkdir()
    values = {
        "a": a,
        "b": b,
        "c": c,
        "base": base,
        "wide": wide,
        "missing": tmp_path / "missing",
        "notckpt": tmp_path / "notckpt",
    }
    argv = [arg.format(**values) for arg in args]
    result = simmerge("merge", *argv, "--out", tmp_path / "out", home=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle.format(**values) in lines[0]
    assert not (tmp_path / "out").exists()


def test_help_lists_commands(tmp_path):
    result = simmerge("--help", home=tmp_path)
    assert result.returncode == 0 and "merge" in result.stdout and "catalog" in result.stdout
    assert simmerge("merge", "--help", home=tmp_path).returncode == 0
