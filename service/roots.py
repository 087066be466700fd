"""The catalog roots: every file a checkpoint reads must lie under one, at registration and again
whenever a job reads it (a file may have been swapped for a symlink since it was registered)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from service.settings import ServiceSettings
from simmerge.catalog import Catalog
from simmerge.checkpoint import Checkpoint
from simmerge.errors import SimMergeError
from simmerge.paths import checked_path


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


def check_registered_within_roots(catalog: Catalog, names: Iterable[str], settings: ServiceSettings) -> None:
    """The roots check for the registered checkpoints a job is about to read (names not in the
    catalog, such as a plan's intermediate steps, are skipped)."""
    for name in names:
        if catalog.has(name):
            check_files_within_roots(Checkpoint.open(catalog.get(name).path), settings)
