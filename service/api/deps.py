"""FastAPI dependencies: the app's shared objects, overridable in tests.

Coroutines, though they only read `app.state`: FastAPI runs a plain `def` dependency on its thread
pool, a hand-off per dependency per request."""

from __future__ import annotations

from typing import Any

from fastapi import Query, Request

from service.adapters import Selector
from service.settings import ServiceSettings
from service.store import Store
from simmerge.catalog import Catalog


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def get_selector(request: Request) -> Selector:
    return request.app.state.selector


async def get_jobs(request: Request) -> Any:
    return request.app.state.jobs


class Paging:
    def __init__(
        self, offset: int = Query(0, ge=0, le=2**31 - 1), limit: int = Query(50, ge=1, le=1000)
    ) -> None:
        self.offset = offset
        self.limit = limit
