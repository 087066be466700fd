"""Jobs: merges, catalog scoring and features are posted as jobs and polled for status and progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import FileResponse, JSONResponse

from service.api.deps import Paging, get_catalog, get_jobs, get_settings, get_store
from service.api.schemas import FeaturesIn, JobOut, JobPage, MergeIn, ScorePage, ScoringIn
from service.auth import require_scope
from service.db import Job
from service.jobs.handlers import load_plan, merge_output_path, results_dir
from service.settings import ServiceSettings
from service.store import Store
from simmerge.catalog import Catalog
from simmerge.errors import ConflictError, NotFoundError, PlanError

router = APIRouter(tags=["jobs"])
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=200, description="repeat a POST safely")
]


def job_out(job: Job) -> dict[str, Any]:
    return {c: getattr(job, c) for c in JobOut.model_fields}


def _submit(
    kind: str,
    request: dict[str, Any],
    store: Store,
    settings: ServiceSettings,
    jobs: Any,
    key: str | None,
    fingerprint: Any = None,
) -> JSONResponse:
    job, created = store.create_job(
        kind, request, max_attempts=settings.max_job_attempts, idempotency_key=key, fingerprint=fingerprint
    )
    if created and jobs is not None:
        jobs.notify()
    body = JobOut.model_validate(job_out(job)).model_dump(mode="json")
    return JSONResponse(body, status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job.id}"})


# ---- merges ---------------------------------------------------------------------------------------
def _validate_merge(body: MergeIn, catalog: Catalog, settings: ServiceSettings) -> dict[str, Any]:
    """Everything checkable without loading a tensor is checked here, so bad plans fail fast (4xx)."""
    if (body.plan is None) == (body.mergekit_yaml is None):
        raise PlanError("give exactly one of 'plan' and 'mergekit_yaml'")
    request = body.model_dump(exclude_none=True)
    try:
        plan = load_plan(request)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"malformed plan ({type(exc).__name__}: {exc})") from exc
    for model in plan.checkpoints():
        if not catalog.has(model):
            raise NotFoundError(f"plan model {model!r} is not a checkpoint in the catalog")
    from simmerge.engine import prepare

    prepare(plan, catalog.resolve)  # operator parameters and tensor compatibility, from headers only
    if catalog.has(body.name) or merge_output_path(settings, body.name).exists():
        raise ConflictError(f"a checkpoint named {body.name!r} already exists")
    request["plan"] = plan.to_dict()
    request.pop("mergekit_yaml", None)
    return request


@router.post("/merges", status_code=202, response_model=JobOut, tags=["merges"])
def submit_merge(
    body: MergeIn,
    store: Annotated[Store, Depends(get_store)],
    catalog: Annotated[Catalog, Depends(get_catalog)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    jobs: Annotated[Any, Depends(get_jobs)],
    _: Annotated[str, Depends(require_scope("write"))],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a merge; its output is registered as the checkpoint `name` once complete."""
    fingerprint = body.model_dump(mode="json")
    replay = store.job_by_key(idempotency_key) if idempotency_key else None
    # a replay must not trip over the checkpoint its first submission made, so it skips validation
    request = replay.request if replay is not None else _validate_merge(body, catalog, settings)
    return _submit("merge", request, store, settings, jobs, idempotency_key, fingerprint)


