"""The catalog store and the `simmerge catalog` commands."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from simmerge.catalog import VERSION_TABLE, Catalog
from simmerge.cli import cli
from simmerge.errors import ConflictError, IncompatibleCheckpointsError, NotFoundError
from tests.factories import derive_expert, write_tiny_llama


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = write_tiny_llama(root / "base", seed=0)
    expert = derive_expert(base, root / "expert", seed=1)
    wide = write_tiny_llama(root / "wide", seed=0, hidden=48)
    return base, expert, wide


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """SQLite always; PostgreSQL (a fresh schema per test) when SIMMERGE_TEST_DATABASE_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    server = os.environ.get("SIMMERGE_TEST_DATABASE_URL")
    if not server:
        pytest.skip("SIMMERGE_TEST_DATABASE_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{server}{'&' if '?' in server else '?'}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_add_get_list_and_migrations(database_url, family):
    base, expert, _ = family
    with Catalog.open(url=database_url) as store:
        assert VERSION_TABLE in inspect(store.engine).get_table_names()
        store.add(base)
        entry = store.add(expert, name="math", base="base", tasks=["sum"])
        assert entry.base == "base" and entry.tasks == ["sum"] and entry.family == "base"
        assert len(entry.content_hash) == 64 and entry.architecture == "LlamaForCausalLM"
        assert [e.name for e in store.list()] == ["base", "math"]
        assert store.resolve("math") == expert.resolve()
    with Catalog.open(url=database_url) as reopened:  # persisted, and migrations are idempotent
        assert reopened.get("math").tasks == ["sum"]


def test_duplicates_unknown_base_and_incompatible_base(database_url, family):
    base, expert, wide = family
    with Catalog.open(url=database_url) as store:
        store.add(base)
        with pytest.raises(ConflictError, match="'base'"):
            store.add(base)
        with pytest.raises(NotFoundError, match="'nope'"):
            store.add(expert, base="nope")
        with pytest.raises(IncompatibleCheckpointsError, match="shape"):
            store.add(wide, base="base")
        assert [e.name for e in store.list()] == ["base"]  # nothing half-registered
        with pytest.raises(NotFoundError, match="'ghost'"):
            store.get("ghost")


def test_cli_add_list_and_errors(tmp_path, family):
    base, expert, _ = family
    runner = CliRunner()
    home = str(tmp_path / "home")
    result = runner.invoke(cli, ["--home", home, "catalog", "add", str(base)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["catalog", "add", str(expert), "--base", "base", "--home", home])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(cli, ["catalog", "list", "--json", "--home", home])
    assert [e["name"] for e in json.loads(listed.output)] == ["base", "expert"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "missing"
    proc = subprocess.run(
        [sys.executable, "-m", "simmerge", "--home", str(tmp_path), "catalog", "add", str(missing)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {missing}: no such checkpoint directory"]
