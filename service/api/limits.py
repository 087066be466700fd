"""Request body limit, in front of everything: a body over the limit is refused with 413 before any
route buffers it.

A declared `Content-Length` over the limit is answered at once, unread; a chunked body is counted as
it is received and the read that crosses the limit raises `BodyTooLargeError`, an HTTPException:
FastAPI's handler answers it inside a route, and `UnhandledErrors` (inside this middleware) answers
it anywhere else, both with the 413 envelope.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import envelope

LimitFor = Callable[[Scope], int]


class BodyTooLargeError(HTTPException):
    """The request body passed its limit; an HTTPException so FastAPI's body parsing re-raises it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimit:
    """Plain ASGI middleware: `limit_for(scope)` gives each request's limit in bytes."""

    def __init__(self, app: ASGIApp, *, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(BodyTooLargeError(limit), scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(exc: BodyTooLargeError, scope: Scope, receive: Receive, send: Send) -> None:
    await envelope(413, "payload_too_large", str(exc.detail))(scope, receive, send)


def limits_by_route(default: int, routes: dict[tuple[str, str], int]) -> LimitFor:
    """`default` everywhere except the (method, path) pairs of `routes` (task uploads: their own limit)."""

    def limit_for(scope: Scope) -> int:
        return routes.get((scope["method"], scope["path"]), default)

    return limit_for
