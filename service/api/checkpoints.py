"""Checkpoints: registered by path, only under the configured catalog roots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from service.api.deps import Paging, get_catalog, get_settings
from service.api.schemas import CheckpointIn, CheckpointOut, CheckpointPage
from service.auth import require_scope
from service.settings import ServiceSettings
from simmerge.catalog import Catalog
from simmerge.checkpoint import Checkpoint
from simmerge.errors import SimMergeError
from simmerge.paths import checked_path

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


class PathNotAllowedError(SimMergeError):
    """The path lies outside every configured catalog root."""


def allowed_path(raw: str, settings: ServiceSettings) -> Path:
    """Resolve symlinks and `..` first, so nothing escapes the roots by spelling."""
    path = Path(checked_path(raw, "checkpoint path")).expanduser()
    if not path.is_absolute():
        raise PathNotAllowedError(f"checkpoint path {raw!r} must be absolute")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in settings.allowed_roots):
        roots = ", ".join(str(r) for r in settings.allowed_roots)
        raise PathNotAllowedError(f"checkpoint path {raw!r} is outside the catalog roots ({roots})")
    return resolved


def check_files_within_roots(checkpoint: Checkpoint, settings: ServiceSettings) -> None:
    """Every file the checkpoint reads, resolved, must lie under a root: a directory inside the roots
    may still hold a symlinked shard or tokenizer that points anywhere."""
    for file in checkpoint.files():
        resolved = file.resolve()
        if not any(resolved.is_relative_to(root) for root in settings.allowed_roots):
            raise PathNotAllowedError(
                f"checkpoint file {str(file)!r} resolves to {str(resolved)!r}, outside the catalog roots"
            )


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
