"""The plain-ASGI recommendation path answers exactly as the FastAPI route it stands in front of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.fast_path import RecommendationFastPath
from service.app import create_app
from service.settings import ServiceSettings
from tests.test_service_api import FakeSelector
from tests.test_service_support import auth, make_family, token_settings

JSON = {"Content-Type": "application/json"}
REQUESTS: list[tuple[dict[str, str], bytes]] = [
    (JSON, b'{"models": ["math", "code"], "top": 2}'),
    ({"Content-Type": "application/json; charset=utf-8"}, b'{"models": ["code", "math"], "task": "t"}'),
    (JSON, b'{"models": ["math", "math"]}'),  # a checkpoint twice
    (JSON, b'{"models": ["math", "nowhere"]}'),  # not in the catalog
    (JSON, b'{"models": ["math", "code"], "colour": "red"}'),  # unknown field
    (JSON, b'{"models": ["math", "code"], "top": 0}'),
    (JSON, b'{"models": ["math"]}'),
    (JSON, b'{"models": ["math", "code"'),  # malformed JSON
    (JSON, b""),
    ({"Content-Type": "text/plain"}, b'{"models": ["math", "code"]}'),
]


def make_client(tmp_path: Path, fast: bool, **settings: Any) -> TestClient:
    family = make_family(tmp_path / "zoo")
    (tmp_path / "home").mkdir()
    options = ServiceSettings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'home' / 'simmerge.db'}",
        catalog_roots=[tmp_path / "zoo"],
        tokens=token_settings(),
        start_jobs=False,
        **settings,
    )
    app = create_app(options, selector=FakeSelector())
    if not fast:  # the same app without the fast path: every request goes through FastAPI
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RecommendationFastPath]
    client = TestClient(app)
    client.__enter__()
    for name in ("base", "math", "code"):
        body = {"path": str(family[name]), "name": name, **({"base": "base"} if name != "base" else {})}
        assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
    return client


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory):
    fast = make_client(tmp_path_factory.mktemp("fast"), fast=True)
    plain = make_client(tmp_path_factory.mktemp("plain"), fast=False)
    yield fast, plain
    fast.__exit__(None, None, None)
    plain.__exit__(None, None, None)


@pytest.mark.parametrize(("headers", "body"), REQUESTS)
def test_fast_path_answers_as_the_route_does(clients, headers: dict[str, str], body: bytes) -> None:
    fast, plain = clients
    got = fast.post("/v1/recommendations", content=body, headers=headers)
    expected = plain.post("/v1/recommendations", content=body, headers=headers)
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())


def test_well_formed_requests_take_the_fast_path_and_are_counted_under_the_route(
    clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.api.fast_path as fast_path

    answered: list[Any] = []
    ranked_plans = fast_path.ranked_plans

    async def counting(recommendations: Any, body: Any) -> Any:
        answered.append(body)
        return await ranked_plans(recommendations, body)

    monkeypatch.setattr(fast_path, "ranked_plans", counting)
    fast, _ = clients
    assert fast.post("/v1/recommendations", json={"models": ["math", "code"]}).status_code == 200
    assert fast.post("/v1/recommendations", json={"models": ["math"]}).status_code == 422
    assert len(answered) == 1  # the valid one; the route answered the other
    assert 'route="/v1/recommendations",status="200"' in fast.get("/metrics").text
    assert 'route="/v1/recommendations",status="404"' in fast.get("/metrics").text  # an earlier case


def test_reads_that_need_a_token_go_through_the_route(tmp_path: Path) -> None:
    client = make_client(tmp_path, fast=True, read_requires_auth=True)
    try:
        body = {"models": ["math", "code"]}
        assert client.post("/v1/recommendations", json=body).status_code == 401
        assert client.post("/v1/recommendations", json=body, headers=auth("reader")).status_code == 200
    finally:
        client.__exit__(None, None, None)
