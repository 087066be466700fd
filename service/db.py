"""The service's own tables (the core catalog owns `checkpoints` and `tasks` in the same database).

Checkpoints are referred to by their catalog name, not by a foreign key, so the two Alembic
histories stay independent and either can be migrated first.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, UniqueConstraint, event
from sqlalchemy.engine import Engine, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    """One unit of background work; this row, not the worker, is the truth about it."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_pid: Mapped[int | None] = mapped_column(Integer, default=None)
    # The dispatcher running the job and its last word: a stale lease means that dispatcher is gone.
    owner: Mapped[str | None] = mapped_column(String(32), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)


class OperatorArm(Base):
    """A parameterised operator setting the bandit may choose, e.g. ties(density=0.3)."""

    __tablename__ = "operator_arms"
    __table_args__ = (UniqueConstraint("family", "parameters_key", name="uq_operator_arm_setting"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    family: Mapped[str] = mapped_column(String(64), index=True)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parameters_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Feedback(Base):
    """A score a user measured for a merged checkpoint on a task; fed to the bandit."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    merge_job_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    checkpoint: Mapped[str] = mapped_column(String(200), index=True)
    task: Mapped[str] = mapped_column(String(200), index=True)
    score: Mapped[float] = mapped_column(Float)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Label(Base):
    """A measured result: a plan's per-task score with the parents' and base's for normalising."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    plan_id: Mapped[str] = mapped_column(String(64), index=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    task: Mapped[str] = mapped_column(String(200), index=True)
    score: Mapped[float] = mapped_column(Float)
    parent_scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    base_score: Mapped[float | None] = mapped_column(Float, default=None)
    source: Mapped[str] = mapped_column(String(32), default="feedback")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token, by its sha256 only: a stolen database does not leak usable tokens."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # "config" (SIMMERGE_TOKENS, reconciled at every start) or "api" (POST /v1/tokens).
    source: Mapped[str] = mapped_column(String(16), default="config")
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SignatureKey(Base):
    """Which checkpoint has a cached signature, under which probe set: the recommendation path's index."""

    __tablename__ = "signature_keys"
    __table_args__ = (UniqueConstraint("checkpoint", "probes_hash", name="uq_signature_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    checkpoint: Mapped[str] = mapped_column(String(200), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    probes_hash: Mapped[str] = mapped_column(String(64))
    cache_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def make_engine(url: str) -> Engine:
    """An engine that copes with several processes (server + job workers) on one SQLite file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
