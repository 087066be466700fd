"""The labels file: one Parquet table, rewritten atomically after every chunk of rows.

Rewriting the whole (small: kilobytes per hundred rows) table to a temporary file and renaming it
into place means the file on disk is always a complete, readable Parquet file holding every row
finished so far, so a killed run loses at most the chunk in flight and a re-run skips what is stored.
Run-level facts (zoo identity, per-checkpoint scores, accumulated wall time) live in the file's
key-value metadata under `simmerge.labels`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from simmerge.errors import ConflictError, SimMergeError

SCHEMA_VERSION = 1
METADATA_KEY = b"simmerge.labels"

SCHEMA = pa.schema(
    [
        pa.field("plan_id", pa.string(), nullable=False),
        pa.field("plan_json", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("params_json", pa.string(), nullable=False),
        pa.field("models", pa.list_(pa.string()), nullable=False),
        pa.field("model_a", pa.string(), nullable=False),
        pa.field("model_b", pa.string()),
        pa.field("base", pa.string()),
        pa.field("n_models", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("scores_json", pa.string(), nullable=False),
        pa.field("parent_scores_json", pa.string(), nullable=False),
        pa.field("base_scores_json", pa.string()),
        pa.field("held_in_tasks", pa.list_(pa.string()), nullable=False),
        pa.field("held_out_tasks", pa.list_(pa.string()), nullable=False),
        pa.field("held_in_score", pa.float64()),
        pa.field("held_out_score", pa.float64()),
        pa.field("merge_seconds", pa.float64(), nullable=False),
        pa.field("eval_seconds", pa.float64(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def read_labels(path: str | Path) -> pa.Table:
    path = Path(path)
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SimMergeError(f"{path}: not a readable labels Parquet file ({exc})") from None


class LabelStore:
    """Rows already stored plus rows waiting to be flushed; `flush()` makes them durable."""

    def __init__(self, path: str | Path, zoo_sha256: str, zoo_root: str) -> None:
        self.path = Path(path)
        self._tables: list[pa.Table] = []
        self._pending: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "zoo": zoo_root,
            "zoo_catalog_sha256": zoo_sha256,
            "wall_seconds": 0.0,
            "checkpoint_scores": {},
        }
        if self.path.exists():
            self._load_existing(zoo_sha256)
        self.done: set[str] = {pid for t in self._tables for pid in t.column("plan_id").to_pylist()}

    def _load_existing(self, zoo_sha256: str) -> None:
        table = read_labels(self.path)
        stored = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        if stored.get("schema_version") != SCHEMA_VERSION:
            raise ConflictError(
                f"{self.path}: labels schema version {stored.get('schema_version')!r}, this tool writes "
                f"{SCHEMA_VERSION}; write to a new file"
            )
        if stored.get("zoo_catalog_sha256") != zoo_sha256:
            raise ConflictError(
                f"{self.path}: labels were made on another zoo ({stored.get('zoo')}); write to a new file"
            )
        missing = [name for name in SCHEMA.names if name not in table.column_names]
        if missing:
            raise SimMergeError(f"{self.path}: labels file lacks column {missing[0]!r}")
        self.meta.update(stored)
        self._tables.append(table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(None))

    @property
    def checkpoint_scores(self) -> dict[str, Any]:
        """{checkpoint name: {"content_hash", "tasks_key", "scores"}} cached across runs."""
        return self.meta["checkpoint_scores"]

    def add(self, row: Mapping[str, Any]) -> None:
        self._pending.append(dict(row))
        self.done.add(str(row["plan_id"]))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add_wall_seconds(self, seconds: float) -> None:
        self.meta["wall_seconds"] = float(self.meta.get("wall_seconds", 0.0)) + seconds

    def flush(self) -> None:
        """Write every stored and pending row to a temporary file, then rename it over the labels file."""
        if self._pending:
            self._tables.append(pa.Table.from_pylist(self._pending, schema=SCHEMA))
            self._pending = []
        table = pa.concat_tables(self._tables) if self._tables else SCHEMA.empty_table()
        self._tables = [table]
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(self.meta, sort_keys=True).encode()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a labels file is not
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def exclusive_writer(path: Path) -> Iterator[None]:
    """Hold `path.lock` while labelling, so two runs never rewrite one labels file over each other."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"{path}: another `simmerge label` run is writing it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
