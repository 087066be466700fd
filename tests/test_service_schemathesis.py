"""Property-based run of every operation in /openapi.json (schemathesis): no input may cause a 5xx,
and every error keeps the envelope. Slow: run by `make bench` / `pytest -m slow`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.test_service_api import FakeSelector  # noqa: E402
from tests.test_service_support import auth, token_settings  # noqa: E402


@schemathesis.serializer("application/x-ndjson")
def _ndjson(_ctx, value) -> bytes:
    """Task uploads are raw bytes; hypothesis's generated value goes as it is."""
    return value if isinstance(value, bytes) else str(value).encode()


_HOME = Path(tempfile.mkdtemp(prefix="simmerge-schemathesis-"))
APP = create_app(
    ServiceSettings(home=_HOME, tokens=token_settings(), start_jobs=False, catalog_roots=[_HOME]),
    selector=FakeSelector(),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)  # reads the spec only; no database yet


@pytest.fixture(scope="module", autouse=True)
def _migrated():
    """The lifespan (migrations, tokens) runs only when the slow test actually runs."""
    with TestClient(APP):
        yield


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case) -> None:
    response = case.call(headers=auth("admin"))
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
