"""Recommendations (synchronous, from cached signatures only) and feedback for the bandit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.adapters import Selector
from service.api.deps import get_catalog, get_selector, get_store
from service.api.schemas import FeedbackIn, FeedbackOut, RecommendationIn, RecommendationOut
from service.auth import require_scope
from service.store import Store
from simmerge.catalog import Catalog, CheckpointRow
from simmerge.errors import NotFoundError, SimMergeError

router = APIRouter(tags=["recommendations"])


def checkpoint_bases(catalog: Catalog, names: list[str]) -> dict[str, str | None]:
    """Name → base for the named checkpoints that exist, in one query (this path is latency-bound)."""
    with Session(catalog.engine) as session:
        rows = session.execute(
            select(CheckpointRow.name, CheckpointRow.base).where(CheckpointRow.name.in_(names))
        )
        return {name: base for name, base in rows}


@router.post("/recommendations", response_model=RecommendationOut)
async def recommend(
    body: RecommendationIn,
    catalog: Annotated[Catalog, Depends(get_catalog)],
    selector: Annotated[Selector, Depends(get_selector)],
    _: Annotated[str, Depends(require_scope("read"))],
) -> dict:
    """Rank candidate plans over `models`; reads signatures from the cache and never loads a checkpoint."""
    if len(set(body.models)) != len(body.models):
        raise SimMergeError("'models' lists a checkpoint twice")
    bases = await run_in_threadpool(checkpoint_bases, catalog, body.models)
    for model in body.models:
        if model not in bases:
            raise NotFoundError(f"{model!r} is not a checkpoint in the catalog")
    shared = set(bases.values())
    base = shared.pop() if len(shared) == 1 else None
    plans = await run_in_threadpool(selector.recommend, body.models, top=body.top, task=body.task, base=base)
    return {"plans": plans, "task": body.task}


@router.post("/feedback", response_model=FeedbackOut, status_code=201, tags=["feedback"])
def feedback(
    body: FeedbackIn,
    store: Annotated[Store, Depends(get_store)],
    catalog: Annotated[Catalog, Depends(get_catalog)],
    selector: Annotated[Selector, Depends(get_selector)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    """Record a measured score of a merge on a task and teach the bandit with it."""
    if (body.merge_id is None) == (body.checkpoint is None):
        raise SimMergeError("give exactly one of 'merge_id' and 'checkpoint'")
    if body.merge_id is not None:
        job = store.get_job(body.merge_id, "merge")
        checkpoint, plan = job.request["name"], job.request["plan"]
        prior = job.request.get("predicted_score")
    else:
        entry = catalog.get(body.checkpoint or "")
        if not entry.plan:
            raise SimMergeError(f"checkpoint {entry.name!r} is not a merge (it has no plan)")
        checkpoint, plan, prior = entry.name, entry.plan, None
    if all(t.name != body.task for t in catalog.tasks()):
        raise NotFoundError(f"no task named {body.task!r} in the catalog")
    from simmerge.plan import Plan

    plan_id = Plan.from_dict(plan).plan_id()
    row = store.add_feedback(
        checkpoint=checkpoint,
        task=body.task,
        score=body.score,
        plan=plan,
        plan_id=plan_id,
        merge_job_id=body.merge_id,
    )
    selector.feedback(
        {"plan": plan, **({"predicted_score": prior} if prior is not None else {})}, body.task, body.score
    )
    return {
        "id": row.id,
        "checkpoint": checkpoint,
        "task": body.task,
        "score": body.score,
        "merge_id": body.merge_id,
    }
