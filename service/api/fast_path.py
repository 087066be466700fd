"""`POST /v1/recommendations` answered in plain ASGI, ahead of FastAPI's routing and validation.

FastAPI's handling of a request (routing, dependency solving, body parsing) costs about 0.25 ms here:
as much as a recommendation's share of a batched selector call, while reading and validating the body
with the same pydantic model directly costs a few microseconds. So a JSON request to the endpoint
is read here and, when it is well formed and reads need no token, answered with the route's own code
(`selection.ranked_plans`, `selection.encoded`). Everything else goes on to the FastAPI route, with
the body replayed, and gets its documented answer there: another content type, a body the model
rejects, reads that need a token. The FastAPI route stays the endpoint's definition in OpenAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.schemas import RecommendationIn
from service.api.selection import RECOMMENDATIONS, encoded, ranked_plans, router
from simmerge.errors import SimMergeError

MAX_BODY = 64 * 1024  # a request names at most 64 checkpoints; a larger body goes to the route
# The route's object: the request metrics label a request by its route's template.
ROUTE = next(r for r in router.routes if getattr(r, "path", None) == RECOMMENDATIONS)


class RecommendationFastPath:
    """Middleware: well-formed recommendation requests skip the framework; others pass through."""

    def __init__(self, app: ASGIApp, *, prefix: str) -> None:
        self.app = app
        self.path = prefix + RECOMMENDATIONS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        if state.settings.read_requires_auth or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body, complete, disconnected = await _read_body(receive)
        if disconnected:
            return
        replay = _replaying(body, complete, receive)
        request = _validated(body) if complete else None
        if request is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = ROUTE
        try:
            result = await ranked_plans(state.recommendations, request)
        except SimMergeError as exc:
            await error_response(exc)(scope, replay, send)
            return
        data = encoded(result)
        if data is None:  # an unusual value: the route's response model converts it
            await self.app(scope, replay, send)
            return
        await Response(data, media_type="application/json")(scope, replay, send)


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> tuple[bytes, bool, bool]:
    """(body so far, whether it is complete, whether the client went away); stops past MAX_BODY."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False, True
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True, False
        if size > MAX_BODY:
            return b"".join(chunks), False, False


def _replaying(body: bytes, complete: bool, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the body read so far first, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": not complete}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _validated(body: bytes) -> RecommendationIn | None:
    try:
        return RecommendationIn.model_validate_json(body)
    except ValidationError:
        return None
