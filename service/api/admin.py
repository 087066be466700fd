"""Token administration: a new token is shown once, then only its sha256 exists; a revoked token
fails at once in every server process (each request reads its token's row)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service.api.deps import get_store
from service.api.schemas import NAME_PATTERN, TokenIn, TokenInfo, TokenOut
from service.auth import hash_token, new_token, require_scope
from service.store import Store

router = APIRouter(prefix="/tokens", tags=["admin"])
Admin = Annotated[str, Depends(require_scope("admin"))]


@router.post("", response_model=TokenOut, status_code=201)
def create_token(body: TokenIn, store: Annotated[Store, Depends(get_store)], _: Admin) -> dict:
    token = new_token()
    store.add_token(body.name, hash_token(token), body.scopes)
    return {"name": body.name, "scopes": sorted(set(body.scopes)), "token": token}


@router.get("", response_model=list[TokenInfo])
def list_tokens(store: Annotated[Store, Depends(get_store)], _: Admin) -> list[dict]:
    """Names, scopes, origin and revocation; never a digest."""
    return [
        {
            "name": row.name,
            "scopes": row.scopes.split(","),
            "source": row.source,
            "revoked": row.revoked,
            "created_at": row.created_at,
            "revoked_at": row.revoked_at,
        }
        for row in store.list_tokens()
    ]


@router.delete("/{name}", status_code=204, response_class=Response)
def revoke_token(
    name: Annotated[str, Path(pattern=NAME_PATTERN)], store: Annotated[Store, Depends(get_store)], _: Admin
) -> Response:
    """Revoke now; a configured token stays revoked across restarts until it is given a new value."""
    store.revoke_token(name)
    return Response(status_code=204)
