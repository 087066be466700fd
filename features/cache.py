"""The signature cache under `<home>/signatures/` and the functions that fill and read it.

Keys: a functional part is keyed by (checkpoint content hash, probe-set hash, signature settings,
FEATURE_SCHEMA_VERSION); a structural part by (content hash, its base's content hash, settings,
version). Changing the probes recomputes only functional parts; a new checkpoint costs only its own
parts. Content hashes are memoised against the weight files' (name, size, mtime) so a warm run reads
no weights at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.functional import load_probe_texts, probe_hash
from features.schema import DEFAULT_CONFIG, FEATURE_SCHEMA_VERSION, SignatureConfig
from features.signature import Signature, SignaturePart, _atomic_write
from simmerge.checkpoint import Checkpoint
from simmerge.errors import NotFoundError, SimMergeError

Progress = Callable[[float, str | None], None]
DEFAULT_PROBES = [  # used only when neither --probes, an earlier run, nor a zoo names a probe set
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Question: what is 12 times 7? Answer:",
    "Translate to French: good morning, my friend.",
    "Once upon a time, in a small village by the sea,",
    "The derivative of x squared with respect to x is",
    "SELECT name FROM users WHERE age > 30;",
    "Summarise: the meeting moved to Thursday because the room was booked.",
]


def signatures_dir(home: Path) -> Path:
    return Path(home) / "signatures"


# ----------------------------------------------------------------------------- content hashes


def _fingerprint(checkpoint: Checkpoint) -> list[list[Any]]:
    files = sorted({info.file for info in checkpoint.tensors.values()})
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def content_hash(home: Path, checkpoint: Checkpoint) -> str:
    """`checkpoint.content_hash()`, memoised in the cache against the weight files' size and mtime."""
    memo_path = signatures_dir(home) / "hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    key = str(checkpoint.path.resolve())
    fingerprint = _fingerprint(checkpoint)
    entry = memo.get(key)
    if entry and entry.get("fingerprint") == fingerprint:
        return str(entry["hash"])
    digest = checkpoint.content_hash()
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}  # another run may have written
    memo[key] = {"fingerprint": fingerprint, "hash": digest}
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(memo_path, lambda f: f.write(json.dumps(memo, indent=1, sort_keys=True).encode()))
    return digest


# ----------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbeSet:
    texts: list[str]
    hash: str


def store_probes(home: Path, texts: Sequence[str]) -> ProbeSet:
    """Keep a copy of the probe set and make it the home's active one (what later reads use)."""
    probes = ProbeSet(list(texts), probe_hash(texts))
    folder = signatures_dir(home) / "probes"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{probes.hash}.jsonl"
    if not copy.is_file():
        body = "".join(json.dumps({"text": t}) + "\n" for t in probes.texts)
        _atomic_write(copy, lambda f: f.write(body.encode()))
    _atomic_write(folder / "active", lambda f: f.write(probes.hash.encode()))
    return probes


def active_probes(home: Path) -> ProbeSet | None:
    marker = signatures_dir(home) / "probes" / "active"
    if not marker.is_file():
        return None
    texts = load_probe_texts(marker.parent / f"{marker.read_text().strip()}.jsonl")
    return ProbeSet(texts, probe_hash(texts))


def choose_probes(home: Path, probes: Path | Sequence[str] | None, paths: Sequence[Path]) -> ProbeSet:
    """Given probes, else the home's active set, else a zoo's probes.jsonl beside the checkpoints, else
    a small built-in set."""
    if probes is not None:
        texts = load_probe_texts(Path(probes)) if isinstance(probes, str | os.PathLike) else list(probes)
        if not texts:
            raise SimMergeError("the probe set is empty")
        return store_probes(home, texts)
    active = active_probes(home)
    if active is not None:
        return active
    for path in paths:
        manifest = _zoo_manifest(path)
        if manifest is not None and manifest[1].get("probes"):
            return store_probes(home, load_probe_texts(manifest[0] / manifest[1]["probes"]))
    return store_probes(home, DEFAULT_PROBES)


