"""What the dispatcher needs from a place that runs jobs."""

from __future__ import annotations

from typing import Protocol

from service.settings import ServiceSettings


class JobHandle(Protocol):
    """One running attempt of one job."""

    job_id: str
    pid: int | None

    def poll(self) -> int | None:
        """None while running; then 0 for a clean exit, anything else for a crash."""
        ...

    def kill(self) -> None:
        """Stop the attempt now (SIGKILL or equivalent); the dispatcher cleans up after it."""
        ...


class JobBackend(Protocol):
    name: str

    def start(self, job_id: str) -> JobHandle: ...

    def shutdown(self) -> None: ...


def make_backend(settings: ServiceSettings) -> JobBackend:
    if settings.job_backend == "ray":
        from service.jobs.ray_backend import RayBackend

        return RayBackend(settings)
    from service.jobs.local import LocalBackend

    return LocalBackend(settings)
