"""The default backend: one spawned Python process per attempt, in its own process group.

A fresh interpreter per job means a crash, a leak or a CUDA fault in one merge cannot take the
server down, and cancelling is a SIGKILL to the group.

A worker gets only what it needs: an environment built from an allow-list (the interpreter's,
the locale's and the accelerator's variables, never a `SIMMERGE_*` one nor anything named like a
secret) and its settings on stdin, so neither a token nor the database URL sits in its
`/proc/<pid>/environ` or in the environment of anything it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping

from service.settings import ServiceSettings

PASSED_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
        "PYTHONHASHSEED", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    }
)  # fmt: skip
PASSED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "TORCH_", "PYTORCH_", "NCCL_", "COV_CORE_")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "KEY", "AUTH")


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `environ` (the server's by default) that a job worker may see."""
    source = os.environ if environ is None else environ
    return {
        name: value
        for name, value in source.items()
        if (name in PASSED_NAMES or name.startswith(PASSED_PREFIXES))
        and not any(word in name.upper() for word in SECRET_WORDS)
    }


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
        process = subprocess.Popen(
            [sys.executable, "-m", "service.jobs.worker", job_id],
            env=worker_environment(),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdin is not None
        # A worker that died before reading shows as a crash on the next poll, and is retried.
        with contextlib.suppress(BrokenPipeError), process.stdin:
            process.stdin.write(self.settings.worker_json().encode())
        return LocalHandle(job_id, process)

    def shutdown(self) -> None:
        pass
