"""What is kept per checkpoint: a functional part and a structural part, each small arrays + JSON.

Parts are stored as `<stem>.json` (metadata) beside `<stem>.npz` (arrays, never pickled) and written
to a temporary name then renamed, so a crash never leaves a half-written signature in the cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simmerge.errors import SimMergeError


@dataclass
class SignaturePart:
    """Named arrays plus JSON metadata; `kind` is "functional" or "structural"."""

    kind: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def save(self, stem: Path) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(stem.with_suffix(".npz"), lambda f: np.savez(f, **self.arrays))
        meta = {"kind": self.kind, **self.meta}
        _atomic_write(stem.with_suffix(".json"), lambda f: f.write(json.dumps(meta, sort_keys=True).encode()))

    @classmethod
    def load(cls, stem: Path) -> SignaturePart:
        try:
            meta = json.loads(stem.with_suffix(".json").read_text())
            with np.load(stem.with_suffix(".npz"), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise SimMergeError(f"signature {stem} is unreadable ({exc})") from exc
        kind = meta.pop("kind")
        return cls(kind, meta, arrays)


@dataclass
class Signature:
    """One checkpoint's signature; either part may be missing (no tokenizer, no known base)."""

    name: str
    content_hash: str
    functional: SignaturePart | None = None
    structural: SignaturePart | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of array data (what scales with the model, if anything did)."""
        return sum(p.nbytes for p in (self.functional, self.structural) if p is not None)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
