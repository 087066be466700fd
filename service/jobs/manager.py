"""The dispatcher: claims queued jobs, watches their attempts, retries crashes, honours cancels.

It keeps no state that matters: every decision is read from and written to the job rows, so a
server that restarts picks up where the last one stopped (`recover`). Only transient failures are
retried: a worker that died, a lapsed lease, or a worker that reported a transient error
(`TRANSIENT_EXIT`, its cause on the row); a worker that failed for good wrote so itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

from service.jobs.base import JobBackend, JobHandle, make_backend
from service.jobs.handlers import merge_output_path
from service.jobs.worker import TRANSIENT_EXIT
from service.settings import ServiceSettings
from service.store import Store

log = logging.getLogger("simmerge.service.jobs")


class JobManager:
    def __init__(self, settings: ServiceSettings, store: Store, backend: JobBackend | None = None) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend or make_backend(settings)
        self.running: dict[str, JobHandle] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.owner = uuid.uuid4().hex
        self._last_recovery = 0.0

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="simmerge-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; attempts in flight are killed and their jobs queued again, attempt refunded."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for job_id, handle in list(self.running.items()):
                handle.kill()
                self._clean_scratch(job_id)
                job = self.store.get_job(job_id)
                self.store.update_job(
                    job_id,
                    only_if_status=["running"],
                    status="queued",
                    attempts=max(0, job.attempts - 1),
                    message="requeued: server stopped",
                    worker_pid=None,
                )
            self.running.clear()
        self.backend.shutdown()

    def notify(self) -> None:
        """A job was queued or a cancel requested: look now rather than at the next tick."""
        self._wake.set()

    def recover(self) -> None:
        """Running jobs whose dispatcher's lease lapsed (a server that died): stop strays, retry them.

        Run at start and then every few seconds, so a job is taken over even when its server dies
        while this one is up; a live server's jobs are left alone because it keeps renewing.
        """
        self._last_recovery = time.monotonic()
        for job in self.store.orphaned_jobs(self.owner, self.settings.job_lease_s):
            if job.worker_pid:
                _kill_stray_worker(job.worker_pid, job.id)
            self._clean_scratch(job.id)
            if job.cancel_requested:
                self._finish_cancel(job.id, job.kind, job.request)
            elif job.attempts >= job.max_attempts:
                self.store.update_job(
                    job.id, only_if_status=["running"], status="failed", error="worker lost with its server"
                )
            else:
                self.store.update_job(
                    job.id,
                    only_if_status=["running"],
                    status="queued",
                    message="requeued: its server stopped renewing the lease",
                    worker_pid=None,
                )
                log.info("job %s requeued: lease lapsed", job.id)

    # ---- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the dispatcher must outlive a bad tick (a DB hiccup, say)
                log.exception("job dispatcher tick failed")
            self._wake.wait(self.settings.job_poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            self.store.heartbeat(self.owner)
            if time.monotonic() - self._last_recovery > self.settings.job_lease_s / 3:
                self.recover()
            self._reap()
            self._cancel_requested()
            self._launch()

    def _launch(self) -> None:
        while len(self.running) < self.settings.max_concurrent_jobs and not self._stop.is_set():
            job = self.store.claim_next_job(self.owner)
            if job is None:
                return
            try:
                handle = self.backend.start(job.id)
            except Exception as exc:
                log.exception("could not start job %s", job.id)
                self.store.update_job(job.id, status="failed", error=f"could not start worker: {exc}")
                continue
            self.store.update_job(job.id, only_if_status=["running"], worker_pid=handle.pid)
            self.running[job.id] = handle
            log.info("job %s (%s) started, attempt %d", job.id, job.kind, job.attempts)

    def _reap(self) -> None:
        for job_id, handle in list(self.running.items()):
            code = handle.poll()
            if code is None:
                continue
            del self.running[job_id]
            job = self.store.get_job(job_id)
            if job.status != "running":  # the worker wrote its outcome; a failed one may leave scratch
                self._clean_scratch(job_id)
                continue
            if job.cancel_requested:
                self._finish_cancel(job_id, job.kind, job.request)
                continue
            self._clean_scratch(job_id)
            reason = _failure_reason(code, job.error)
            if job.attempts < job.max_attempts:
                self.store.update_job(
                    job_id,
                    status="queued",
                    error=reason,
                    message=f"retrying after: {reason}",
                    worker_pid=None,
                )
                log.warning("job %s: %s; retrying", job_id, reason)
            else:
                self.store.update_job(job_id, status="failed", error=f"{reason} (attempt {job.attempts})")

    def _cancel_requested(self) -> None:
        for job_id, handle in list(self.running.items()):
            job = self.store.get_job(job_id)
            if job.cancel_requested and job.status == "running":
                handle.kill()
                del self.running[job_id]
                self._finish_cancel(job_id, job.kind, job.request)

    def _finish_cancel(self, job_id: str, kind: str, request: dict) -> None:
        """Nothing of a cancelled job survives: scratch, and a merge output not yet registered."""
        self._clean_scratch(job_id)
        if kind == "merge" and request.get("name"):
            final = merge_output_path(self.settings, request["name"])
            if final.exists() and not self._registered_by(request["name"], job_id):
                shutil.rmtree(final, ignore_errors=True)
            elif final.exists():  # registered before the kill landed: the merge did complete
                self.store.update_job(
                    job_id, only_if_status=["running"], status="succeeded", progress=1.0, error=None
                )
                return
        self.store.update_job(
            job_id, only_if_status=["running", "queued"], status="cancelled", worker_pid=None
        )

    def _registered_by(self, name: str, job_id: str) -> bool:
        from simmerge.catalog import Catalog

        catalog = Catalog(self.store.engine)
        return catalog.has(name) and catalog.get(name).tags.get("merge_job") == job_id

    def _clean_scratch(self, job_id: str) -> None:
        shutil.rmtree(self.settings.scratch_dir / job_id, ignore_errors=True)


def _failure_reason(code: int, reported: str | None) -> str:
    """What the job's error says about an attempt that did not finish its row."""
    if code == TRANSIENT_EXIT and reported:  # written by this attempt just before it exited
        return reported
    return f"worker exited with code {code}" if code >= 0 else f"worker killed by signal {-code}"


def _kill_stray_worker(pid: int, job_id: str) -> None:
    """Kill a worker a dead server left behind, but only if that pid is still our worker for this job."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return
    if b"service.jobs.worker" in argv and job_id.encode() in argv:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
