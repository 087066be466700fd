"""Where pairwise features come from: the features package (signatures cached in the home) or a table.

A table (`model_a, model_b, <feature columns>`, Parquet or CSV) lets a user train and score from
features computed elsewhere, and lets tests run without checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simmerge.errors import NotFoundError, SimMergeError


class TablePairSource:
    """Pair features read from a table; lookups are symmetric in (a, b)."""

    def __init__(self, table: pd.DataFrame, origin: str = "table") -> None:
        for column in ("model_a", "model_b"):
            if column not in table.columns:
                raise SimMergeError(f"pair-feature table {origin} lacks column {column!r}")
        self.origin = origin
        self._names = [c for c in table.columns if c not in ("model_a", "model_b")]
        if not self._names:
            raise SimMergeError(f"pair-feature table {origin} has no feature columns")
        values = table[self._names].to_numpy(dtype=np.float64)
        self._rows: dict[tuple[str, str], np.ndarray] = {}
        for a, b, row in zip(table["model_a"].astype(str), table["model_b"].astype(str), values, strict=True):
            self._rows[(a, b)] = row
            self._rows[(b, a)] = row

    @classmethod
    def read(cls, path: Path) -> TablePairSource:
        path = Path(path)
        if not path.exists():
            raise NotFoundError(f"pair-feature table {path} does not exist")
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        return cls(table, str(path))

    @property
    def feature_names(self) -> list[str]:
        return list(self._names)

    @property
    def schema_version(self) -> str:
        return f"table:{len(self._names)}"

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        missing = [p for p in pairs if p not in self._rows]
        if missing:
            raise NotFoundError(f"pair-feature table {self.origin} has no row for pair {missing[0]}")
        if not pairs:
            return np.zeros((0, len(self._names)))
        return np.stack([self._rows[p] for p in pairs])


class FeaturesPackageSource:
    """Pairwise features from `features` over signatures cached under the SimMerge home.

    Missing signatures are computed on first use, all at once (the features package caches them by
    content hash and shares one pass over each base), so the first call for new checkpoints costs one
    probe pass each; later calls only read the cache. The service passes `compute_missing=False`: a
    request never runs a probe pass, it answers 409 naming the checkpoints (`MissingSignaturesError`).
    """

    def __init__(
        self, home: Path, paths: Mapping[str, Path] | None = None, *, compute_missing: bool = True
    ) -> None:
        try:
            from features import cache, pairwise, schema
        except ImportError as exc:  # pragma: no cover - the package ships with simmerge
            raise SimMergeError(f"the features package is not available ({exc})") from exc
        self._cache, self._pairwise, self._schema = cache, pairwise, schema
        self.home = Path(home)
        self._paths = {str(k): Path(v) for k, v in (paths or {}).items()}
        self._signatures: dict[str, Any] = {}
        self.compute_missing = compute_missing

    @property
    def feature_names(self) -> list[str]:
        return list(self._schema.feature_names())

    @property
    def schema_version(self) -> str:
        return f"features:{self._schema.FEATURE_SCHEMA_VERSION}"

    def _ensure(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self._signatures]
        if not missing:
            return
        known = {n: self._paths[n] for n in missing if n in self._paths}
        if known and self.compute_missing:
            self._cache.compute_signatures(known, home=self.home, progress=False)
        absent = []
        for name in missing:
            try:
                self._signatures[name] = self._cache.load_signature(
                    self.home, self._paths.get(name, name), name=name, compute=self.compute_missing
                )
            except NotFoundError:
                if self.compute_missing:
                    raise
                absent.append(name)
        if absent:
            from models.ports import MissingSignaturesError

            raise MissingSignaturesError(absent)

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        names = sorted({m for p in pairs for m in p})
        self._ensure(names)
        if not pairs:
            return np.zeros((0, len(self.feature_names)))
        signatures = {n: self._signatures[n] for n in names}
        return np.asarray(self._pairwise.pairwise_features(signatures, list(pairs)), dtype=np.float64)


def zoo_manifest(zoo_dir: Path) -> dict[str, Any]:
    from simmerge.zoo import read_catalog

    return read_catalog(zoo_dir)


def zoo_model_tasks(zoo_dir: Path) -> dict[str, list[str]]:
    """Checkpoint name → the tasks it was trained on, from a zoo's manifest."""
    return {c["name"]: list(c.get("tasks") or []) for c in zoo_manifest(zoo_dir).get("checkpoints", [])}


def zoo_paths(zoo_dir: Path) -> dict[str, Path]:
    return {c["name"]: Path(zoo_dir) / c["path"] for c in zoo_manifest(zoo_dir).get("checkpoints", [])}


def labels_zoo(labels: Path) -> Path | None:
    """The zoo a labels file was made on (`simmerge label` records it in the Parquet metadata)."""
    if Path(labels).suffix != ".parquet" or not Path(labels).exists():
        return None
    import pyarrow.parquet as pq

    metadata = pq.read_schema(labels).metadata or {}
    raw = metadata.get(b"simmerge.labels")
    if not raw:
        return None
    zoo = json.loads(raw).get("zoo")
    return Path(zoo) if zoo and (Path(zoo) / "catalog.json").exists() else None
