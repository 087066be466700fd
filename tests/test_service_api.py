"""Every REST endpoint and its errors, against SQLite and (when configured) PostgreSQL.

The job dispatcher is off here (jobs stay queued); test_service_jobs.py runs real workers.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from service.adapters import RecommendationQuery
from service.app import create_app
from service.settings import ServiceSettings
from tests.test_service_support import auth, database, make_family, token_settings  # noqa: F401


class FakeSelector:
    """One plan per operator family (the base ones and the store's arms), scored by a prior plus the
    mean feedback that family received in the store, as the real selector reads both from the store."""

    def __init__(self) -> None:
        self.store: Any = None  # the app's store, set once the app is built

    @property
    def families(self) -> list[str]:
        arms = [family for family, _ in self.store.arm_settings()] if self.store is not None else []
        return list(dict.fromkeys(["linear", "task_arithmetic", *arms]))

    @property
    def rewards(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = defaultdict(list)
        for record in self.store.feedback_since(0) if self.store is not None else []:
            found[record.plan["steps"][-1]["merge_method"]].append(record.score)
        return found

    def recommend(
        self, models: list[str], *, top: int, task: str | None, base: str | None = None
    ) -> list[dict[str, Any]]:
        scored = []
        rewards = self.rewards
        for family in self.families:
            score = 0.5 + (sum(rewards[family]) / len(rewards[family]) if rewards[family] else 0.0)
            step = {"merge_method": family, "models": [{"model": m} for m in models]}
            scored.append((score, family, step))
        scored.sort(key=lambda item: -item[0])
        return [
            {
                "rank": rank,
                "models": list(models),
                "steps": [step],
                "predicted_score": score,
                "uncertainty": 0.1,
                "mergekit_yaml": f"merge_method: {family}\n",
                "drivers": [],
            }
            for rank, (score, family, step) in enumerate(scored[:top], start=1)
        ]

    def recommend_many(self, queries: list[RecommendationQuery]) -> list[dict[str, Any]]:
        return [
            {
                "plans": self.recommend(list(q.models), top=q.top, task=q.task, base=q.base),
                "ranked_by": "regressor",
            }
            for q in queries
        ]

    def check_feedback(self, plan: dict[str, Any], score: float) -> None:
        """The fake learns anything."""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("roots") / "zoo")


@pytest.fixture
def app_parts(tmp_path: Path, database: str, family: dict[str, Path]):  # noqa: F811
    settings = ServiceSettings(
        home=tmp_path / "home",
        database_url=database,
        catalog_roots=[family["base"].parent],
        tokens=token_settings(),
        start_jobs=False,
        max_upload_bytes=4096,
    )
    selector = FakeSelector()
    app = create_app(settings, selector=selector)
    selector.store = app.state.store
    with TestClient(app) as client:
        yield client, settings, selector


@pytest.fixture
def client(app_parts) -> TestClient:
    return app_parts[0]


def register(client: TestClient, path: Path, name: str | None = None, **extra: Any) -> Any:
    body = {"path": str(path), **({"name": name} if name else {}), **extra}
    return client.post("/v1/checkpoints", json=body, headers=auth("writer"))


def error_of(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# ---- health, metrics, docs ------------------------------------------------------------------------
def test_health_ready_metrics_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    assert all(
        path.startswith("/v1/") for path in spec["paths"] if path not in ("/healthz", "/readyz", "/metrics")
    )
    assert "/v1/merges" in spec["paths"] and "/v1/recommendations" in spec["paths"]
    assert client.get("/docs").status_code == 200
    client.get("/v1/checkpoints/nope")
    metrics = client.get("/metrics").text
    assert 'route="/v1/checkpoints/{name}",status="404"' in metrics
    assert 'simmerge_jobs{status="running"} 0.0' in metrics


def test_migrations_keep_separate_histories(app_parts) -> None:
    client, _settings, _ = app_parts
    engine = client.app.state.store.engine
    tables = set(inspect(engine).get_table_names())
    assert {"simmerge_service_version", "simmerge_catalog_version", "jobs", "checkpoints", "tasks"} <= tables
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT version_num FROM simmerge_service_version")).scalar()
            == "0003_token_source"
        )


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing-here"))["code"] == "not_found"
    response = client.put("/v1/checkpoints", json={})
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


# ---- auth -----------------------------------------------------------------------------------------
def test_mutations_need_a_token_with_the_right_scope(client: TestClient, family: dict[str, Path]) -> None:
    body = {"path": str(family["base"])}
    missing = client.post("/v1/checkpoints", json=body)
    assert missing.status_code == 401 and error_of(missing)["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/checkpoints", json=body, headers={"Authorization": "Bearer not-a-token"})
    assert wrong.status_code == 401
    reader = client.post("/v1/checkpoints", json=body, headers=auth("reader"))
    assert reader.status_code == 403 and "write" in error_of(reader)["message"]
    assert register(client, family["base"]).status_code == 201
    # admin implies write; write does not imply admin
    assert client.delete("/v1/checkpoints/base", headers=auth("writer")).status_code == 403
    assert client.delete("/v1/checkpoints/base", headers=auth("admin")).status_code == 204
    assert client.get("/v1/checkpoints/base").status_code == 404


def test_tokens_are_stored_only_as_sha256(client: TestClient) -> None:
    assert (
        client.post(
            "/v1/tokens", json={"name": "ci", "scopes": ["write"]}, headers=auth("writer")
        ).status_code
        == 403
    )
    created = client.post("/v1/tokens", json={"name": "ci", "scopes": ["write"]}, headers=auth("admin"))
    assert created.status_code == 201
    token = created.json()["token"]
    with client.app.state.store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM api_tokens"))]
    dumped = json.dumps(rows, default=str)
    assert token not in dumped and TOKENS_CLEAR_ABSENT(dumped)
    assert hashlib.sha256(token.encode()).hexdigest() in dumped
    headers = {"Authorization": f"Bearer {token}"}
    assert (
        client.post("/v1/tokens", json={"name": "x", "scopes": ["read"]}, headers=headers).status_code == 403
    )
    duplicate = client.post("/v1/tokens", json={"name": "ci", "scopes": ["read"]}, headers=auth("admin"))
    assert duplicate.status_code == 409
    bad_scope = client.post("/v1/tokens", json={"name": "y", "scopes": ["root"]}, headers=auth("admin"))
    assert bad_scope.status_code == 422 and error_of(bad_scope)["code"] == "validation_error"


def TOKENS_CLEAR_ABSENT(dumped: str) -> bool:
    from tests.test_service_support import TOKENS

    return all(clear not in dumped for clear in TOKENS.values())


def test_reads_can_require_a_token(tmp_path: Path, database: str) -> None:  # noqa: F811
    settings = ServiceSettings(
        home=tmp_path,
        database_url=database,
        tokens=token_settings(),
        start_jobs=False,
        read_requires_auth=True,
    )
    with TestClient(create_app(settings, selector=FakeSelector())) as client:
        assert client.get("/v1/checkpoints").status_code == 401
        assert client.get("/v1/checkpoints", headers=auth("reader")).status_code == 200


# ---- checkpoints ----------------------------------------------------------------------------------
def test_register_get_list_and_conflicts(client: TestClient, family: dict[str, Path]) -> None:
    created = register(client, family["base"])
    assert created.status_code == 201
    assert created.json()["name"] == "base" and len(created.json()["content_hash"]) == 64
    expert = register(client, family["math"], "math-expert", base="base", tasks=["math"])
    assert expert.status_code == 201 and expert.json()["base"] == "base"
    duplicate = register(client, family["code"], "math-expert")
    assert duplicate.status_code == 409 and error_of(duplicate)["code"] == "conflict"
    assert "math-expert" in error_of(duplicate)["message"]
    got = client.get("/v1/checkpoints/math-expert").json()
    assert got["tasks"] == ["math"] and Path(got["path"]) == family["math"].resolve()
    page = client.get("/v1/checkpoints", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 2 and [c["name"] for c in page["items"]] == ["math-expert"]
    missing = client.get("/v1/checkpoints/absent")
    assert missing.status_code == 404 and "absent" in error_of(missing)["message"]


def test_register_only_under_the_catalog_roots(
    client: TestClient, family: dict[str, Path], tmp_path: Path
) -> None:
    outside = register(client, tmp_path)
    assert outside.status_code == 400 and str(tmp_path) in error_of(outside)["message"]
    sneaky = family["base"].parent / "escape"
    sneaky.symlink_to(tmp_path, target_is_directory=True)
    try:
        assert register(client, sneaky).status_code == 400
        assert register(client, Path(str(family["base"].parent) + "/../" + tmp_path.name)).status_code == 400
    finally:
        sneaky.unlink()
    relative = client.post("/v1/checkpoints", json={"path": "zoo/base"}, headers=auth("writer"))
    assert relative.status_code == 400
    not_a_checkpoint = register(client, family["base"].parent)
    assert not_a_checkpoint.status_code == 400 and error_of(not_a_checkpoint)["code"] == "checkpoint_error"
    unknown_base = register(client, family["math"], base="nobody")
    assert unknown_base.status_code == 404


def test_bad_bodies_are_422_in_the_envelope(client: TestClient) -> None:
    for body in ({}, {"path": 3}, {"path": "/x", "name": "bad name!"}, {"path": "/x", "extra": 1}):
        response = client.post("/v1/checkpoints", json=body, headers=auth("writer"))
        assert response.status_code == 422, body
        assert error_of(response)["code"] == "validation_error"
    not_json = client.post(
        "/v1/checkpoints", content=b"{", headers={**auth("writer"), "Content-Type": "application/json"}
    )
    assert not_json.status_code == 422
    assert client.get("/v1/checkpoints", params={"limit": 0}).status_code == 422


# ---- tasks ----------------------------------------------------------------------------------------
def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


TASK_ROWS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]


def upload(client: TestClient, name: str, body: bytes, role: str = "writer", **params: Any) -> Any:
    headers = {**auth(role), "Content-Type": "application/x-ndjson"}
    return client.post("/v1/tasks", params={"name": name, **params}, content=body, headers=headers)


def test_task_upload_list_get(app_parts) -> None:
    client, settings, _ = app_parts
    created = upload(client, "arith", jsonl(TASK_ROWS), metric="exact_match")
    assert created.status_code == 201
    assert created.json() == {"name": "arith", "metric": "exact_match", "held_out": False, "examples": 2}
    stored = settings.tasks_dir / "arith.jsonl"
    assert [json.loads(line) for line in stored.read_text().splitlines()] == TASK_ROWS
    assert [t["name"] for t in client.get("/v1/tasks").json()] == ["arith"]
    assert client.get("/v1/tasks/arith").json()["examples"] == 2
    assert client.get("/v1/tasks/nope").status_code == 404
    assert upload(client, "arith", jsonl(TASK_ROWS)).status_code == 409


def test_task_upload_errors(app_parts) -> None:
    client, settings, _ = app_parts
    too_big = upload(client, "big", jsonl(TASK_ROWS * 200))
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "payload_too_large"
    bad_line = upload(client, "bad", jsonl(TASK_ROWS) + b'{"prompt": 1}\n')
    assert bad_line.status_code == 400 and "line 3" in error_of(bad_line)["message"]
    assert upload(client, "empty", b"\n").status_code == 400
    assert upload(client, "m", jsonl(TASK_ROWS), metric="bleu").status_code == 400
    assert upload(client, "ro", jsonl(TASK_ROWS), role="reader").status_code == 403
    assert client.post("/v1/tasks", content=jsonl(TASK_ROWS), headers=auth("writer")).status_code == 422
    assert client.get("/v1/tasks").json() == []
    assert not any(settings.tasks_dir.iterdir())  # nothing partial left behind


# ---- operators ------------------------------------------------------------------------------------
def test_operators_and_arms(client: TestClient, app_parts) -> None:
    pytest.importorskip("simmerge.operators")
    selector = app_parts[2]
    families = {op["name"]: op for op in client.get("/v1/operators").json()}
    assert {"linear", "ties", "slerp", "task_arithmetic"} <= set(families)
    from simmerge.operators import get_operator

    slerp = get_operator("slerp")
    assert families["slerp"]["needs_base"] and families["slerp"]["max_models"] == slerp.max_models
    added = client.post(
        "/v1/operators/ties/arms", json={"parameters": {"density": 0.3}}, headers=auth("writer")
    )
    assert added.status_code == 201
    arm = added.json()
    assert arm["family"] == "ties" and arm["parameters"]["density"] == 0.3 and "ties(" in arm["name"]
    assert "ties" in selector.families
    again = client.post(
        "/v1/operators/ties/arms", json={"parameters": {"density": 0.3}}, headers=auth("writer")
    )
    assert again.status_code == 409
    assert [a["name"] for a in client.get("/v1/operators/ties/arms").json()] == [arm["name"]]
    assert client.get("/v1/operators/ties").json()["arms"] == [arm]
    bad = client.post("/v1/operators/ties/arms", json={"parameters": {"density": 7}}, headers=auth("writer"))
    assert bad.status_code == 400 and "density" in error_of(bad)["message"]
    unknown = client.post("/v1/operators/nope/arms", json={"parameters": {}}, headers=auth("writer"))
    assert unknown.status_code == 404 and "nope" in error_of(unknown)["message"]
    assert client.get("/v1/operators/nope").status_code == 404


# ---- merges (queued only: no dispatcher here) -----------------------------------------------------
def linear_plan(models: list[str]) -> dict[str, Any]:
    return {
        "steps": [
            {
                "merge_method": "linear",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
            }
        ]
    }


def test_merge_submission_idempotency_and_cancel(client: TestClient, family: dict[str, Path]) -> None:
    register(client, family["base"])
    register(client, family["math"], "math")
    body = {"name": "soup", "plan": linear_plan(["base", "math"])}
    first = client.post("/v1/merges", json=body, headers={**auth("writer"), "Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert (
        job["status"] == "queued" and job["kind"] == "merge" and first.headers["location"].endswith(job["id"])
    )
    replay = client.post("/v1/merges", json=body, headers={**auth("writer"), "Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == job["id"]
    other = {"name": "soup2", "plan": linear_plan(["base", "math"])}
    clash = client.post("/v1/merges", json=other, headers={**auth("writer"), "Idempotency-Key": "k1"})
    assert clash.status_code == 409 and "k1" in error_of(clash)["message"]
    no_key = client.post("/v1/merges", json=other, headers=auth("writer"))
    assert no_key.status_code == 202 and no_key.json()["id"] != job["id"]
    assert client.get(f"/v1/merges/{job['id']}").json()["request"]["name"] == "soup"
    assert client.get("/v1/merges").json()["total"] == 2
    assert client.get("/v1/jobs", params={"kind": "merge", "status": "queued"}).json()["total"] == 2
    cancelled = client.post(f"/v1/merges/{job['id']}/cancel", headers=auth("writer"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/merges/{job['id']}/cancel", headers=auth("writer")).status_code == 409
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("reader")).status_code == 403


def test_merge_submission_errors(client: TestClient, family: dict[str, Path]) -> None:
    register(client, family["base"])
    post = lambda body: client.post("/v1/merges", json=body, headers=auth("writer"))  # noqa: E731
    unknown = post({"name": "x", "plan": linear_plan(["base", "ghost"])})
    assert unknown.status_code == 404 and "ghost" in error_of(unknown)["message"]
    taken = post({"name": "base", "plan": linear_plan(["base", "base"])})
    assert taken.status_code == 409
    assert post({"name": "x"}).status_code == 400  # neither plan nor YAML
    assert post({"name": "x", "plan": {"steps": []}}).status_code == 400
    assert post({"name": "x", "plan": {"nonsense": 1}}).status_code == 400
    register(client, family["math"], "math")
    no_weight = post(
        {
            "name": "x",
            "plan": {"steps": [{"merge_method": "linear", "models": [{"model": "base"}, {"model": "math"}]}]},
        }
    )
    assert no_weight.status_code == 400 and "weight" in error_of(no_weight)["message"]
    bad_method = post(
        {"name": "x", "plan": {"steps": [{"merge_method": "nope", "models": [{"model": "base"}]}]}}
    )
    assert bad_method.status_code == 400 and "nope" in error_of(bad_method)["message"]
    assert post({"name": "x", "plan": linear_plan(["base"]), "seed": -1}).status_code == 422
    assert post({"name": "bad name", "plan": linear_plan(["base"])}).status_code == 422
    yaml_plan = "merge_method: linear\nmodels:\n  - model: base\n  - model: ghost\n"
    assert post({"name": "y", "mergekit_yaml": yaml_plan}).status_code == 404
    assert client.post("/v1/merges", json={"name": "x", "plan": linear_plan(["base"])}).status_code == 401
    assert client.get("/v1/merges/0000").status_code == 404
    assert client.get("/v1/jobs/0000").status_code == 404


# ---- recommendations and feedback -----------------------------------------------------------------
def test_recommendations_and_feedback_reach_the_selector(app_parts, family: dict[str, Path]) -> None:
    client, _, selector = app_parts
    register(client, family["base"])
    register(client, family["math"], "math")
    upload(client, "arith", jsonl(TASK_ROWS))
    ask = {"models": ["base", "math"], "top": 2}
    first = client.post("/v1/recommendations", json=ask)
    assert first.status_code == 200
    assert [p["steps"][0]["merge_method"] for p in first.json()["plans"]] == ["linear", "task_arithmetic"]
    merge = client.post(
        "/v1/merges",
        json={
            "name": "ta",
            "plan": {
                "steps": [
                    {
                        "merge_method": "task_arithmetic",
                        "base_model": "base",
                        "models": [{"model": "math", "parameters": {"weight": 1.0}}],
                    }
                ]
            },
        },
        headers=auth("writer"),
    ).json()
    sent = client.post(
        "/v1/feedback", json={"merge_id": merge["id"], "task": "arith", "score": 0.9}, headers=auth("writer")
    )
    assert sent.status_code == 201 and sent.json()["checkpoint"] == "ta"
    assert selector.rewards["task_arithmetic"] == [0.9]
    with client.app.state.store.engine.connect() as conn:  # written once: the feedback row is the record
        assert conn.execute(text("SELECT count(*) FROM feedback")).scalar() == 1
    second = client.post("/v1/recommendations", json=ask).json()
    assert second["plans"][0]["steps"][0]["merge_method"] == "task_arithmetic"


def test_recommendation_and_feedback_errors(client: TestClient, family: dict[str, Path]) -> None:
    register(client, family["base"])
    assert client.post("/v1/recommendations", json={"models": ["base", "ghost"]}).status_code == 404
    assert client.post("/v1/recommendations", json={"models": ["base"]}).status_code == 422
    assert client.post("/v1/recommendations", json={"models": ["base", "base"]}).status_code == 400
    assert client.post("/v1/recommendations", json={"models": ["base", "x"], "top": 0}).status_code == 422
    send = lambda body, role="writer": client.post("/v1/feedback", json=body, headers=auth(role))  # noqa: E731
    assert send({"merge_id": "nope", "task": "t", "score": 1.0}).status_code == 404
    assert send({"checkpoint": "base", "task": "t", "score": 1.0}).status_code == 400  # not a merge
    assert send({"task": "t", "score": 1.0}).status_code == 400
    assert send({"checkpoint": "base", "task": "t", "score": "high"}).status_code == 422
    assert send({"checkpoint": "base", "task": "t", "score": 1.0}, role="reader").status_code == 403


# ---- scoring and features (queued) ----------------------------------------------------------------
def test_scoring_and_features_jobs_are_queued(client: TestClient, family: dict[str, Path]) -> None:
    register(client, family["base"])
    scoring = client.post("/v1/scoring", json={}, headers={**auth("writer"), "Idempotency-Key": "s"})
    assert scoring.status_code == 202 and scoring.json()["kind"] == "scoring"
    job_id = scoring.json()["id"]
    assert client.get(f"/v1/scoring/{job_id}").json()["status"] == "queued"
    early = client.get(f"/v1/scoring/{job_id}/results")
    assert early.status_code == 409 and "queued" in error_of(early)["message"]
    assert client.get(f"/v1/scoring/{job_id}/heatmap.png").status_code == 409
    assert client.get("/v1/scoring/nope/results").status_code == 404
    assert client.post("/v1/scoring", json={"models": ["ghost"]}, headers=auth("writer")).status_code == 404
    features = client.post("/v1/features", json={"models": ["base"]}, headers=auth("writer"))
    assert features.status_code == 202
    assert client.get(f"/v1/features/{features.json()['id']}").json()["kind"] == "features"
    assert client.get(f"/v1/features/{job_id}").status_code == 404  # a scoring job is not a features job
    assert client.post("/v1/features", json={"probes": "none"}, headers=auth("writer")).status_code == 404
    assert client.post("/v1/features", json={}, headers=auth("reader")).status_code == 403


# ---- settings and the command ---------------------------------------------------------------------
def test_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hashlib.sha256(b"from-env").hexdigest()
    monkeypatch.setenv("SIMMERGE_HOME", str(tmp_path))
    monkeypatch.setenv("SIMMERGE_CATALOG_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.setenv("SIMMERGE_TOKENS", json.dumps({"ops": {"sha256": digest, "scopes": ["admin"]}}))
    monkeypatch.setenv("SIMMERGE_MAX_UPLOAD_BYTES", "123")
    monkeypatch.setenv("SIMMERGE_START_JOBS", "false")
    settings = ServiceSettings()
    assert settings.catalog_roots == [tmp_path / "a", tmp_path / "b"] and settings.max_upload_bytes == 123
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'simmerge.db'}"
    with TestClient(create_app(settings, selector=FakeSelector())) as client:
        created = client.post(
            "/v1/tokens", json={"name": "t", "scopes": ["read"]}, headers={"Authorization": "Bearer from-env"}
        )
        assert created.status_code == 201


def test_bad_token_configuration_stops_start_up(tmp_path: Path) -> None:
    from service.settings import SettingsInvalidError, load_settings

    with pytest.raises(SettingsInvalidError, match=r"SIMMERGE_TOKENS.*scopes must be among") as caught:
        load_settings(home=tmp_path, tokens={"x": {"token": "clear-t0ken", "scopes": ["root"]}})
    assert "clear-t0ken" not in str(caught.value)


def test_serve_command_is_registered() -> None:
    from click.testing import CliRunner

    from simmerge.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "--host" in result.output
