"""The catalog: which checkpoints and tasks a user has registered, in a SQL database.

SQLite under the SimMerge home by default, PostgreSQL (or anything SQLAlchemy speaks) by URL. The
schema is owned by this module's Alembic history (`simmerge/migrations`, version table
`simmerge_catalog_version`); the service keeps its own tables in a second history beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    bindparam,
    create_engine,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from simmerge.checkpoint import Checkpoint, check_compatible
from simmerge.errors import ConflictError, NotFoundError, SimMergeError
from simmerge.evaluation import METRICS, load_task
from simmerge.home import resolve_home
from simmerge.paths import checked_path

VERSION_TABLE = "simmerge_catalog_version"
MIGRATIONS = Path(__file__).with_name("migrations")


def _now() -> datetime:
    return datetime.now(UTC)


class CatalogBase(DeclarativeBase):
    pass


class CheckpointRow(CatalogBase):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    path: Mapped[str] = mapped_column(String(4096))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    architecture: Mapped[str] = mapped_column(String(200))
    base: Mapped[str | None] = mapped_column(String(200), nullable=True)
    family: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tasks: Mapped[list[str]] = mapped_column(JSON, default=list)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TaskRow(CatalogBase):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    path: Mapped[str] = mapped_column(String(4096))
    metric: Mapped[str] = mapped_column(String(40))
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: Path
    base: str | None
    content_hash: str
    architecture: str
    tasks: list[str] = field(default_factory=list)
    family: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    num_parameters: int = 0

    @classmethod
    def from_row(cls, row: CheckpointRow) -> CatalogEntry:
        return cls(
            row.name,
            Path(row.path),
            row.base,
            row.content_hash,
            row.architecture,
            list(row.tasks or []),
            row.family,
            dict(row.tags or {}),
            row.plan,
            row.num_parameters,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "base": self.base,
            "content_hash": self.content_hash,
            "architecture": self.architecture,
            "tasks": self.tasks,
            "family": self.family,
            "tags": self.tags,
            "plan": self.plan,
            "num_parameters": self.num_parameters,
        }


@dataclass(frozen=True)
class TaskEntry:
    name: str
    path: Path
    metric: str
    held_out: bool


def database_url(home: Path | None = None, url: str | None = None) -> str:
    return url or f"sqlite:///{resolve_home(home) / 'simmerge.db'}"


def make_engine(url: str) -> Engine:
    return create_engine(url, future=True, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the catalog tables to the newest schema (Alembic `upgrade head`)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("version_table", VERSION_TABLE)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_BASES = select(CheckpointRow.name, CheckpointRow.base).where(
    CheckpointRow.name.in_(bindparam("names", expanding=True))
)


class Catalog:
    """Registered checkpoints and tasks. Use as a context manager, or call `close()`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, home: Path | None = None, url: str | None = None, engine: Engine | None = None) -> Catalog:
        engine = engine or make_engine(database_url(home, url))
        migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def add(
        self,
        path: str | Path,
        name: str | None = None,
        base: str | None = None,
        tasks: Sequence[str] = (),
        family: str | None = None,
        tags: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
    ) -> CatalogEntry:
        """Register a checkpoint after checking it opens and, with a base, matches the base's tensors."""
        checkpoint = Checkpoint.open(path)
        name = name or checkpoint.path.resolve().name
        if self.has(name):
            raise ConflictError(f"a checkpoint named {name!r} is already in the catalog")
        if base is not None:
            base_entry = self.get(base)
            check_compatible([Checkpoint.open(base_entry.path), checkpoint])
            family = family or base_entry.family or base
        row = CheckpointRow(
            name=name,
            path=str(checkpoint.path.resolve()),
            content_hash=checkpoint.content_hash(),
            architecture=checkpoint.architecture,
            base=base,
            family=family,
            tasks=list(tasks),
            tags=dict(tags or {}),
            plan=plan,
            num_parameters=checkpoint.num_parameters,
        )
        with Session(self.engine) as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError as exc:
                raise ConflictError(f"a checkpoint named {name!r} is already in the catalog") from exc
            return CatalogEntry.from_row(row)

    def has(self, name: str) -> bool:
        with Session(self.engine) as session:
            return session.scalar(select(CheckpointRow.id).where(CheckpointRow.name == name)) is not None

    def bases(self, names: Iterable[str]) -> dict[str, str | None]:
        """Name → base of the named checkpoints that exist, in one Core query (no ORM session): the
        service looks up every recommendation's checkpoints this way, a batch of requests at a time."""
        with self.engine.connect() as connection:
            return dict(connection.execute(_BASES, {"names": list(names)}).all())

    def get(self, name: str) -> CatalogEntry:
        with Session(self.engine) as session:
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.name == name))
            if row is None:
                raise NotFoundError(f"no checkpoint named {name!r} in the catalog")
            return CatalogEntry.from_row(row)

    def list(self) -> list[CatalogEntry]:
        with Session(self.engine) as session:
            return [
                CatalogEntry.from_row(r)
                for r in session.scalars(select(CheckpointRow).order_by(CheckpointRow.id))
            ]

    def remove(self, name: str) -> None:
        with Session(self.engine) as session:
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.name == name))
            if row is None:
                raise NotFoundError(f"no checkpoint named {name!r} in the catalog")
            session.delete(row)
            session.commit()

    def resolve(self, name_or_path: str) -> Path:
        if self.has(name_or_path):
            return self.get(name_or_path).path
        path = Path(checked_path(name_or_path, "checkpoint")).expanduser()
        if path.is_dir():
            return path
        raise NotFoundError(f"{name_or_path!r} is neither a checkpoint name in the catalog nor a directory")

    # -- tasks ---------------------------------------------------------------------------------
    def add_task(
        self,
        path: str | Path,
        name: str | None = None,
        metric: str = "token_accuracy",
        held_out: bool = False,
    ) -> TaskEntry:
        """Register a JSON Lines task file after reading it: a bad line is refused here, by number."""
        task_path = Path(checked_path(path, "task file")).resolve()
        if not task_path.is_file():
            raise NotFoundError(f"{path}: no such task file")
        if metric not in METRICS:
            raise SimMergeError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        load_task(task_path, metric)
        name = name or task_path.stem
        with Session(self.engine) as session:
            if session.scalar(select(TaskRow.id).where(TaskRow.name == name)) is not None:
                raise ConflictError(f"a task named {name!r} is already in the catalog")
            session.add(TaskRow(name=name, path=str(task_path), metric=metric, held_out=held_out))
            session.commit()
        return TaskEntry(name, task_path, metric, held_out)

    def tasks(self) -> list[TaskEntry]:
        with Session(self.engine) as session:
            rows = session.scalars(select(TaskRow).order_by(TaskRow.id))
            return [TaskEntry(r.name, Path(r.path), r.metric, r.held_out) for r in rows]

    # -- zoo -----------------------------------------------------------------------------------
    def import_zoo(self, zoo_dir: str | Path) -> list[CatalogEntry]:
        """Register a zoo's checkpoints (bases first) and tasks; ones already registered are kept."""
        from simmerge.zoo import read_catalog

        root = Path(zoo_dir)
        data = read_catalog(root)
        known = {task.name for task in self.tasks()}
        for task in data.get("tasks", []):
            if task["name"] not in known:
                self.add_task(
                    root / task["file"],
                    task["name"],
                    task.get("metric", "token_accuracy"),
                    bool(task.get("held_out", False)),
                )
        added = []
        for item in _bases_first(data.get("checkpoints", [])):
            if not self.has(item["name"]):
                added.append(
                    self.add(
                        root / item["path"],
                        item["name"],
                        item.get("base"),
                        item.get("tasks", []),
                        item.get("family"),
                        {"role": item.get("role", "expert")},
                    )
                )
        return added


def _bases_first(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    items = list(items)
    return [i for i in items if not i.get("base")] + [i for i in items if i.get("base")]
