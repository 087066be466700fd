"""The FastAPI application: `create_app(settings)` wires store, catalog, selector and job dispatcher."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import simmerge
from service.adapters import ModelsSelector, Selector
from service.api import admin, checkpoints, jobs, operators, selection, tasks
from service.api.errors import UnavailableError, UnhandledErrors, install_error_handlers
from service.api.limits import BodyLimit, limits_by_route
from service.auth import load_configured_tokens
from service.batching import RecommendationBatcher
from service.db import JOB_STATUSES
from service.jobs.manager import JobManager
from service.settings import ServiceSettings
from service.store import Store, migrate
from simmerge.catalog import Catalog
from simmerge.catalog import migrate as migrate_catalog

log = logging.getLogger("simmerge.service")
API_PREFIX = "/v1"


class Metrics:
    """Per-app registry, so several apps in one process (tests) do not collide.

    Under several web workers (`service.server`, `PROMETHEUS_MULTIPROC_DIR` set) each process writes
    its values to that directory and a scrape aggregates every worker's.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "simmerge_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "simmerge_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.recommendation_batch = Histogram(
            "simmerge_recommendation_batch_size",
            "Recommendation requests answered by one selector call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.uncompiled = Gauge(
            "simmerge_uncompiled_boosters",
            "Predictor boosters evaluated by LightGBM because the compiled trees could not take them",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.jobs = Gauge(
            "simmerge_jobs",
            "Jobs by status",
            ["status"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def prepare_database(settings: ServiceSettings, store: Store) -> None:
    """Once per service, before any request: migrations (if configured) and the configured tokens."""
    if settings.run_migrations:
        migrate_catalog(store.engine)
        migrate(store.engine)
    load_configured_tokens(settings, store)


def _route_template(scope: Scope) -> str:
    """The matched route's template (bounded label cardinality); routers are mounted under /v1."""
    path = getattr(scope.get("route"), "path", None)
    if path is None:
        return "unmatched"
    if scope.get("path", "").startswith(API_PREFIX + "/") and not path.startswith(API_PREFIX + "/"):
        return API_PREFIX + path
    return path


class RequestMetrics:
    """Counts and times every HTTP request by method, route template and status.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's `BaseHTTPMiddleware` runs each request
    in an extra task with a memory stream, which cost more than a recommendation's own routing.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it starts a response

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    selector: Selector | None = None,
    role: Literal["all", "web"] = "all",
) -> FastAPI:
    """Build the app; for role "all", migrations, token loading and the job dispatcher run in its lifespan.

    Role "web" only answers requests: a supervisor (`service.server`) has prepared the database and
    runs the one job dispatcher.
    """
    settings = settings or ServiceSettings()
    store = Store(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if role == "all":
            await run_in_threadpool(prepare_database, settings, store)
        warm = getattr(app.state.selector, "warm", None)
        if warm is not None:
            await run_in_threadpool(warm)
        # Everything loaded so far (framework, predictor, catalog) lives as long as the process: move it
        # out of the collector's sight, so a full collection, which a request's allocations trigger
        # every few hundred requests, scans only request garbage rather than every object (p99).
        gc.collect()
        gc.freeze()
        manager = JobManager(settings, store) if settings.start_jobs and role == "all" else None
        if manager is not None:
            await run_in_threadpool(manager.start)
        app.state.jobs = manager
        try:
            yield
        finally:
            if manager is not None:
                await run_in_threadpool(manager.stop)
            store.dispose()

    app = FastAPI(
        title="SimMerge",
        version=simmerge.__version__,
        description="Predictive merge selection for fine-tuned LLM checkpoints.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.catalog = catalog = Catalog(store.engine)
    app.state.selector = selector or ModelsSelector(settings.home_dir, catalog, store, settings.pair_features)
    app.state.jobs = None
    app.state.metrics = metrics = Metrics()
    app.state.recommendations = RecommendationBatcher(
        app.state.selector, catalog.bases, observe=metrics.recommendation_batch.observe
    )
    install_error_handlers(app)

    # Middleware added later wraps what came before: the body limit is outermost, so nothing reads
    # past it; the metrics see every answer of the app, the unhandled-error middleware's 500s included.
    app.add_middleware(UnhandledErrors)
    app.add_middleware(RequestMetrics, metrics=metrics)
    upload_limits = {("POST", f"{API_PREFIX}/tasks"): settings.max_upload_bytes}
    app.add_middleware(BodyLimit, limit_for=limits_by_route(settings.max_body_bytes, upload_limits))

    # Routes are matched in order: the recommendation route, the one under load, is tried first.
    for module in (selection, checkpoints, tasks, operators, jobs, admin):
        app.include_router(module.router, prefix=API_PREFIX)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up (no dependencies checked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> dict[str, str]:
        """The database answers."""
        try:
            store.ping()
        except Exception as exc:
            raise UnavailableError(f"database not reachable ({type(exc).__name__})") from exc
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics() -> Response:
        counts = store.count_jobs_by_status()
        for status in JOB_STATUSES:  # every status, so a count that drops to zero shows as zero
            metrics.jobs.labels(status).set(counts.get(status, 0))
        predictor = sys.modules.get("models.predictor")  # loaded with the selector, never for this
        metrics.uncompiled.set(len(predictor.UNCOMPILED) if predictor is not None else 0)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
