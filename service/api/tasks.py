"""Tasks: a JSON Lines body of {"prompt", "completion"} objects, streamed to disk under a size limit."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import get_catalog, get_settings
from service.api.errors import PayloadTooLargeError
from service.api.schemas import NAME_PATTERN, TaskOut
from service.auth import require_scope
from service.settings import ServiceSettings
from simmerge.catalog import METRICS, Catalog, TaskEntry
from simmerge.errors import ConflictError, NotFoundError, SimMergeError
from simmerge.evaluation import load_task

router = APIRouter(prefix="/tasks", tags=["tasks"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
        "description": 'JSON Lines: one {"prompt": "...", "completion": "..."} object per line',
    }
}


def _task_out(task: TaskEntry, with_count: bool = False) -> dict:
    examples = None
    if with_count and task.path.is_file():
        with task.path.open("rb") as handle:
            examples = sum(1 for line in handle if line.strip())
    return {"name": task.name, "metric": task.metric, "held_out": task.held_out, "examples": examples}


def validate_jsonl(path: Path, name: str) -> int:
    """Count examples with the loader the CLI uses, so both refuse the same files; errors name the
    task and line, not the temporary file."""
    return len(load_task(path, label=f"task {name!r}").examples)


@router.post("", response_model=TaskOut, status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_task(
    request: Request,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    _: Annotated[str, Depends(require_scope("write"))],
    name: Annotated[str, Query(pattern=NAME_PATTERN)],
    metric: Annotated[str, Query(description=f"one of {', '.join(METRICS)}")] = "token_accuracy",
    held_out: bool = False,
) -> dict:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"task upload of {declared} bytes exceeds the limit of {limit} bytes")
    if metric not in METRICS:
        raise SimMergeError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if any(t.name == name for t in catalog.tasks()):
        raise ConflictError(f"a task named {name!r} is already in the catalog")
    settings.tasks_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=settings.tasks_dir)
    tmp = Path(tmp_name)
    try:
        received = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(f"task upload exceeds the limit of {limit} bytes")
                out.write(chunk)
        count = await run_in_threadpool(validate_jsonl, tmp, name)
        final = settings.tasks_dir / f"{name}.jsonl"
        if final.exists():
            raise ConflictError(f"task file {final} already exists")
        tmp.rename(final)
    finally:
        tmp.unlink(missing_ok=True)
    entry = catalog.add_task(final, name, metric, held_out)
    return {**_task_out(entry), "examples": count}


@router.get("", response_model=list[TaskOut])
def list_tasks(
    catalog: Annotated[Catalog, Depends(get_catalog)], _: Annotated[str, Depends(require_scope("read"))]
) -> list[dict]:
    return [_task_out(t) for t in catalog.tasks()]


@router.get("/{name}", response_model=TaskOut)
def get_task(
    name: str,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    for task in catalog.tasks():
        if task.name == name:
            return _task_out(task, with_count=True)
    raise NotFoundError(f"no task named {name!r} in the catalog")
