"""Turn a model string from a plan or the command line into a checkpoint directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from simmerge.errors import NotFoundError
from simmerge.paths import checked_path


def catalog_resolver(home: Path) -> Callable[[str], Path]:
    """A path that exists wins; otherwise the name is looked up in the catalog under `home`."""

    def resolve(model: str) -> Path:
        candidate = Path(checked_path(model, "model")).expanduser()
        if candidate.exists():
            return candidate
        from simmerge.catalog import Catalog

        database = home / "simmerge.db"
        if database.exists():
            with Catalog.open(home) as catalog:
                if catalog.has(model):
                    return catalog.get(model).path
        raise NotFoundError(f"{model!r} is neither a directory nor a checkpoint name in the catalog ({home})")

    return resolve


def registered_paths(home: Path) -> list[Path]:
    """Directories of the checkpoints registered under `home` (none when it has no catalog yet)."""
    if not (home / "simmerge.db").exists():
        return []
    from simmerge.catalog import Catalog

    with Catalog.open(home) as catalog:
        return [entry.path for entry in catalog.list()]
