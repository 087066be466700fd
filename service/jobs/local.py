"""The default backend: one spawned Python process per attempt, in its own process group.

A fresh interpreter per job means a crash, a leak or a CUDA fault in one merge cannot take the
server down, and cancelling is a SIGKILL to the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from service.settings import ServiceSettings


class LocalHandle:
    def __init__(self, job_id: str, process: subprocess.Popen[bytes]) -> None:
        self.job_id = job_id
        self.process = process
        self.pid: int | None = process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class LocalBackend:
    name = "local"

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    def start(self, job_id: str) -> LocalHandle:
        env = {**os.environ, **self.settings.to_worker_env()}
        process = subprocess.Popen(
            [sys.executable, "-m", "service.jobs.worker", job_id],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return LocalHandle(job_id, process)

    def shutdown(self) -> None:
        pass
