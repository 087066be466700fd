"""The Ray job backend on a local Ray (one CPU, one declared GPU): a merge runs and registers, and a
cancelled merge leaves nothing. Skipped where Ray is not installed (the `ray` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.test_service_jobs import PLAN, finished, leftovers, register_family
from tests.test_service_support import auth, make_family, token_settings, wait_for

ray = pytest.importorskip("ray")


def test_a_local_ray_started_by_the_backend_holds_no_secret(tmp_path: Path, monkeypatch) -> None:
    """Before `local_ray`: here the backend starts Ray itself, and a task reads its worker's environment."""
    import os

    from service.jobs.ray_backend import RayBackend

    secret = "smt_ray-must-not-see-this"
    monkeypatch.setenv("SIMMERGE_TOKENS", f'{{"ops": {{"token": "{secret}"}}}}')
    monkeypatch.setenv("SOME_API_KEY", secret)
    backend = RayBackend(ServiceSettings(home=tmp_path, job_backend="ray", ray_num_gpus=0))
    try:
        environ = ray.get(ray.remote(num_cpus=0)(lambda: dict(os.environ)).remote(), timeout=120)
    finally:
        backend.shutdown()
    assert "PATH" in environ and secret not in str(environ) and "SIMMERGE_TOKENS" not in environ
    assert os.environ["SIMMERGE_TOKENS"]  # the server's own environment is given back


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("roots") / "zoo")


def ray_settings(tmp_path: Path, family: dict[str, Path], **overrides: object) -> ServiceSettings:
    return ServiceSettings(
        home=tmp_path / "home",
        catalog_roots=[family["base"].parent],
        tokens=token_settings(),
        job_backend="ray",
        ray_num_gpus=1,
        ray_num_cpus=1,
        job_poll_interval_s=0.05,
        **overrides,
    )


def test_ray_backend_runs_a_merge_on_a_gpu_slot(local_ray, tmp_path: Path, family) -> None:
    settings = ray_settings(tmp_path, family)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.jobs.backend.name == "ray"
        register_family(client, family)
        job = client.post("/v1/merges", json={"name": "soup", "plan": PLAN}, headers=auth("writer")).json()
        done = wait_for(lambda: finished(client, job["id"]), timeout=180)
        assert done["status"] == "succeeded", done
        assert client.get("/v1/checkpoints/soup").json()["tags"]["merge_job"] == job["id"]
        assert leftovers(settings, "soup") == []


def test_ray_backend_cancel_leaves_nothing(local_ray, tmp_path: Path, family) -> None:
    settings = ray_settings(tmp_path, family, worker_step_delay_s=0.3)
    with TestClient(create_app(settings)) as client:
        register_family(client, family)
        job = client.post("/v1/merges", json={"name": "soup", "plan": PLAN}, headers=auth("writer")).json()
        wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"] > 0.05, timeout=180)
        client.post(f"/v1/merges/{job['id']}/cancel", headers=auth("writer"))
        done = wait_for(lambda: finished(client, job["id"]), timeout=60)
        assert done["status"] == "cancelled"
        assert not (settings.merges_dir / "soup").exists() and leftovers(settings, "soup") == []
