"""Token administration: a new token is shown once, then only its sha256 exists."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.deps import get_store
from service.api.schemas import TokenIn, TokenOut
from service.auth import hash_token, new_token, require_scope
from service.store import Store

router = APIRouter(prefix="/tokens", tags=["admin"])


@router.post("", response_model=TokenOut, status_code=201)
def create_token(
    body: TokenIn,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[str, Depends(require_scope("admin"))],
) -> dict:
    token = new_token()
    store.add_token(body.name, hash_token(token), body.scopes)
    return {"name": body.name, "scopes": sorted(set(body.scopes)), "token": token}
