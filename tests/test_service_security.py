"""The service's secrets, start-up, limits and failures: tokens can be revoked, no secret reaches a
worker's environment or an error, bodies and fields are bounded, a 500 keeps the connection."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.app import create_app
from service.jobs.local import worker_environment
from service.settings import ServiceSettings
from tests.test_service_api import FakeSelector, error_of
from tests.test_service_support import (  # noqa: F401
    TOKENS,
    auth,
    database,
    make_family,
    token_settings,
    wait_for,
)

SECRET = "smt_do-not-print-me-4242"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("roots") / "zoo")


def settings_for(tmp_path: Path, database: str, **overrides: Any) -> ServiceSettings:  # noqa: F811
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": database,
        "tokens": token_settings(),
        "start_jobs": False,
        "read_requires_auth": True,  # every GET checks its token: the probe of whether one works
        **overrides,
    }
    return ServiceSettings(**values)


def works(client: TestClient, token: str) -> bool:
    response = client.get("/v1/checkpoints", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code in (200, 401), response.text
    return response.status_code == 200


# ---- tokens: reconciled at start, revocable at once ------------------------------------------------
def test_a_token_left_out_of_the_configuration_stops_working_at_start(tmp_path: Path, database: str) -> None:  # noqa: F811
    with TestClient(create_app(settings_for(tmp_path, database), selector=FakeSelector())) as client:
        made = client.post("/v1/tokens", json={"name": "ci", "scopes": ["read"]}, headers=auth("admin"))
        api_token = made.json()["token"]
        assert works(client, TOKENS["writer"]) and works(client, api_token)
    fewer = {name: spec for name, spec in token_settings().items() if name != "writer"}
    restarted = settings_for(tmp_path, database, tokens=fewer)
    with TestClient(create_app(restarted, selector=FakeSelector())) as client:
        assert not works(client, TOKENS["writer"])
        assert works(client, TOKENS["reader"]) and works(client, api_token)  # API tokens are not configured
        listed = client.get("/v1/tokens", headers=auth("admin")).json()
        assert {t["name"]: t["source"] for t in listed} == {
            "reader": "config",
            "admin": "config",
            "ci": "api",
        }
        assert all(
            set(t) == {"name", "scopes", "source", "revoked", "created_at", "revoked_at"} for t in listed
        )


def test_a_revoked_token_fails_at_once_in_every_process_sharing_the_database(
    tmp_path: Path,
    database: str,  # noqa: F811
) -> None:
    """Two apps on one database stand for two server processes: each reads the token's row."""
    first = create_app(settings_for(tmp_path, database), selector=FakeSelector())
    second = create_app(settings_for(tmp_path, database), selector=FakeSelector())
    with TestClient(first) as one, TestClient(second) as two:
        made = one.post("/v1/tokens", json={"name": "ci", "scopes": ["write"]}, headers=auth("admin"))
        token = made.json()["token"]
        assert works(one, token) and works(two, token)
        assert one.delete("/v1/tokens/ci", headers=auth("writer")).status_code == 403
        assert one.delete("/v1/tokens/ci", headers=auth("admin")).status_code == 204
        assert not works(two, token) and not works(one, token)
        assert two.delete("/v1/tokens/ci", headers=auth("admin")).status_code == 204  # idempotent
        missing = two.delete("/v1/tokens/nope", headers=auth("admin"))
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        assert two.delete("/v1/tokens/writer", headers=auth("admin")).status_code == 204  # a configured one
        assert not works(one, TOKENS["writer"])


def test_a_revoked_configured_token_stays_revoked_until_it_gets_a_new_value(
    tmp_path: Path,
    database: str,  # noqa: F811
) -> None:
    with TestClient(create_app(settings_for(tmp_path, database), selector=FakeSelector())) as client:
        assert client.delete("/v1/tokens/writer", headers=auth("admin")).status_code == 204
    with TestClient(create_app(settings_for(tmp_path, database), selector=FakeSelector())) as client:
        assert not works(client, TOKENS["writer"])  # a restart does not revive a leaked token
    renewed = {**token_settings(), "writer": {"token": "tok-write-2", "scopes": ["write"]}}
    with TestClient(
        create_app(settings_for(tmp_path, database, tokens=renewed), selector=FakeSelector())
    ) as client:
        assert works(client, "tok-write-2") and not works(client, TOKENS["writer"])