def _zoo_manifest(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """(zoo root, catalog.json) when `path` is a checkpoint inside a zoo (`ROOT/checkpoints/NAME`)."""
    root = Path(path).resolve().parent.parent
    manifest = root / "catalog.json"
    if not manifest.is_file():
        return None
    try:
        return root, json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------- file names


def functional_stem(home: Path, chash: str, probes_hash: str, config: SignatureConfig) -> Path:
    name = f"{chash}-{probes_hash[:16]}-{config.functional_key()}-v{FEATURE_SCHEMA_VERSION}"
    return signatures_dir(home) / "functional" / name


def structural_stem(home: Path, chash: str, base_hash: str, config: SignatureConfig) -> Path:
    name = f"{chash}-{base_hash[:16]}-{config.structural_key()}-v{FEATURE_SCHEMA_VERSION}"
    return signatures_dir(home) / "structural" / name


def _exists(stem: Path) -> bool:
    return stem.with_suffix(".json").is_file() and stem.with_suffix(".npz").is_file()


# ----------------------------------------------------------------------------- where bases come from


def _catalog_entries(home: Path) -> dict[str, Any]:
    if not (Path(home) / "simmerge.db").exists():
        return {}
    from simmerge.catalog import Catalog

    with Catalog.open(home) as catalog:
        return {e.name: e for e in catalog.list()}


def _base_path(name: str, path: Path, paths: Mapping[str, Path], base_of, entries) -> Path | None:
    """The base checkpoint directory of `name`, or None when it is a base (or none is known)."""
    if base_of is not None and name in base_of:
        base = base_of[name]
    elif name in entries:
        base = entries[name].base
    else:
        manifest = _zoo_manifest(path)
        rows = {c["name"]: c for c in manifest[1].get("checkpoints", [])} if manifest else {}
        row = rows.get(name) or rows.get(Path(path).name)
        if row is None or not row.get("base"):
            return None
        base_row = rows.get(row["base"])
        return manifest[0] / base_row["path"] if base_row else None
    if not base:
        return None
    if base in paths:
        return Path(paths[base])
    if base in entries:
        return Path(entries[base].path)
    if Path(base).is_dir():
        return Path(base)
    raise NotFoundError(f"base {base!r} of checkpoint {name!r} is not in the catalog")


# ----------------------------------------------------------------------------- filling the cache


def _named_paths(checkpoints: Mapping[str, Path] | Sequence[Path | str]) -> dict[str, Path]:
    if isinstance(checkpoints, Mapping):
        return {str(k): Path(v) for k, v in checkpoints.items()}
    return {Path(p).name: Path(p) for p in checkpoints}


class _Reporter:
    """tqdm when `progress` is True, a `(fraction, message)` callback when callable, else silent."""

    def __init__(self, progress: bool | Progress, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="signatures", unit="part")

    def step(self, message: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.update(1)
        if self.callback is not None:
            self.callback(min(self.done / self.total, 1.0), message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compute_signatures(
    checkpoints: Mapping[str, Path] | Sequence[Path | str],
    base_of: Mapping[str, str | None] | None = None,
    probes: Path | Sequence[str] | None = None,
    home: Path | None = None,
    progress: bool | Progress = True,
    *,
    config: SignatureConfig = DEFAULT_CONFIG,
    device: str = "cpu",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Fill the cache for `checkpoints` (name → directory, or directories named after themselves).

    A checkpoint's base comes from `base_of` (name → base name or None), else the home's catalog, else
    the zoo manifest around it; bases get a (zero task vector) structural part too. Only missing parts
    are computed. Returns counts: computed and cached parts, and the probe-set hash.
    """
    from simmerge.home import resolve_home

    home = resolve_home(home)
    paths = _named_paths(checkpoints)
    entries = _catalog_entries(home)
    base_paths = {n: _base_path(n, p, paths, base_of, entries) for n, p in paths.items()}
    probe_set = choose_probes(home, probes, list(paths.values()))
    opened: dict[Path, Checkpoint] = {}

    def open_checkpoint(path: Path) -> Checkpoint:
        key = Path(path).resolve()
        if key not in opened:
            opened[key] = Checkpoint.open(key)
        return opened[key]

    hashes = {
        p: content_hash(home, open_checkpoint(p))
        for p in {*paths.values(), *filter(None, base_paths.values())}
    }
    hashes = {Path(p).resolve(): h for p, h in hashes.items()}
    todo_functional = [
        (n, p)
        for n, p in paths.items()
        if not _exists(functional_stem(home, hashes[p.resolve()], probe_set.hash, config))
    ]
    todo_structural = _structural_work(home, paths, base_paths, hashes, config)
    reporter = _Reporter(progress, len(todo_functional) + sum(len(v) for v in todo_structural.values()))
    try:
        for base, members in todo_structural.items():
            _fill_structural(home, open_checkpoint(base), members, hashes, config, open_checkpoint, reporter)
        for name, path in todo_functional:
            _fill_functional(home, name, path, hashes[path.resolve()], probe_set, config, device, batch_size)
            reporter.step(f"{name} (functional)")
    finally:
        reporter.close()
    n_structural = sum(len(v) for v in todo_structural.values())
    return {
        "checkpoints": len(paths),
        "computed_functional": len(todo_functional),
        "computed_structural": n_structural,
        "cached": 2 * len(paths) - len(todo_functional) - n_structural,
        "probe_hash": probe_set.hash,
        "directory": str(signatures_dir(home)),
    }


def _structural_work(home, paths, base_paths, hashes, config) -> dict[Path, list[Path]]:
    """Base directory → the checkpoints (possibly the base itself) whose structural part is missing."""
    work: dict[Path, list[Path]] = {}
    for name, path in paths.items():
        base = (base_paths[name] or path).resolve()
        stem = structural_stem(home, hashes[path.resolve()], hashes[base], config)
        if not _exists(stem):
            members = work.setdefault(base, [])
            if path.resolve() not in members:
                members.append(path.resolve())
    return work


def _fill_structural(home, base: Checkpoint, members, hashes, config, open_checkpoint, reporter) -> None:
    from features.structural import structural_signatures

    base_key = base.path.resolve()
    experts = [open_checkpoint(p) for p in members if p != base_key]
    parts = structural_signatures(base, experts, hashes[base_key], config, include_base=base_key in members)
    owners = [e.path.resolve() for e in experts] + ([base_key] if base_key in members else [])
    for owner, part in zip(owners, parts, strict=True):
        part.save(structural_stem(home, hashes[owner], hashes[base_key], config))
        reporter.step(f"{owner.name} (structural)")


def _fill_functional(home, name, path, chash, probe_set, config, device, batch_size) -> None:
    from features.functional import checkpoint_functional

    part = checkpoint_functional(path, probe_set.texts, config, batch_size=batch_size, device=device)
    part.meta["checkpoint"] = name
    part.save(functional_stem(home, chash, probe_set.hash, config))


# ----------------------------------------------------------------------------- reading


def load_signature(
    home: Path,
    checkpoint: Path | str,
    *,
    name: str | None = None,
    config: SignatureConfig = DEFAULT_CONFIG,
    compute: bool = True,
) -> Signature:
    """The cached signature of a checkpoint (a directory, or a catalog name), computing what is missing
    when `compute` (its base found as `compute_signatures` finds it)."""
    home = Path(home)
    path = Path(checkpoint)
    entries = _catalog_entries(home)
    if not path.is_dir():
        if str(checkpoint) not in entries:
            raise NotFoundError(f"checkpoint {checkpoint!r} is neither a directory nor in the catalog")
        name = name or str(checkpoint)
        path = Path(entries[str(checkpoint)].path)
    name = name or next(
        (n for n, e in entries.items() if Path(e.path).resolve() == path.resolve()), path.name
    )
    for attempt in range(2):
        signature = _read_cached(home, name, path, entries, config, active_probes(home))
        if signature is not None or not compute or attempt:
            break
        compute_signatures({name: path}, home=home, progress=False, config=config)
    if signature is None:
        raise NotFoundError(f"no cached signature for {name!r}; run `simmerge features`")
    return signature


def load_signatures(
    home: Path,
    checkpoints: Mapping[str, Path] | Sequence[Path | str],
    *,
    config: SignatureConfig = DEFAULT_CONFIG,
    compute: bool = True,
) -> dict[str, Signature]:
    """Signatures of many checkpoints (name → directory), computing the missing ones in one call (one
    pass per base) and reading the catalog and the probe set once."""
    home = Path(home)
    paths = _named_paths(checkpoints)
    if compute:
        compute_signatures(paths, home=home, progress=False, config=config)
    entries, probes = _catalog_entries(home), active_probes(home)
    out = {}
    for name, path in paths.items():
        signature = _read_cached(home, name, path, entries, config, probes)
        if signature is None:
            raise NotFoundError(f"no cached signature for {name!r}; run `simmerge features`")
        out[name] = signature
    return out


def _read_cached(home, name, path, entries, config, probes: ProbeSet | None) -> Signature | None:
    chash = content_hash(home, Checkpoint.open(path))
    functional = None
    if probes is not None and _exists(stem := functional_stem(home, chash, probes.hash, config)):
        functional = SignaturePart.load(stem)
    base = _base_path(name, path, {}, None, entries)
    if base is not None:
        stems = [structural_stem(home, chash, content_hash(home, Checkpoint.open(base)), config)]
    else:  # base unknown here: whichever base it was last computed against (newest first)
        pattern = structural_stem(home, chash, "*", config).name + ".json"
        found = sorted(signatures_dir(home).glob(f"structural/{pattern}"), key=lambda p: -p.stat().st_mtime)
        stems = [p.with_suffix("") for p in found] or [structural_stem(home, chash, chash, config)]
    structural = SignaturePart.load(stems[0]) if _exists(stems[0]) else None
    if functional is None or structural is None:
        return None
    return Signature(name, chash, functional, structural)
