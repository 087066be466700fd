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
from service.batching import RecommendationBatcher
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
    """Rank candidate plans over `models`; reads signatures from the cache and never loads a checkpoint.

    Runs on the event loop, not the thread pool: the lookup and the selector are about a millisecond of
    CPU once the predictor is loaded, a process runs one selector call at a time anyway, and thread
    hand-offs cost more than they overlap. Requests that arrive together share one selector call
    (`service.batching`). Well-formed requests usually reach `ranked_plans` through the plain-ASGI
    `RecommendationFastPath` instead; this route documents the endpoint and answers everything else.
    """
    # app.state directly rather than through Depends: each dependency is resolved per request.
    result = await ranked_plans(request.app.state.recommendations, body)
    data = encoded(result)
    return result if data is None else Response(data, media_type="application/json")


async def ranked_plans(recommendations: RecommendationBatcher, body: RecommendationIn) -> dict[str, Any]:
    """The response body: the plans with every key the response model has (its defaults filled in)."""
    if len(set(body.models)) != len(body.models):
        raise SimMergeError("'models' lists a checkpoint twice")
    plans = await recommendations.recommend(RecommendationQuery(tuple(body.models), body.top, body.task))
    return {"plans": [{**_PLAN_DEFAULTS, **plan} for plan in plans], "task": body.task}


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
