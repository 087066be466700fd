"""Bearer tokens with scopes, stored as sha256 digests only.

Scopes nest: `admin` implies `write`, which implies `read`, so a token needs only its highest scope.
Every request reads its token's row, never a copy: a token revoked in the database (by
`DELETE /v1/tokens/{name}`, or left out of the configuration at start-up) fails at once in every
process that shares it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.settings import TOKEN_SCOPES, ServiceSettings
from service.store import Store
from simmerge.errors import SimMergeError

log = logging.getLogger("simmerge.service")
SCOPES = TOKEN_SCOPES
# Declared so /docs offers "Authorize"; the header is checked by `authenticate` (401 in the envelope).
_BEARER = HTTPBearer(auto_error=False, description="a token from SIMMERGE_TOKENS or POST /v1/tokens")
_IMPLIES = {"admin": {"admin", "write", "read"}, "write": {"write", "read"}, "read": {"read"}}


class UnauthorizedError(SimMergeError):
    """No usable bearer token."""

    http_status = 401


class ForbiddenError(SimMergeError):
    """A valid token without the scope the endpoint needs."""

    http_status = 403


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "smt_" + secrets.token_urlsafe(32)


def effective_scopes(scopes: str | list[str]) -> set[str]:
    names = scopes.split(",") if isinstance(scopes, str) else scopes
    granted: set[str] = set()
    for name in names:
        granted |= _IMPLIES.get(name.strip(), {name.strip()})
    return granted


def load_configured_tokens(settings: ServiceSettings, store: Store) -> None:
    """Make the stored configured tokens exactly the configuration's (hashed and checked by the
    settings): one removed from it stops working now, not never. Tokens made through the API stay."""
    configured = {name: (spec.sha256 or "", spec.scopes) for name, spec in settings.tokens.items()}
    removed, still_revoked = store.reconcile_configured_tokens(configured)
    if removed:
        log.warning("tokens no longer configured, removed: %s", ", ".join(sorted(removed)))
    if still_revoked:
        log.warning(
            "configured tokens that were revoked stay revoked (configure a new token): %s",
            ", ".join(sorted(still_revoked)),
        )


def authenticate(request: Request, store: Store) -> tuple[str, set[str]]:
    """The token's name and scopes, or 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("this endpoint needs an 'Authorization: Bearer <token>' header")
    digest = hash_token(token.strip())
    row = store.token_by_hash(digest)
    if row is None or not hmac.compare_digest(row.sha256, digest):
        raise UnauthorizedError("the bearer token is unknown or revoked")
    return row.name, effective_scopes(row.scopes)


def require_scope(scope: str) -> Callable[..., Awaitable[str]]:
    """A FastAPI dependency that admits tokens holding `scope` and returns the token's name."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(
        request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
    ) -> str:
        state = request.app.state
        if scope == "read" and not state.settings.read_requires_auth:
            return "anonymous"  # decided without a thread-pool hand-off: reads are the hot path
        name, granted = await run_in_threadpool(authenticate, request, state.store)
        if scope not in granted:
            raise ForbiddenError(f"token {name!r} lacks the {scope!r} scope")
        return name

    return dependency
