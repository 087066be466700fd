"""Recommendations (synchronous, from cached signatures only) and feedback for the bandit."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from service.adapters import RecommendationQuery, Selector
from service.api.deps import get_catalog, get_selector, get_store
from service.api.schemas import (
    FeedbackIn,
    FeedbackOut,
    RecommendationIn,
    RecommendationOut,
    RecommendedPlan,
)
from service.auth import require_scope
from service.store import Store
from simmerge.catalog import Catalog
from simmerge.errors import NotFoundError, SimMergeError

router = APIRouter(tags=["recommendations"])


# Keys a client may rely on that the selector leaves out when they do not apply (the response model's
# defaults), so the pre-serialised response has the same shape as a validated one.
_PLAN_DEFAULTS = {
    name: field.get_default(call_default_factory=True)
    for name, field in RecommendedPlan.model_fields.items()
    if not field.is_required()
}


RECOMMENDATIONS = "/recommendations"


@router.post(RECOMMENDATIONS, response_model=RecommendationOut)
async def recommend(
    body: RecommendationIn, request: Request, _: Annotated[str, Depends(require_scope("read"))]
) -> Response | dict:
    """Rank candidate plans over `models`; reads signatures from the cache and never loads a checkpoint
    (a checkpoint without one is a 409 that names it and the features job that makes it).

    Ranked by the regressor, or by the bandit (`mode`: `exploit`, the posterior mean, by default;
    `explore`, its upper confidence bound, for a search) once the store holds feedback; `ranked_by`
    says which. Runs on the event loop, not the thread pool: the selector takes a few milliseconds, a
    process runs one selector call at a time anyway, and requests that arrive together share one call
    (`service.batching`).
    """
    if len(set(body.models)) != len(body.models):
        raise SimMergeError("'models' lists a checkpoint twice")
    query = RecommendationQuery(tuple(body.models), body.top, body.task, mode=body.mode)
    result = await request.app.state.recommendations.recommend(query)
    plans = [{**_PLAN_DEFAULTS, **plan} for plan in result["plans"]]
    response = {"plans": plans, "task": body.task, "ranked_by": result["ranked_by"]}
    data = encoded(response)
    return Response(data, media_type="application/json") if data is not None else response


def encoded(result: dict[str, Any]) -> bytes | None:
    """The JSON of a response body, or None for a type orjson does not know (the response model converts
    it then). NaN and infinities become null, as the response model writes them."""
    try:
        return orjson.dumps(result)
    except orjson.JSONEncodeError:
        return None


@router.post("/feedback", response_model=FeedbackOut, status_code=201, tags=["feedback"])
def feedback(
    body: FeedbackIn,
    store: Annotated[Store, Depends(get_store)],
    catalog: Annotated[Catalog, Depends(get_catalog)],
    selector: Annotated[Selector, Depends(get_selector)],
    _: Annotated[str, Depends(require_scope("write"))],
) -> dict:
    """Record a measured score of a merge on a task: one row, which is also the bandit's update (every
    server sharing the store learns it on its next recommendation)."""
    if (body.merge_id is None) == (body.checkpoint is None):
        raise SimMergeError("give exactly one of 'merge_id' and 'checkpoint'")
    if body.merge_id is not None:
        job = store.get_job(body.merge_id, "merge")
        checkpoint, plan = job.request["name"], job.request["plan"]
    else:
        entry = catalog.get(body.checkpoint or "")
        if not entry.plan:
            raise SimMergeError(f"checkpoint {entry.name!r} is not a merge (it has no plan)")
        checkpoint, plan = entry.name, entry.plan
    if all(t.name != body.task for t in catalog.tasks()):
        raise NotFoundError(f"no task named {body.task!r} in the catalog")
    selector.check_feedback(plan, body.score)
    row = store.add_feedback(
        checkpoint=checkpoint, task=body.task, score=body.score, plan=plan, merge_job_id=body.merge_id
    )
    return {
        "id": row.id,
        "checkpoint": checkpoint,
        "task": body.task,
        "score": body.score,
        "merge_id": body.merge_id,
    }
