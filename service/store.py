"""Repository over the service's tables: the only code that writes SQL for jobs, arms, feedback, tokens.

Both the server and its job workers use it, each with their own engine on the same database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.ports import FeedbackRecord
from service.db import (
    TERMINAL_STATUSES,
    ApiToken,
    Feedback,
    Job,
    OperatorArm,
    SignatureKey,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from simmerge.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from simmerge.catalog import Catalog

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def migrate(engine: Engine) -> None:
    """Bring the service's tables to the newest revision (idempotent; run at every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def open_store(home: Path | None) -> Store:
    """The store of a home as the command line uses it (the catalog's SQLite database), migrated."""
    from simmerge.catalog import database_url
    from simmerge.catalog import migrate as migrate_catalog

    store = Store(database_url(home))
    migrate_catalog(store.engine)
    migrate(store.engine)
    return store


def canonical_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Store:
    """Typed access to the service tables; every method opens and commits its own short session."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = make_sessionmaker(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def catalog(self) -> Catalog:
        """The catalog on this store's database."""
        from simmerge.catalog import Catalog

        return Catalog(self.engine)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- jobs -------------------------------------------------------------------------------------
    def create_job(
        self,
        kind: str,
        request: dict[str, Any],
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
        fingerprint: Any = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job, or return the one already made under `idempotency_key` (created=False).

        Reusing a key with a different request (compared by `fingerprint`, the client's body, when
        given) is a conflict, not a silent replay of the old one.
        """
        request_hash = canonical_hash(
            {"kind": kind, "request": request if fingerprint is None else fingerprint}
        )
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing is not None:
                return self._check_replay(existing, request_hash, idempotency_key), False
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            status="queued",
            progress=0.0,
            attempts=0,
            max_attempts=max_attempts,
            request=request,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            cancel_requested=False,
        )
        try:
            with self.session() as session:
                session.add(job)
        except IntegrityError:  # a concurrent POST with the same key won the race
            existing = self.job_by_key(idempotency_key or "")
            if existing is None:
                raise
            return self._check_replay(existing, request_hash, idempotency_key or ""), False
        return job, True

    @staticmethod
    def _check_replay(job: Job, request_hash: str, key: str) -> Job:
        if job.request_hash != request_hash:
            raise ConflictError(f"Idempotency-Key {key!r} was already used for a different request")
        return job

    def job_by_key(self, key: str) -> Job | None:
        with self.session() as session:
            return session.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def get_job(self, job_id: str, kind: str | None = None) -> Job:
        with self.session() as session:
            job = session.get(Job, job_id)
        if job is None or (kind is not None and job.kind != kind):
            raise NotFoundError(f"no {kind or 'job'} job {job_id!r}")
        return job

    def list_jobs(
        self, *, kind: str | None = None, status: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[Job], int]:
        query = select(Job)
        if kind:
            query = query.where(Job.kind == kind)
        if status:
            query = query.where(Job.status == status)
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(Job.created_at, Job.id).offset(offset).limit(limit)).all()
        return list(rows), total

    def jobs_with_status(self, *statuses: str) -> list[Job]:
        with self.session() as session:
            rows = session.scalars(select(Job).where(Job.status.in_(statuses)).order_by(Job.created_at)).all()
        return list(rows)

    def claim_next_job(self, owner: str | None = None, kinds: Sequence[str] | None = None) -> Job | None:
        """Atomically move the oldest queued job to running under `owner`'s lease; count the attempt."""
        for candidate in self.jobs_with_status("queued"):
            if kinds is not None and candidate.kind not in kinds:
                continue
            now = utcnow()
            with self.session() as session:
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == candidate.id, Job.status == "queued")
                    .values(
                        status="running",
                        attempts=Job.attempts + 1,
                        started_at=now,
                        updated_at=now,
                        worker_pid=None,
                        progress=0.0,
                        owner=owner,
                        heartbeat_at=now,
                    )
                ).rowcount
            if claimed:
                return self.get_job(candidate.id)
        return None

    def heartbeat(self, owner: str) -> None:
        """Renew the lease on every job `owner` is running."""
        with self.session() as session:
            session.execute(
                update(Job).where(Job.owner == owner, Job.status == "running").values(heartbeat_at=utcnow())
            )

    def orphaned_jobs(self, owner: str, lease_s: float) -> list[Job]:
        """Running jobs of another dispatcher whose lease lapsed (or that never had one)."""
        stale_before = utcnow() - dt.timedelta(seconds=lease_s)
        query = select(Job).where(
            Job.status == "running",
            or_(Job.owner.is_(None), Job.owner != owner),
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
        )
        with self.session() as session:
            return list(session.scalars(query.order_by(Job.created_at)).all())

    def update_job(self, job_id: str, *, only_if_status: Sequence[str] | None = None, **values: Any) -> bool:
        """Set fields on a job; with `only_if_status`, only while it is in one of those states."""
        values.setdefault("updated_at", utcnow())
        if values.get("status") in TERMINAL_STATUSES:
            values.setdefault("finished_at", utcnow())
        query = update(Job).where(Job.id == job_id)
        if only_if_status is not None:
            query = query.where(Job.status.in_(only_if_status))
        with self.session() as session:
            return bool(session.execute(query.values(**values)).rowcount)

    def request_cancel(self, job_id: str, kind: str | None = None) -> Job:
        """Queued jobs are cancelled at once; running ones are flagged for the dispatcher to kill."""
        job = self.get_job(job_id, kind)
        if job.status in TERMINAL_STATUSES:
            raise ConflictError(f"job {job_id!r} is already {job.status}")
        if not self.update_job(job_id, only_if_status=["queued"], status="cancelled", cancel_requested=True):
            self.update_job(job_id, only_if_status=["running"], cancel_requested=True)
        return self.get_job(job_id)

    def count_jobs_by_status(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {status: count for status, count in rows}

    # ---- operator arms ----------------------------------------------------------------------------
    def add_arm(self, family: str, parameters: dict[str, Any], name: str | None = None) -> OperatorArm:
        key = canonical_hash(parameters)
        arm = OperatorArm(
            name=name or arm_name(family, parameters),
            family=family,
            parameters=parameters,
            parameters_key=key,
        )
        try:
            with self.session() as session:
                session.add(arm)
        except IntegrityError as exc:
            raise ConflictError(f"operator setting {arm.name!r} is already an arm") from exc
        return arm

    def list_arms(self, family: str | None = None) -> list[OperatorArm]:
        query = select(OperatorArm).order_by(OperatorArm.id)
        if family:
            query = query.where(OperatorArm.family == family)
        with self.session() as session:
            return list(session.scalars(query).all())

    # ---- feedback and labels ----------------------------------------------------------------------
    def add_feedback(
        self, *, checkpoint: str, task: str, score: float, plan: dict[str, Any], merge_job_id: str | None
    ) -> Feedback:
        """One measured score: the one record of it, and the bandit's evidence (`feedback_since`)."""
        row = Feedback(checkpoint=checkpoint, task=task, score=score, plan=plan, merge_job_id=merge_job_id)
        with self.session() as session:
            session.add(row)
        return row

    def feedback_since(self, after_id: int) -> list[FeedbackRecord]:
        """Feedback rows with an id above `after_id`, oldest first (the bandit's `FeedbackLog`)."""
        query = select(Feedback.id, Feedback.plan, Feedback.task, Feedback.score).where(
            Feedback.id > after_id
        )
        with self.session() as session:
            rows = session.execute(query.order_by(Feedback.id)).all()
        return [FeedbackRecord(int(i), dict(plan), str(task), float(score)) for i, plan, task, score in rows]

    def arm_settings(self) -> list[tuple[str, dict[str, Any]]]:
        """(family, parameters) of every arm, oldest first (the selector's `ArmSource`)."""
        return [(arm.family, dict(arm.parameters)) for arm in self.list_arms()]

    def list_feedback(self) -> list[Feedback]:
        with self.session() as session:
            return list(session.scalars(select(Feedback).order_by(Feedback.id)).all())

    # ---- tokens -----------------------------------------------------------------------------------
    def reconcile_configured_tokens(
        self, configured: dict[str, tuple[str, Sequence[str]]]
    ) -> tuple[list[str], list[str]]:
        """Make the configuration-made rows match `configured` ({name: (sha256, scopes)}) in one
        transaction: rows no longer configured are deleted, the others written. A revoked row keeps
        its revocation while its digest is unchanged (a restart must not revive a leaked token).
        Returns (names removed, names still revoked)."""
        removed: list[str] = []
        still_revoked: list[str] = []
        try:
            with self.session() as session:
                for row in session.scalars(select(ApiToken).where(ApiToken.source == "config")).all():
                    if row.name not in configured:
                        removed.append(row.name)
                        session.delete(row)
                session.flush()
                for name, (sha256, scopes) in configured.items():
                    if self._write_configured_token(session, name, sha256, scopes):
                        still_revoked.append(name)
        except IntegrityError as exc:
            raise ConflictError("two tokens (configured or made through the API) share one digest") from exc
        return removed, still_revoked

    @staticmethod
    def _write_configured_token(session: Session, name: str, sha256: str, scopes: Sequence[str]) -> bool:
        """Insert or update one configured token; True when it stays revoked."""
        scope_text = ",".join(sorted(set(scopes)))
        row = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
        if row is None:
            session.add(ApiToken(name=name, sha256=sha256, scopes=scope_text, revoked=False, source="config"))
            return False
        keep_revoked = row.revoked and row.sha256 == sha256
        row.sha256, row.scopes, row.source = sha256, scope_text, "config"
        row.revoked = keep_revoked
        row.revoked_at = row.revoked_at if keep_revoked else None
        return keep_revoked

    def add_token(self, name: str, sha256: str, scopes: Sequence[str]) -> ApiToken:
        row = ApiToken(
            name=name, sha256=sha256, scopes=",".join(sorted(set(scopes))), revoked=False, source="api"
        )
        try:
            with self.session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise ConflictError(f"a token named {name!r} already exists") from exc
        return row

    def revoke_token(self, name: str) -> ApiToken:
        """Revoke by name (idempotent); every process reads the row per request, so it holds at once."""
        with self.session() as session:
            row = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
            if row is None:
                raise NotFoundError(f"no token named {name!r}")
            if not row.revoked:
                row.revoked, row.revoked_at = True, utcnow()
        return row

    def list_tokens(self) -> list[ApiToken]:
        with self.session() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.name)).all())

    def token_by_hash(self, sha256: str) -> ApiToken | None:
        with self.session() as session:
            return session.scalars(
                select(ApiToken).where(ApiToken.sha256 == sha256, ApiToken.revoked.is_(False))
            ).first()

    # ---- signature cache keys ---------------------------------------------------------------------
    def record_signature(self, checkpoint: str, content_hash: str, probes_hash: str, cache_path: str) -> None:
        with self.session() as session:
            row = session.scalars(
                select(SignatureKey).where(
                    SignatureKey.checkpoint == checkpoint, SignatureKey.probes_hash == probes_hash
                )
            ).first()
            if row is None:
                session.add(
                    SignatureKey(
                        checkpoint=checkpoint,
                        content_hash=content_hash,
                        probes_hash=probes_hash,
                        cache_path=cache_path,
                    )
                )
            else:
                row.content_hash, row.cache_path = content_hash, cache_path

    def signed_checkpoints(self) -> set[str]:
        with self.session() as session:
            return set(session.scalars(select(SignatureKey.checkpoint)).all())


def arm_name(family: str, parameters: dict[str, Any]) -> str:
    """`ties(density=0.3,weight=1.0)`: readable, and unique per setting."""
    inner = ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(parameters.items()))
    return f"{family}({inner})"
