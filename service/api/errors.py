"""One error shape for every failure: `{"error": {"code", "message"}}` with a fitting status."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simmerge.errors import SimMergeError

log = logging.getLogger("simmerge.service")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal_error",
    503: "unavailable",
}


class PayloadTooLargeError(SimMergeError):
    http_status = 413


class UnavailableError(SimMergeError):
    """A component the request needs (the learned selector, Ray) is not installed or not ready."""

    http_status = 503


def error_code(exc: SimMergeError) -> str:
    """`PlanError` → `plan_error`; the generic classes use their status's name."""
    if type(exc) is SimMergeError or exc.http_status in (401, 403, 404, 409, 413, 503):
        return _STATUS_CODES.get(exc.http_status, "bad_request")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(exc: SimMergeError) -> JSONResponse:
    """The envelope of a SimMergeError, with its status (and the challenge header for a 401)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return envelope(exc.http_status, error_code(exc), str(exc), headers)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "error")
    return envelope(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for the expected failures; an unexpected one is `UnhandledErrors`' (a middleware)."""

    @app.exception_handler(SimMergeError)
    async def _simmerge(_request: Request, exc: SimMergeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(422, "validation_error", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc)


class UnhandledErrors:
    """Plain ASGI middleware: an exception that escapes the app is answered with its envelope (500
    for anything unexpected) and goes no further.

    Not `exception_handler(Exception)`: Starlette re-raises after that handler answers, and uvicorn
    then closes the connection, so a keep-alive client's next request on it was reset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def observed(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, observed)
        except Exception as exc:
            if started:  # the status is sent; only closing the connection can tell the client
                raise
            await _unhandled_response(exc, scope)(scope, receive, send)


def _unhandled_response(exc: Exception, scope: Scope) -> JSONResponse:
    if isinstance(exc, SimMergeError):
        return error_response(exc)
    if isinstance(exc, StarletteHTTPException):
        return http_error_response(exc)
    log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
    return envelope(500, "internal_error", f"internal error ({type(exc).__name__})")