# ---- no secret in an error, a log or a worker's environment ----------------------------------------
def run_serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`simmerge serve` with `env` added; these cases must stop before serving."""
    full = {**os.environ, "SIMMERGE_HOME": str(tmp_path / "home"), "SIMMERGE_ENV_FILE": "/nonexistent", **env}
    return subprocess.run(
        [sys.executable, "-m", "simmerge", "serve", "--port", "1"],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "tokens",
    [
        f'{{"ops": {{"token": "{SECRET}", "scopes": "admin"}}}}',  # scopes not a list
        f'{{"ops": {{"token": "{SECRET}", "scopes": ["root"]}}}}',  # an unknown scope
        f'{{"ops": {{"token": "{SECRET}", "sha256": "{SECRET}"}}}}',  # both
        f'{{"ops": {{"token": "{SECRET}"',  # not JSON
        f'["{SECRET}"]',  # not an object
    ],
)
def test_a_malformed_tokens_setting_is_one_line_without_the_token(tmp_path: Path, tokens: str) -> None:
    result = run_serve(tmp_path, SIMMERGE_TOKENS=tokens)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert SECRET not in output and "Traceback" not in output
    assert output.startswith("error: ") and "SIMMERGE_TOKENS" in output and output.count("\n") == 1


@pytest.mark.parametrize(
    "url",
    [
        "postgresql//admin:hunter2-pw@db.example/simmerge",  # no "://"
        "mysql://admin:hunter2-pw@db.example/simmerge",  # a driver the service does not use
        "postgresql://admin:hunter2-pw@db.example:port/simmerge",  # a port that is no number
    ],
)
def test_a_malformed_database_url_is_one_line_with_the_password_masked(tmp_path: Path, url: str) -> None:
    result = run_serve(tmp_path, SIMMERGE_DATABASE_URL=url)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "hunter2-pw" not in output and "Traceback" not in output and "***" in output
    assert output.startswith("error: ") and "SIMMERGE_DATABASE_URL" in output and output.count("\n") == 1


def test_an_unreachable_database_is_one_line_at_start(tmp_path: Path) -> None:
    url = "postgresql://admin:hunter2-pw@127.0.0.1:1/simmerge"
    result = run_serve(tmp_path, SIMMERGE_DATABASE_URL=url)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "hunter2-pw" not in output and "Traceback" not in output, output
    assert "SIMMERGE_DATABASE_URL" in output and "cannot be reached" in output


def test_worker_environment_keeps_only_the_allow_list() -> None:
    server_env = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "0",
        "SIMMERGE_TOKENS": SECRET,
        "SIMMERGE_DATABASE_URL": "postgresql://u:pw@h/db",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "CUDA_AUTH_TOKEN": SECRET,  # an allowed prefix, a secret's name
        "HF_TOKEN": SECRET,
    }
    assert worker_environment(server_env) == {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "0",
    }


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ (Linux)")
def test_a_job_worker_sees_no_secret_in_its_environment(
    tmp_path: Path,
    family: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real worker, held in its progress report by the fault-injection delay while it is read."""
    monkeypatch.setenv("SIMMERGE_TOKENS", json.dumps({"ops": {"token": SECRET, "scopes": ["admin"]}}))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    settings = settings_for(
        tmp_path,
        f"sqlite:///{tmp_path / 'simmerge.db'}",
        start_jobs=True,
        read_requires_auth=False,
        catalog_roots=[family["base"].parent],
        job_runners="tests.test_service_fakes:FAKE_RUNNERS",
        job_poll_interval_s=0.05,
        worker_step_delay_s=5.0,
    )
    with TestClient(create_app(settings, selector=FakeSelector())) as client:
        body = {"path": str(family["math"]), "name": "math"}
        assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        submitted = client.post("/v1/features", json={}, headers=auth("writer")).json()
        store = client.app.state.store
        row = wait_for(lambda: (r := store.get_job(submitted["id"])).progress >= 1.0 and r.worker_pid and r)
        environ = Path(f"/proc/{row.worker_pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{row.worker_pid}/cmdline").read_bytes()
        client.post(f"/v1/jobs/{submitted['id']}/cancel", headers=auth("writer"))
    names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
    assert b"PATH" in names and not any(name.startswith(b"SIMMERGE_") for name in names)
    for secret in (SECRET, *TOKENS.values(), str(tmp_path / "simmerge.db")):
        assert secret.encode() not in environ and secret.encode() not in cmdline


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_serve_keeps_secrets_out_of_its_web_workers_environment(tmp_path: Path) -> None:
    """`simmerge serve --workers 2` with a clear token: it works, and no process started inherits it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "SIMMERGE_HOME": str(tmp_path / "home"),
        "SIMMERGE_ENV_FILE": "/nonexistent",
        "SIMMERGE_TOKENS": json.dumps({"ops": {"token": SECRET, "scopes": ["admin"]}}),
    }
    command = [sys.executable, "-m", "simmerge", "serve", "--workers", "2", "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:

            def answers() -> bool:
                try:
                    return (
                        client.get("/v1/tokens", headers={"Authorization": f"Bearer {SECRET}"}).status_code
                        == 200
                    )
                except httpx.TransportError:
                    return False

            wait_for(answers, timeout=120, interval=0.5)
        started = children(server.pid)
        assert len(started) >= 2  # the web workers (and multiprocessing's resource tracker)
        for pid in started:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert SECRET.encode() not in environ and b"SIMMERGE_TOKENS" not in environ
            assert b"SIMMERGE_WORKER_SETTINGS_FILE" in environ  # settings by a private file's name
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---- body and field limits ---------------------------------------------------------------------
@pytest.fixture
def limited(tmp_path: Path, family: dict[str, Path]) -> Iterator[TestClient]:
    settings = settings_for(
        tmp_path,
        f"sqlite:///{tmp_path / 'simmerge.db'}",
        read_requires_auth=False,
        catalog_roots=[family["base"].parent],
        max_body_bytes=64 * 1024,
        max_upload_bytes=256 * 1024,
    )
    with TestClient(create_app(settings, selector=FakeSelector())) as client:
        yield client


def test_a_body_over_the_limit_is_413_before_any_route_reads_it(
    limited: TestClient, family: dict[str, Path]
) -> None:
    huge = {"path": str(family["math"]), "name": "math", "tags": {"blob": "x" * (10 * 2**20)}}
    declared = limited.post("/v1/checkpoints", json=huge, headers=auth("writer"))
    assert declared.status_code == 413 and error_of(declared)["code"] == "payload_too_large"
    assert "65536 bytes" in error_of(declared)["message"]
    chunks = (b"x" * 4096 for _ in range(64))  # no Content-Length: counted as it arrives
    streamed = limited.post(
        "/v1/checkpoints", content=chunks, headers={**auth("writer"), "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "payload_too_large"
    for path in ("/v1/recommendations", "/v1/merges", "/v1/scoring"):
        refused = limited.post(
            path, content=b"[" * 70_000, headers={**auth("writer"), "Content-Type": "application/json"}
        )
        assert refused.status_code == 413, path
    assert limited.get("/v1/checkpoints/math").status_code == 404  # nothing was registered
    upload = b'{"prompt": "p", "completion": "c"}\n' * 2000  # ~70 KB: a task upload has its own limit
    headers = {**auth("writer"), "Content-Type": "application/x-ndjson"}
    assert limited.post("/v1/tasks", params={"name": "t"}, content=upload, headers=headers).status_code == 201
    too_big = limited.post("/v1/tasks", params={"name": "u"}, content=upload * 4, headers=headers)
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "field",
    [
        {"tags": {f"k{i}": i for i in range(65)}},  # too many tags
        {"tags": {"k" * 101: 1}},  # a long key
        {"tags": {"note": "x" * 1001}},  # a long value
        {"tags": {"nested": {"a": [1, 2]}}},  # not a scalar
        {"tags": {"score": float("inf")}},
        {"tasks": [f"t{i}" for i in range(65)]},
        {"tasks": ["x" * 201]},
        {"family": "f" * 201},
    ],
)
def test_checkpoint_fields_are_bounded(
    limited: TestClient, family: dict[str, Path], field: dict[str, Any]
) -> None:
    body = {"path": str(family["math"]), "name": "math", **field}
    content = json.dumps(body).encode()  # json.dumps writes inf as Infinity, which the parser takes
    response = limited.post(
        "/v1/checkpoints", content=content, headers={**auth("writer"), "Content-Type": "application/json"}
    )
    assert response.status_code == 422 and error_of(response)["code"] == "validation_error", response.text


def test_request_lists_and_names_are_bounded(limited: TestClient) -> None:
    too_many = {"models": [f"m{i}" for i in range(1001)]}
    for path in ("/v1/scoring", "/v1/features"):
        assert limited.post(path, json=too_many, headers=auth("writer")).status_code == 422, path
    long_name = {"models": ["a" * 201, "b"]}
    assert limited.post("/v1/recommendations", json=long_name).status_code == 422
    arm = {"parameters": {f"p{i}": 1 for i in range(33)}}
    assert limited.post("/v1/operators/linear/arms", json=arm, headers=auth("writer")).status_code == 422


# ---- an unexpected error: a 500 in the envelope, the connection kept -------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[int]:
    """The app under uvicorn on a free port (in a thread), with a route that fails unexpectedly."""
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'simmerge.db'}", read_requires_auth=False)
    app = create_app(settings, selector=FakeSelector())

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=60)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_an_unexpected_error_is_a_500_envelope_and_the_connection_survives(served: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served, timeout=30)
    try:
        connection.request("GET", "/boom")
        failed = connection.getresponse()
        body = json.loads(failed.read())
        assert failed.status == 500
        assert body == {"error": {"code": "internal_error", "message": "internal error (RuntimeError)"}}
        connection.request("GET", "/healthz")  # the same keep-alive connection: not reset
        after = connection.getresponse()
        assert after.status == 200 and json.loads(after.read()) == {"status": "ok"}
    finally:
        connection.close()
