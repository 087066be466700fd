"""A zoo's catalog.json, read and checked once, as the labeller needs it (names → paths, tasks, roles)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmerge.errors import CheckpointError, IncompatibleCheckpointsError, NotFoundError, SimMergeError


@dataclass(frozen=True)
class ZooCheckpoint:
    name: str
    path: Path
    role: str  # "base" or "expert"
    base: str | None
    family: str
    tasks: tuple[str, ...]  # tasks it was trained on


@dataclass(frozen=True)
class ZooTask:
    name: str
    file: Path
    metric: str
    held_out: bool


@dataclass(frozen=True)
class Zoo:
    root: Path
    tasks: tuple[ZooTask, ...]
    checkpoints: dict[str, ZooCheckpoint]
    catalog_sha256: str

    def checkpoint(self, name: str) -> ZooCheckpoint:
        if name not in self.checkpoints:
            raise NotFoundError(f"zoo {self.root}: no checkpoint named {name!r}")
        return self.checkpoints[name]

    def resolve(self, name: str) -> Path:
        """Model string in a plan → checkpoint directory (the engine's resolver)."""
        return self.checkpoint(name).path

    def experts_by_base(self) -> dict[str, list[str]]:
        """{base name: its experts in catalog order}; bases without experts are left out."""
        groups: dict[str, list[str]] = {}
        for ckpt in self.checkpoints.values():
            if ckpt.role == "expert" and ckpt.base:
                groups.setdefault(ckpt.base, []).append(ckpt.name)
        return groups

    def held_out_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.held_out]

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def read_zoo(root: str | Path) -> Zoo:
    """Parse `root/catalog.json`; a missing file, key or checkpoint directory names the culprit."""
    root = Path(root)
    catalog_path = root / "catalog.json"
    if not catalog_path.is_file():
        raise NotFoundError(f"zoo {root}: no catalog.json (build one with `simmerge zoo build`)")
    raw = catalog_path.read_bytes()
    try:
        catalog = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SimMergeError(f"{catalog_path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    except (ValueError, RecursionError):  # not UTF-8, or nested too deep
        raise SimMergeError(f"{catalog_path}: invalid JSON") from None
    if not isinstance(catalog, dict):
        raise SimMergeError(f"{catalog_path}: expected a JSON object")
    tasks = tuple(_task(root, catalog_path, t) for t in _list(catalog, "tasks", catalog_path))
    checkpoints = [_checkpoint(root, catalog_path, c) for c in _list(catalog, "checkpoints", catalog_path)]
    by_name = {c.name: c for c in checkpoints}
    for ckpt in checkpoints:
        if ckpt.role == "expert" and ckpt.base not in by_name:
            raise SimMergeError(
                f"{catalog_path}: expert {ckpt.name!r} names base {ckpt.base!r}, not in the zoo"
            )
    return Zoo(root, tasks, by_name, hashlib.sha256(raw).hexdigest())


def _list(catalog: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    value = catalog.get(key)
    if not isinstance(value, list) or not value:
        raise SimMergeError(f"{path}: {key!r} must be a non-empty list")
    return value


def _field(entry: Any, key: str, path: Path, what: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise SimMergeError(f"{path}: a {what} entry lacks {key!r}: {entry!r}")
    return entry[key]


def _task(root: Path, path: Path, entry: Any) -> ZooTask:
    name = str(_field(entry, "name", path, "task"))
    file = root / str(_field(entry, "file", path, "task"))
    if not file.is_file():
        raise NotFoundError(f"{path}: task {name!r} file {file} does not exist")
    return ZooTask(name, file, str(entry.get("metric", "token_accuracy")), bool(entry.get("held_out", False)))


def _checkpoint(root: Path, path: Path, entry: Any) -> ZooCheckpoint:
    name = str(_field(entry, "name", path, "checkpoint"))
    directory = root / str(_field(entry, "path", path, "checkpoint"))
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{path}: checkpoint {name!r} at {directory} is not a checkpoint (no config.json)"
        )
    role = str(entry.get("role") or ("expert" if entry.get("base") else "base"))
    if role not in ("base", "expert"):
        raise SimMergeError(f"{path}: checkpoint {name!r} has role {role!r}; expected base or expert")
    base = entry.get("base")
    if role == "expert" and not base:
        raise SimMergeError(f"{path}: expert {name!r} names no base")
    return ZooCheckpoint(
        name, directory, role, base, str(entry.get("family") or base or name), tuple(entry.get("tasks") or ())
    )


def check_architectures(zoo: Zoo, names: list[str]) -> None:
    """Every named checkpoint must merge with its family's base (and the bases with each other when
    cross-family plans mix them); the error names the checkpoint, not just a tensor."""
    from simmerge.checkpoint import Checkpoint, check_compatible

    opened = {n: Checkpoint.open(zoo.resolve(n)) for n in names}
    reference_name = names[0]
    reference = opened[reference_name]
    for name in names[1:]:
        ckpt = opened[name]
        if _architecture(ckpt.config) != _architecture(reference.config):
            raise IncompatibleCheckpointsError(
                f"zoo {zoo.root}: checkpoint {name!r} ({ckpt.path}) is a {_architecture(ckpt.config)} "
                f"but {reference_name!r} is a {_architecture(reference.config)}"
            )
        try:
            check_compatible([reference, ckpt])
        except IncompatibleCheckpointsError as exc:
            raise IncompatibleCheckpointsError(
                f"zoo {zoo.root}: checkpoint {name!r} cannot be merged with {reference_name!r}: {exc}"
            ) from None


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return "/".join(str(a) for a in archs)
