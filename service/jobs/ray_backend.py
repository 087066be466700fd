"""The Ray backend: each attempt is a Ray task that asks for `ray_num_gpus` GPUs.

The task runs the same `run_job` as the local worker, so the job row stays the truth; Ray's own
retries are off (max_retries=0) because the dispatcher retries, counting attempts in the row.
The settings (tokens excluded) travel as the task's argument, not in an environment variable; a
local Ray started here is started without the server's `SIMMERGE_*` and secret-looking variables,
so its processes, and the workers they start, never hold them.
Install with the `ray` extra (`pip install 'simmerge[ray]'`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.api.errors import UnavailableError
from service.jobs.local import SECRET_WORDS
from service.settings import ServiceSettings


def _run_attempt(job_id: str, settings_json: str) -> int:
    """Executed inside a Ray worker process."""
    from service.jobs.worker import run_job

    return run_job(job_id, ServiceSettings.from_worker_json(settings_json))


class RayHandle:
    def __init__(self, job_id: str, ref: Any, ray: Any) -> None:
        self.job_id = job_id
        self.ref = ref
        self.pid: int | None = None
        self._ray = ray

    def poll(self) -> int | None:
        ready, _ = self._ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            return int(self._ray.get(self.ref))
        except self._ray.exceptions.TaskCancelledError:
            return -9
        except self._ray.exceptions.RayError:  # the worker died or raised
            return 1

    def kill(self) -> None:
        """Force-cancel (kills the Ray worker process) and wait until it is gone, so cleanup is safe."""
        self._ray.cancel(self.ref, force=True)
        self._ray.wait([self.ref], timeout=30)


class RayBackend:
    name = "ray"

    def __init__(self, settings: ServiceSettings) -> None:
        try:
            import ray
        except ImportError as exc:
            raise UnavailableError("job_backend='ray' needs Ray: pip install 'simmerge[ray]'") from exc
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            with _secrets_hidden():
                ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        self._settings_json = settings.worker_json()
        self._remote = ray.remote(
            num_gpus=settings.ray_num_gpus, num_cpus=settings.ray_num_cpus, max_retries=0
        )(_run_attempt)

    def start(self, job_id: str) -> RayHandle:
        return RayHandle(job_id, self._remote.remote(job_id, self._settings_json), self._ray)

    def shutdown(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()


@contextmanager
def _secrets_hidden() -> Iterator[None]:
    """Start Ray without the secrets in the environment its processes inherit; put them back after."""
    names = [n for n in os.environ if n.startswith("SIMMERGE_") or any(w in n.upper() for w in SECRET_WORDS)]
    hidden = {name: os.environ.pop(name) for name in names}
    try:
        yield
    finally:
        os.environ.update(hidden)
