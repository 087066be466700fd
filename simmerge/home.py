"""Where SimMerge keeps its catalog database, signature cache and learned artifacts."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SIMMERGE_HOME"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """`home` if given, else $SIMMERGE_HOME, else ~/.simmerge; created on first use."""
    chosen = Path(home) if home else Path(os.environ.get(HOME_ENV) or Path.home() / ".simmerge")
    chosen = chosen.expanduser().resolve()
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen
