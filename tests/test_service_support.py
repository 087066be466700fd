"""Shared fixtures for the service tests: a fresh database (SQLite, or PostgreSQL when
SIMMERGE_TEST_DATABASE_URL is set), tokens of each scope and a tiny checkpoint family."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.factories import derive_expert, write_tiny_llama

TOKENS = {"reader": "tok-read", "writer": "tok-write", "admin": "tok-admin"}
PG_URL = os.environ.get("SIMMERGE_TEST_DATABASE_URL")
DATABASES = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="no PostgreSQL")),
]


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def token_settings() -> dict[str, Any]:
    return {
        "reader": {"token": TOKENS["reader"], "scopes": ["read"]},
        "writer": {"token": TOKENS["writer"], "scopes": ["write"]},
        "admin": {"token": TOKENS["admin"], "scopes": ["admin"]},
    }


def fresh_database_url(kind: str, home: Path) -> str:
    """SQLite under `home`; for PostgreSQL, the test database emptied first."""
    if kind == "sqlite":
        return f"sqlite:///{home / 'simmerge.db'}"
    assert PG_URL
    url = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


def make_family(root: Path) -> dict[str, Path]:
    """A base and two experts of one tiny Llama, under a catalog root."""
    base = write_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "math": derive_expert(base, root / "math", seed=1),
        "code": derive_expert(base, root / "code", seed=2),
    }


def wait_for(predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 0.1) -> Any:
    """Poll until `predicate` returns something truthy (jobs run in other processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(params=DATABASES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield fresh_database_url(request.param, tmp_path)