@router.get("/merges", response_model=JobPage, tags=["merges"])
def list_merges(
    store: Annotated[Store, Depends(get_store)],
    paging: Annotated[Paging, Depends()],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return _page(store, "merge", None, paging)


@router.get("/merges/{job_id}", response_model=JobOut, tags=["merges"])
def get_merge(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return job_out(store.get_job(job_id, "merge"))


@router.post("/merges/{job_id}/cancel", response_model=JobOut, tags=["merges"])
def cancel_merge(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    jobs: Annotated[Any, Depends(get_jobs)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    job = store.request_cancel(job_id, "merge")
    if jobs is not None:
        jobs.notify()
    return job_out(job)


# ---- generic jobs ---------------------------------------------------------------------------------
def _page(store: Store, kind: str | None, status: str | None, paging: Paging) -> dict:
    rows, total = store.list_jobs(kind=kind, status=status, offset=paging.offset, limit=paging.limit)
    return {
        "items": [job_out(j) for j in rows],
        "total": total,
        "offset": paging.offset,
        "limit": paging.limit,
    }


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    store: Annotated[Store, Depends(get_store)],
    paging: Annotated[Paging, Depends()],
    _: Annotated[str, Depends(require_scope("read"))],
    kind: str | None = None,
    status: str | None = None,
) -> dict:
    return _page(store, kind, status, paging)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return job_out(store.get_job(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    jobs: Annotated[Any, Depends(get_jobs)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    job = store.request_cancel(job_id)
    if jobs is not None:
        jobs.notify()
    return job_out(job)


# ---- catalog scoring ------------------------------------------------------------------------------
def _check_models(models: list[str] | None, catalog: Catalog) -> None:
    for model in models or []:
        if not catalog.has(model):
            raise NotFoundError(f"{model!r} is not a checkpoint in the catalog")


@router.post("/scoring", status_code=202, response_model=JobOut, tags=["scoring"])
def submit_scoring(
    body: ScoringIn,
    store: Annotated[Store, Depends(get_store)],
    catalog: Annotated[Catalog, Depends(get_catalog)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    jobs: Annotated[Any, Depends(get_jobs)],
    _: Annotated[str, Depends(require_scope("write"))],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Score every candidate merge of the catalog (or of `models`) with the learned selector; `methods`
    keeps those operator families (each must be registered: an unknown one is a 400 naming it)."""
    _check_models(body.models, catalog)
    from simmerge.operators import get_operator

    for method in body.methods or []:
        get_operator(method)
    return _submit("scoring", body.model_dump(exclude_none=True), store, settings, jobs, idempotency_key)


@router.get("/scoring/{job_id}", response_model=JobOut, tags=["scoring"])
def get_scoring(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return job_out(store.get_job(job_id, "scoring"))


def _finished_results(store: Store, settings: ServiceSettings, job_id: str) -> Path:
    job = store.get_job(job_id, "scoring")
    if job.status != "succeeded":
        raise ConflictError(f"scoring job {job_id!r} is {job.status}; results exist once it has succeeded")
    return results_dir(settings, job_id)


@router.get("/scoring/{job_id}/results", response_model=ScorePage, tags=["scoring"])
def scoring_results(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    paging: Annotated[Paging, Depends()],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    """Rows best first, `limit` at a time."""
    path = _finished_results(store, settings, job_id) / "scores.jsonl"
    if not path.is_file():
        raise NotFoundError(f"scoring job {job_id!r} left no results file")
    items, total = [], 0
    with path.open() as handle:
        for total, line in enumerate(handle, start=1):
            if paging.offset < total <= paging.offset + paging.limit:
                items.append(json.loads(line))
    return {"items": items, "total": total, "offset": paging.offset, "limit": paging.limit}


@router.get(
    "/scoring/{job_id}/heatmap.png",
    tags=["scoring"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def scoring_heatmap(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> FileResponse:
    path = _finished_results(store, settings, job_id) / "heatmap.png"
    if not path.is_file():
        raise NotFoundError(f"scoring job {job_id!r} made no heatmap")
    return FileResponse(path, media_type="image/png")


# ---- features -------------------------------------------------------------------------------------
@router.post("/features", status_code=202, response_model=JobOut, tags=["features"])
def submit_features(
    body: FeaturesIn,
    store: Annotated[Store, Depends(get_store)],
    catalog: Annotated[Catalog, Depends(get_catalog)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    jobs: Annotated[Any, Depends(get_jobs)],
    _: Annotated[str, Depends(require_scope("write"))],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Compute (cached) signatures for the catalog, or for `models`."""
    _check_models(body.models, catalog)
    if body.probes is not None and all(t.name != body.probes for t in catalog.tasks()):
        raise NotFoundError(f"no task named {body.probes!r} to use as probes")
    return _submit("features", body.model_dump(exclude_none=True), store, settings, jobs, idempotency_key)


@router.get("/features/{job_id}", response_model=JobOut, tags=["features"])
def get_features(
    job_id: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return job_out(store.get_job(job_id, "features"))
