"""What each job kind does inside a worker. Outputs are staged in the job's scratch directory and
only moved into place, and registered, once complete."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import ServiceSettings
from service.store import Store
from simmerge.catalog import Catalog
from simmerge.errors import ConflictError

Progress = Callable[..., None]


@dataclass
class JobContext:
    job_id: str
    request: dict[str, Any]
    settings: ServiceSettings
    store: Store
    progress: Progress

    @property
    def scratch(self) -> Path:
        return self.settings.scratch_dir / self.job_id

    def fresh_scratch(self) -> Path:
        """An empty scratch directory: whatever an earlier, killed attempt left is discarded."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        return self.scratch

    def catalog(self) -> Catalog:
        return Catalog(self.store.engine)


def load_plan(request: dict[str, Any]) -> Any:
    from simmerge.plan import Plan

    if request.get("mergekit_yaml"):
        return Plan.from_yaml(request["mergekit_yaml"], source="request")
    return Plan.from_dict(request["plan"])


def merge_output_path(settings: ServiceSettings, name: str) -> Path:
    return settings.merges_dir / name


def _already_done(catalog: Catalog, name: str, final: Path, job_id: str) -> dict[str, Any] | None:
    """An earlier attempt may have registered the output and died before marking the row."""
    if not catalog.has(name):
        return None
    entry = catalog.get(name)
    if entry.path == final.resolve() and entry.tags.get("merge_job") == job_id:
        return {"checkpoint": name, "path": str(entry.path), "content_hash": entry.content_hash}
    raise ConflictError(f"a checkpoint named {name!r} is already in the catalog")


def run_merge_job(ctx: JobContext) -> dict[str, Any]:
    from service.roots import check_registered_within_roots
    from simmerge.engine import check_output_path, run_merge

    plan = load_plan(ctx.request)
    name = ctx.request["name"]
    catalog = ctx.catalog()
    final = merge_output_path(ctx.settings, name)
    done = _already_done(catalog, name, final, ctx.job_id)
    if done is not None:
        return done
    # merges/ is a registration root: the output may never be, hold or lie inside a registered
    # checkpoint (the engine's own rule for an output), whatever name it was registered under
    check_output_path(final, (), [entry.path for entry in catalog.list()], choose="'name'")
    check_registered_within_roots(catalog, plan.checkpoints(), ctx.settings)
    if final.exists():  # renamed into place by a killed attempt, never registered: not trusted
        shutil.rmtree(final)
    staging = ctx.fresh_scratch() / "model"
    ctx.progress(0.0, "merging")
    run_merge(
        plan,
        staging,
        resolve=catalog.resolve,
        device=ctx.settings.resolved_merge_device,
        dtype=ctx.request.get("dtype"),
        seed=int(ctx.request.get("seed", 0)),
        progress=False,
        on_progress=lambda fraction: ctx.progress(0.95 * fraction, "merging"),
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    base = plan.output.base_model if plan.output.base_model and catalog.has(plan.output.base_model) else None
    try:
        entry = catalog.add(final, name, base=base, plan=plan.to_dict(), tags={"merge_job": ctx.job_id})
    except Exception:  # an output that cannot be registered must not linger at the output path
        shutil.rmtree(final, ignore_errors=True)
        raise
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    return {"checkpoint": name, "path": str(entry.path), "content_hash": entry.content_hash}


def load_runners(settings: ServiceSettings) -> Any:
    """The object that scores catalogs and computes features: `module:attribute` from the settings."""
    module_name, _, attribute = settings.job_runners.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def results_dir(settings: ServiceSettings, job_id: str) -> Path:
    return settings.home_dir / "results" / job_id


def run_scoring_job(ctx: JobContext) -> dict[str, Any]:
    """Score every candidate; rows go to `scores.jsonl` (+ `heatmap.png`) under the job's results dir."""
    staging = ctx.fresh_scratch() / "results"
    staging.mkdir()
    summary = load_runners(ctx.settings).score_catalog(
        ctx.catalog(), ctx.settings, ctx.request, staging, ctx.progress
    )
    final = results_dir(ctx.settings, ctx.job_id)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    rows = sum(1 for _ in (final / "scores.jsonl").open()) if (final / "scores.jsonl").exists() else 0
    return {**(summary or {}), "rows": rows, "heatmap": (final / "heatmap.png").exists()}


def run_features_job(ctx: JobContext) -> dict[str, Any]:
    summary = load_runners(ctx.settings).compute_features(
        ctx.catalog(), ctx.settings, ctx.request, ctx.progress
    )
    for item in (summary or {}).get("signatures", []):
        ctx.store.record_signature(
            item["checkpoint"], item["content_hash"], item["probes_hash"], item["path"]
        )
    return json.loads(json.dumps(summary or {}, default=str))


HANDLERS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "merge": run_merge_job,
    "scoring": run_scoring_job,
    "features": run_features_job,
}
