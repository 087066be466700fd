"""Run one job attempt: `python -m service.jobs.worker JOB_ID` (local backend) or `run_job` (Ray).

The worker writes its progress and outcome to the job's row. Bad input (a SimMergeError) fails the
job for good; any other exception, or the process dying, leaves the row `running` for the
dispatcher to retry.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback

from service.jobs.handlers import HANDLERS, JobContext
from service.settings import ServiceSettings
from service.store import Store
from simmerge.errors import SimMergeError

log = logging.getLogger("simmerge.service.worker")


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


def run_job(job_id: str, settings: ServiceSettings) -> int:
    """Run the job once; returns the process exit code the dispatcher reads (0 = row is final)."""
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
        except SimMergeError as exc:
            shutil.rmtree(settings.scratch_dir / job_id, ignore_errors=True)  # before the row says final
            store.update_job(job_id, only_if_status=["running"], status="failed", error=str(exc))
            return 0
        except Exception as exc:
            store.update_job(job_id, only_if_status=["running"], error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            return 1
        store.update_job(job_id, only_if_status=["running"], status="succeeded", progress=1.0, result=result)
        return 0
    finally:
        store.dispose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    job_id = sys.argv[1]
    sys.exit(run_job(job_id, ServiceSettings.from_worker_env()))


if __name__ == "__main__":
    main()
