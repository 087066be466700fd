"""Jobs with real worker processes: merges end to end and their faults (kill -9, restart, cancel).

Each job runs in a spawned interpreter, so these take seconds, not milliseconds; the fault tests
slow the worker with the `worker_step_delay_s` fault-injection setting so there is a window to hit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from service.db import Job, utcnow
from service.settings import ServiceSettings
from service.store import Store
from simmerge.checkpoint import Checkpoint
from simmerge.engine import run_merge
from simmerge.plan import Plan
from tests.test_service_support import auth, database, make_family, token_settings, wait_for  # noqa: F401

PLAN = {
    "steps": [
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": "math", "parameters": {"weight": 0.5}},
                {"model": "code", "parameters": {"weight": 0.5}},
            ],
        }
    ]
}


# Worker start-up dominates these tests; PostgreSQL runs the merge, retry, restart and recovery paths.
SQLITE_ONLY = {
    "test_worker_that_keeps_dying_fails_after_max_attempts",
    "test_cancel_running_merge_leaves_nothing",
    "test_bad_input_fails_once_without_retry",
    "test_scoring_and_features_jobs",
    "test_features_job_fills_the_signature_cache",
    "test_a_clean_stop_requeues_the_running_merge",
    "test_a_live_servers_job_is_left_alone_until_its_lease_lapses",
    "test_a_deterministic_failure_fails_once_with_its_cause",
    "test_a_transient_failure_is_retried_and_success_clears_its_error",
    "test_a_transient_failure_that_persists_fails_with_its_cause",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("roots") / "zoo")


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, tmp_path: Path, database: str, family: dict[str, Path]):  # noqa: F811
    if request.node.originalname in SQLITE_ONLY and "postgresql" in request.node.name:
        pytest.skip("SQLite covers this case; PostgreSQL runs the merge, retry, restart and recovery paths")

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "database_url": database,
            "catalog_roots": [family["base"].parent],
            "tokens": token_settings(),
            "job_poll_interval_s": 0.05,
            "job_runners": "tests.test_service_fakes:FAKE_RUNNERS",
            **overrides,
        }
        return ServiceSettings(**values)

    return make


def register_family(client: TestClient, family: dict[str, Path]) -> None:
    for name in ("base", "math", "code"):
        body = {"path": str(family[name]), "name": name, **({"base": "base"} if name != "base" else {})}
        assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201


def submit_merge(client: TestClient, name: str = "soup", **headers: str) -> dict[str, Any]:
    response = client.post(
        "/v1/merges", json={"name": name, "plan": PLAN}, headers={**auth("writer"), **headers}
    )
    assert response.status_code == 202, response.text
    return response.json()


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}").json()


def finished(client: TestClient, job_id: str) -> dict[str, Any] | None:
    state = job(client, job_id)
    return state if state["status"] in ("succeeded", "failed", "cancelled") else None


def reference_hash(family: dict[str, Path], out: Path) -> str:
    """The same plan merged directly by the engine, for comparing bytes."""
    paths = {name: family[name] for name in ("base", "math", "code")}
    run_merge(Plan.from_dict(PLAN), out, resolve=lambda m: paths[m], progress=False)
    return Checkpoint.open(out).content_hash()


def leftovers(settings: ServiceSettings, name: str) -> list[str]:
    """Anything in the merge and scratch directories besides the finished output `name`."""
    found = (
        [p.name for p in settings.merges_dir.iterdir() if p.name != name]
        if settings.merges_dir.exists()
        else []
    )
    if settings.scratch_dir.exists():
        found += [f"scratch/{p.name}" for p in settings.scratch_dir.iterdir()]
    return found


def test_merge_job_registers_a_complete_checkpoint(make_settings, family, tmp_path: Path) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "succeeded", done
        assert done["progress"] == 1.0 and done["attempts"] == 1
        entry = client.get("/v1/checkpoints/soup").json()
        assert entry["plan"]["steps"][0]["merge_method"] == "task_arithmetic" and entry["base"] == "base"
        assert entry["tags"]["merge_job"] == submitted["id"] and done["result"]["checkpoint"] == "soup"
        assert Path(entry["path"]) == (settings.merges_dir / "soup").resolve()
        assert (Path(entry["path"]) / "simmerge.json").is_file()
        assert entry["content_hash"] == reference_hash(family, tmp_path / "reference")
        assert leftovers(settings, "soup") == []
        metrics = client.get("/metrics").text
        assert 'simmerge_jobs{status="succeeded"} 1.0' in metrics


def test_killed_worker_is_retried_and_only_a_complete_output_registered(
    make_settings, family, tmp_path
) -> None:
    settings = make_settings(worker_step_delay_s=0.15)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        running = wait_for(lambda: (s := job(client, submitted["id"]))["progress"] > 0.1 and s)
        pid = client.app.state.store.get_job(submitted["id"]).worker_pid
        assert running["status"] == "running" and pid
        os.kill(pid, signal.SIGKILL)
        requeued = wait_for(lambda: (s := job(client, submitted["id"]))["attempts"] == 2 and s)
        assert "signal 9" in (requeued["error"] or "")
        assert client.get("/v1/checkpoints/soup").status_code == 404  # nothing registered from attempt 1
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "succeeded" and done["attempts"] == 2
        names = [c["name"] for c in client.get("/v1/checkpoints").json()["items"]]
        assert names.count("soup") == 1
        assert client.get("/v1/checkpoints/soup").json()["content_hash"] == reference_hash(
            family, tmp_path / "ref"
        )
        assert leftovers(settings, "soup") == []


def test_worker_that_keeps_dying_fails_after_max_attempts(make_settings, family) -> None:
    settings = make_settings(worker_step_delay_s=0.15, max_job_attempts=2)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        store = client.app.state.store
        for attempt in (1, 2):
            row = wait_for(
                lambda a=attempt: (
                    (r := store.get_job(submitted["id"])).attempts == a
                    and r.progress > 0.1
                    and r.worker_pid
                    and r
                )
            )
            os.kill(row.worker_pid, signal.SIGKILL)
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "failed" and "attempt 2" in done["error"]
        assert client.get("/v1/checkpoints/soup").status_code == 404
        assert leftovers(settings, "soup") == []


def test_cancel_running_merge_leaves_nothing(make_settings, family) -> None:
    settings = make_settings(worker_step_delay_s=0.2)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        wait_for(lambda: job(client, submitted["id"])["progress"] > 0.1)
        pid = client.app.state.store.get_job(submitted["id"]).worker_pid
        assert client.post(f"/v1/merges/{submitted['id']}/cancel", headers=auth("writer")).status_code == 200
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "cancelled"
        assert not (settings.merges_dir / "soup").exists()
        assert leftovers(settings, "soup") == []
        assert client.get("/v1/checkpoints/soup").status_code == 404
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_queued_jobs_run_after_a_restart(make_settings, family) -> None:
    with TestClient(create_app(make_settings(start_jobs=False))) as client:
        register_family(client, family)
        queued = submit_merge(client, "first", **{"Idempotency-Key": "once"})
        second = submit_merge(client, "second")
    with TestClient(create_app(make_settings())) as client:
        for submitted in (queued, second):
            done = wait_for(lambda s=submitted: finished(client, s["id"]))
            assert done["status"] == "succeeded", done
        replay = client.post(
            "/v1/merges",
            json={"name": "first", "plan": PLAN},
            headers={**auth("writer"), "Idempotency-Key": "once"},
        )
        assert replay.status_code == 200 and replay.json()["id"] == queued["id"]
        assert client.get("/v1/merges").json()["total"] == 2


def test_a_clean_stop_requeues_the_running_merge(make_settings, family) -> None:
    with TestClient(create_app(make_settings(worker_step_delay_s=0.2))) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        wait_for(lambda: job(client, submitted["id"])["progress"] > 0.1)
    # the lifespan stopped the dispatcher: the attempt was killed, refunded and queued again
    with TestClient(create_app(make_settings(start_jobs=False))) as client:
        state = job(client, submitted["id"])
        assert state["status"] == "queued" and state["attempts"] == 0
        assert leftovers(client.app.state.settings, "soup") == []
    with TestClient(create_app(make_settings())) as client:
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "succeeded" and done["attempts"] == 1


def test_jobs_left_running_by_a_dead_server_are_recovered(make_settings, family) -> None:
    with TestClient(create_app(make_settings(start_jobs=False))) as client:
        register_family(client, family)
        submitted = submit_merge(client)
        store = client.app.state.store
        with store.session() as session:  # what a server killed mid-job leaves behind
            session.execute(
                update(Job)
                .where(Job.id == submitted["id"])
                .values(status="running", attempts=1, worker_pid=999999)
            )
        stale = client.app.state.settings.scratch_dir / submitted["id"]
        stale.mkdir(parents=True)
        (stale / "partial.safetensors").write_bytes(b"half")
    with TestClient(create_app(make_settings())) as client:
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert leftovers(client.app.state.settings, "soup") == []


def test_a_live_servers_job_is_left_alone_until_its_lease_lapses(make_settings, family) -> None:
    settings = make_settings(start_jobs=False)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = submit_merge(client)
    store = Store(settings.db_url)
    with store.session() as session:  # another server claimed it and is renewing its lease
        session.execute(
            update(Job)
            .where(Job.id == submitted["id"])
            .values(status="running", attempts=1, owner="other-server", heartbeat_at=utcnow())
        )
    store.dispose()
    with TestClient(create_app(make_settings(job_lease_s=6.0))) as client:
        assert job(client, submitted["id"])["status"] == "running"  # not taken over at start
        done = wait_for(lambda: finished(client, submitted["id"]))  # ...but once the lease lapses
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert client.app.state.store.get_job(submitted["id"]).owner == client.app.state.jobs.owner


def test_bad_input_fails_once_without_retry(make_settings, family) -> None:
    link = family["base"].parent / "vanishing"
    with TestClient(create_app(make_settings(start_jobs=False))) as client:
        register_family(client, family)
        shutil.copytree(family["math"], link)
        body = {"path": str(link), "name": "vanishing"}
        assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        plan = {"steps": [{"merge_method": "linear", "models": [{"model": "math"}, {"model": "vanishing"}]}]}
        plan["steps"][0]["parameters"] = {"weight": 1.0}
        response = client.post("/v1/merges", json={"name": "x", "plan": plan}, headers=auth("writer"))
        assert response.status_code == 202, response.text
        submitted = response.json()
    shutil.rmtree(
        link
    )  # the weights vanish between submission and run: the worker's CheckpointError is final
    with TestClient(create_app(make_settings())) as client:
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "failed" and done["attempts"] == 1 and "vanishing" in done["error"]
        assert leftovers(client.app.state.settings, "x") == []


def test_scoring_and_features_jobs(make_settings, family) -> None:
    with TestClient(create_app(make_settings())) as client:
        register_family(client, family)
        features = client.post(
            "/v1/features", json={"models": ["math", "code"]}, headers=auth("writer")
        ).json()
        assert wait_for(lambda: finished(client, features["id"]))["status"] == "succeeded"
        assert client.app.state.store.signed_checkpoints() == {"math", "code"}
        scoring = client.post("/v1/scoring", json={}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, scoring["id"]))
        assert done["status"] == "succeeded" and done["result"]["rows"] == 6 and done["result"]["heatmap"]
        first = client.get(f"/v1/scoring/{scoring['id']}/results", params={"limit": 4}).json()
        rest = client.get(f"/v1/scoring/{scoring['id']}/results", params={"offset": 4, "limit": 4}).json()
        assert first["total"] == rest["total"] == 6 and len(first["items"]) == 4 and len(rest["items"]) == 2
        scores = [r["predicted_score"] for r in first["items"] + rest["items"]]
        assert scores == sorted(scores, reverse=True)
        png = client.get(f"/v1/scoring/{scoring['id']}/heatmap.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")


def test_features_job_fills_the_signature_cache(make_settings, ci_zoo: Path) -> None:
    """The real features package (default runners) on the ci zoo: one base and two of its experts."""
    manifest = json.loads((ci_zoo / "catalog.json").read_text())
    base = next(c for c in manifest["checkpoints"] if not c.get("base"))
    experts = [c for c in manifest["checkpoints"] if c.get("base") == base["name"]][:2]
    settings = make_settings(catalog_roots=[ci_zoo], job_runners="service.adapters:MODELS_RUNNERS")
    with TestClient(create_app(settings)) as client:
        for item in [base, *experts]:
            body = {"path": str(ci_zoo / item["path"]), "name": item["name"], "base": item.get("base")}
            assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        names = [e["name"] for e in experts]
        submitted = client.post("/v1/features", json={"models": names}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, submitted["id"]), timeout=300)
        assert done["status"] == "succeeded", done
        assert done["result"]["checkpoints"] == 3  # the experts and their base
        assert client.app.state.store.signed_checkpoints() == {base["name"], *names}
        assert any(Path(done["result"]["directory"]).iterdir())
        # the recommendation path now reads those cached signatures (shipped predictor, no table)
        from models.api import DEFAULT_PREDICTOR

        if not (DEFAULT_PREDICTOR / "meta.json").exists():
            return
        response = client.post("/v1/recommendations", json={"models": names, "top": 2})
        assert response.status_code == 200, response.text
        plans = response.json()["plans"]
        assert len(plans) == 2 and all(set(p["models"]) <= set(names) for p in plans)


def test_a_merge_never_replaces_a_checkpoint_registered_under_its_output(make_settings, family) -> None:
    """merges/ is a registration root. Submission refuses a name whose directory exists; one registered
    there after the job was queued is not an abandoned output to clear either: the merge fails at once,
    naming it, and the checkpoint stays whole."""
    queued_only = make_settings(start_jobs=False)
    victim = queued_only.merges_dir / "soup"
    with TestClient(create_app(queued_only)) as client:
        register_family(client, family)
        submitted = submit_merge(client, "soup")
        shutil.copytree(family["code"], victim)
        body = {"path": str(victim), "name": "kept", "base": "base"}
        assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
    before = Checkpoint.open(victim).content_hash()
    with TestClient(create_app(make_settings())) as client:
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "failed" and done["attempts"] == 1
        assert "a registered checkpoint" in done["error"] and str(victim.resolve()) in done["error"]
    assert Checkpoint.open(victim).content_hash() == before


def test_a_file_swapped_for_a_symlink_after_registration_is_refused_by_the_merge(
    make_settings, family, tmp_path: Path
) -> None:
    """Roots are checked whenever a job reads a checkpoint, not only when it was registered."""
    settings = make_settings()
    swapped = family["base"].parent / f"swapped-{tmp_path.name}"
    shutil.copytree(family["math"], swapped)
    outside = tmp_path / "outside"
    shutil.copytree(family["code"], outside)
    try:
        with TestClient(create_app(settings)) as client:
            register_family(client, family)
            body = {"path": str(swapped), "name": "swapped", "base": "base"}
            assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
            (swapped / "model.safetensors").unlink()
            (swapped / "model.safetensors").symlink_to(outside / "model.safetensors")
            models = [{"model": m, "parameters": {"weight": 1.0}} for m in ("math", "swapped")]
            plan = {"steps": [{"merge_method": "linear", "models": models}]}
            submitted = client.post(
                "/v1/merges", json={"name": "mixed", "plan": plan}, headers=auth("writer")
            )
            assert submitted.status_code == 202, submitted.text
            done = wait_for(lambda: finished(client, submitted.json()["id"]))
            assert done["status"] == "failed" and done["attempts"] == 1
            assert "outside the catalog roots" in done["error"] and "model.safetensors" in done["error"]
            assert not (settings.merges_dir / "mixed").exists()
    finally:
        shutil.rmtree(swapped)


def test_a_deterministic_failure_fails_once_with_its_cause(make_settings, family) -> None:
    """Not a SimMergeError, but not transient either: one attempt, and the row says why."""
    settings = make_settings(job_runners="tests.test_service_fakes:BROKEN_RUNNERS", max_job_attempts=3)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = client.post("/v1/features", json={"models": ["math"]}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "failed" and done["attempts"] == 1
        assert done["error"] == "ValueError: the probe table has no rows"


def test_a_transient_failure_is_retried_and_success_clears_its_error(make_settings, family) -> None:
    settings = make_settings(job_runners="tests.test_service_fakes:FLAKY_RUNNERS", max_job_attempts=3)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = client.post("/v1/features", json={"models": ["math"]}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "succeeded" and done["attempts"] == 2 and done["error"] is None
        assert (settings.home_dir / "flaky-attempted").exists()  # the first attempt did fail


def test_a_transient_failure_that_persists_fails_with_its_cause(make_settings, family) -> None:
    settings = make_settings(job_runners="tests.test_service_fakes:FLAKY_RUNNERS", max_job_attempts=1)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        submitted = client.post("/v1/features", json={"models": ["math"]}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, submitted["id"]))
        assert done["status"] == "failed" and done["attempts"] == 1
        assert done["error"].startswith("BlockingIOError: [Errno 11] resource temporarily unavailable")
