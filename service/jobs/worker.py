"""Run one job attempt: `python -m service.jobs.worker JOB_ID` (local backend, settings on stdin)
or `run_job` (Ray).

The worker writes its progress and outcome to the job's row, with the real cause of a failure. Only
a transient failure (`is_transient`: the database or the network gone for a moment, memory short)
asks the dispatcher for another attempt, by exiting with `TRANSIENT_EXIT`; anything else — bad input
(a SimMergeError) or a bug — fails the job at once, since another attempt would fail the same way.
The process dying (signal, crash) also leaves the row `running` for the dispatcher to retry.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sys
import time

from sqlalchemy.exc import OperationalError

from service.jobs.handlers import HANDLERS, JobContext
from service.settings import ServiceSettings
from service.store import Store
from simmerge.errors import SimMergeError

log = logging.getLogger("simmerge.service.worker")
# EX_TEMPFAIL: the row's error says what went wrong in this attempt, and another may succeed.
TRANSIENT_EXIT = 75
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOMEM, errno.ETIMEDOUT, errno.ECONNRESET,
        errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
        errno.ENETDOWN, errno.ESTALE,
    }
)  # fmt: skip


class ProgressReporter:
    """Writes progress to the row, at most a few times a second, and applies the fault-injection delay."""

    def __init__(self, store: Store, job_id: str, delay_s: float) -> None:
        self.store, self.job_id, self.delay_s = store, job_id, delay_s
        self._last_write = 0.0

    def __call__(self, fraction: float, message: str | None = None) -> None:
        now = time.monotonic()
        if now - self._last_write >= 0.2 or fraction >= 1.0:
            values: dict[str, object] = {"progress": max(0.0, min(1.0, float(fraction)))}
            if message is not None:
                values["message"] = message
            self.store.update_job(self.job_id, only_if_status=["running"], **values)
            self._last_write = now
        if self.delay_s:
            time.sleep(self.delay_s)


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed where this one failed (a full disk, ENOSPC, is not)."""
    if isinstance(exc, SimMergeError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError | MemoryError | OperationalError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    return type(exc).__name__ == "OutOfMemoryError"  # torch.cuda's, without importing torch


def describe(exc: BaseException) -> str:
    """The job's error: a SimMergeError's message names the bad value; others keep their type."""
    return str(exc) if isinstance(exc, SimMergeError) else f"{type(exc).__name__}: {exc}"


def run_job(job_id: str, settings: ServiceSettings) -> int:
    """Run the job once; returns the exit code the dispatcher reads (0 = the row is final)."""
    store = Store(settings.db_url)
    try:
        job = store.get_job(job_id)
        if job.status != "running":
            return 0  # cancelled or finished meanwhile
        handler = HANDLERS.get(job.kind)
        if handler is None:
            store.update_job(job_id, status="failed", error=f"unknown job kind {job.kind!r}")
            return 0
        progress = ProgressReporter(store, job_id, settings.worker_step_delay_s)
        context = JobContext(job_id, job.request, settings, store, progress)
        try:
            result = handler(context)
        except Exception as exc:
            return _record_failure(store, settings, job_id, exc)
        store.update_job(
            job_id, only_if_status=["running"], status="succeeded", progress=1.0, result=result, error=None
        )
        return 0
    finally:
        store.dispose()


def _record_failure(store: Store, settings: ServiceSettings, job_id: str, exc: Exception) -> int:
    """Write the cause to the row: final unless transient, when the dispatcher retries."""
    error = describe(exc)
    if is_transient(exc):
        log.warning("job %s: transient failure, another attempt may succeed: %s", job_id, error)
        store.update_job(job_id, only_if_status=["running"], error=error)
        return TRANSIENT_EXIT
    if not isinstance(exc, SimMergeError):  # a bug, or input the checks missed: keep its traceback
        log.error("job %s failed", job_id, exc_info=exc)
    shutil.rmtree(settings.scratch_dir / job_id, ignore_errors=True)  # before the row says final
    store.update_job(job_id, only_if_status=["running"], status="failed", error=error)
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    job_id = sys.argv[1]
    sys.exit(run_job(job_id, ServiceSettings.from_worker_json(sys.stdin.read())))


if __name__ == "__main__":
    main()
