"""Checkpoints: registered by path, only under the configured catalog roots."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from service.api.deps import Paging, get_catalog, get_settings
from service.api.schemas import CheckpointIn, CheckpointOut, CheckpointPage
from service.auth import require_scope
from service.roots import allowed_path, check_files_within_roots
from service.settings import ServiceSettings
from simmerge.catalog import Catalog
from simmerge.checkpoint import Checkpoint

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.get("", response_model=CheckpointPage)
def list_checkpoints(
    catalog: Annotated[Catalog, Depends(get_catalog)],
    paging: Annotated[Paging, Depends()],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    entries = catalog.list()
    items = [e.to_dict() for e in entries[paging.offset : paging.offset + paging.limit]]
    return {"items": items, "total": len(entries), "offset": paging.offset, "limit": paging.limit}


@router.post("", response_model=CheckpointOut, status_code=201)
def register_checkpoint(
    body: CheckpointIn,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    path = allowed_path(body.path, settings)
    check_files_within_roots(Checkpoint.open(path), settings)
    entry = catalog.add(path, body.name, body.base, body.tasks, body.family, body.tags)
    return entry.to_dict()


@router.get("/{name}", response_model=CheckpointOut)
def get_checkpoint(
    name: str,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    return catalog.get(name).to_dict()


@router.delete("/{name}", status_code=204, response_class=Response)
def unregister_checkpoint(
    name: str,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    _: Annotated[str, Depends(require_scope("admin"))],
) -> Response:
    """Forget the registration; the files on disk are left alone."""
    catalog.remove(name)
    return Response(status_code=204)
