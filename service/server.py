"""How `simmerge serve` runs: one process, or a supervisor with several web worker processes.

One process (the default) does everything in its app's lifespan. With `workers > 1` the supervisor
prepares the database once (migrations, configured tokens), runs the single job dispatcher itself —
so `max_concurrent_jobs` still bounds the jobs of the whole service — and lets uvicorn fork web
workers that only answer requests. The workers share the database, the signature cache and the
bandit's files (whose writers hold a file lock, `models.bandit.locked`); Prometheus counters are
aggregated across them through `PROMETHEUS_MULTIPROC_DIR`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from service.settings import WORKER_SETTINGS_ENV, ServiceSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve(settings: ServiceSettings, *, host: str, port: int, log_level: str, workers: int) -> None:
    if workers <= 1:
        import uvicorn

        from service.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
        return
    _serve_workers(settings, host=host, port=port, log_level=log_level, workers=workers)


def create_web_app() -> Any:
    """The app of one web worker (uvicorn factory): settings from the supervisor, no migrations, no jobs."""
    from service.app import create_app

    return create_app(ServiceSettings.from_worker_env(), role="web")


def _serve_workers(settings: ServiceSettings, *, host: str, port: int, log_level: str, workers: int) -> None:
    import uvicorn

    from service.app import prepare_database
    from service.jobs.manager import JobManager
    from service.store import Store

    store = Store(settings.db_url)
    prepare_database(settings, store)
    manager = JobManager(settings, store) if settings.start_jobs else None
    with tempfile.TemporaryDirectory(prefix="simmerge-metrics-") as metrics_dir:
        os.environ[WORKER_SETTINGS_ENV] = settings.worker_json()
        os.environ[MULTIPROC_ENV] = metrics_dir
        if manager is not None:
            manager.start()
        try:
            uvicorn.run(
                "service.server:create_web_app",
                factory=True,
                workers=workers,
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
            )
        finally:
            if manager is not None:
                manager.stop()
            store.dispose()
