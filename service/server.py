"""How `simmerge serve` runs: one process, or a supervisor with several web worker processes.

One process (the default) does everything in its app's lifespan. With `workers > 1` the supervisor
prepares the database once (migrations, configured tokens), runs the single job dispatcher itself —
so `max_concurrent_jobs` still bounds the jobs of the whole service — and starts web workers that
only answer requests, each on its own SO_REUSEPORT socket where the platform has one (uvicorn's shared
socket elsewhere, or for port 0). The workers share the database, the signature cache and the
bandit's files (whose writers hold a file lock, `models.bandit.locked`); Prometheus counters are
aggregated across them through `PROMETHEUS_MULTIPROC_DIR`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from service.settings import WORKER_SETTINGS_FILE_ENV, ServiceSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("simmerge.service")


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
    with (
        tempfile.TemporaryDirectory(prefix="simmerge-metrics-") as metrics_dir,
        tempfile.TemporaryDirectory(prefix="simmerge-settings-") as private,  # mode 0700
    ):
        os.environ[WORKER_SETTINGS_FILE_ENV] = str(settings.write_worker_file(Path(private)))
        os.environ[MULTIPROC_ENV] = metrics_dir
        if manager is not None:
            manager.start()
        try:
            if hasattr(socket, "SO_REUSEPORT") and port != 0:
                _run_reuse_port_workers(host, port, log_level, workers)
            else:  # one socket shared by uvicorn's workers
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


def _run_reuse_port_workers(host: str, port: int, log_level: str, workers: int) -> None:
    """Web workers each listening on their own socket bound with SO_REUSEPORT, restarted if one dies,
    until SIGTERM or SIGINT.

    With one shared socket (uvicorn's `--workers`) the worker that wakes first accepts every pending
    connection (libuv accepts until none is left) and keep-alive clients stay where they landed: in the
    load benchmark one of two workers held 37 of 50 connections and answered them twice as slowly.
    With a socket per worker the kernel spreads new connections over the workers by their addresses.
    """
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(_signum: int, _frame: Any) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes: list[Any] = []
    try:
        while not stopping.is_set():
            for index in range(workers):
                if index < len(processes) and processes[index].is_alive():
                    continue
                if index < len(processes):
                    log.warning(
                        "web worker %s exited (%s); starting another",
                        processes[index].pid,
                        processes[index].exitcode,
                    )
                process = context.Process(target=_web_worker, args=(host, port, log_level), daemon=True)
                process.start()
                processes[index : index + 1] = [process]
            stopping.wait(0.5)
    finally:
        for process in processes:
            process.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _web_worker(host: str, port: int, log_level: str) -> None:
    """One web worker process: its own SO_REUSEPORT socket, uvicorn serving `create_web_app` on it."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds its own socket
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        "service.server:create_web_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
