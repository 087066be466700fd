"""User-given path text, checked before `pathlib` sees it."""

from __future__ import annotations

import os

from simmerge.errors import SimMergeError


def checked_path(path: str | os.PathLike[str], what: str = "path") -> str:
    """`path` as text, refused if it holds a NUL byte: the OS cannot take one, and `pathlib` raises
    ValueError for it deep inside (a traceback, or a 500 in the service)."""
    text = str(os.fspath(path))
    if "\0" in text:
        raise SimMergeError(f"{what} {text!r} contains a NUL byte")
    return text
