"""Recommendations, feedback and catalog scoring through the real learned selector (`models.api`).

The predictor is trained here on a synthetic catalog's labels and pair-feature table (what
`simmerge train --pair-features` does), and the catalog's checkpoints carry the synthetic names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.app import create_app
from service.settings import ServiceSettings
from tests.factories import write_tiny_llama
from tests.test_service_support import (
    DATABASES,
    auth,
    fresh_database_url,
    make_family,
    token_settings,
    wait_for,
)

pytest.importorskip("models.api")


def build_synthetic_home(root: Path, n_tasks: int = 3, per_task: int = 3) -> dict[str, Any]:
    """A trained predictor, a pair-feature table and one tiny checkpoint per synthetic expert."""
    from models.api import train_selectors
    from models.sources import TablePairSource
    from models.synthetic import make_catalog, make_labels

    synthetic = make_catalog(n_tasks=n_tasks, per_task=per_task, seed=0)
    labels = root / "labels.parquet"
    make_labels(synthetic, seed=0).to_parquet(labels)
    pairs = list(combinations(synthetic.names, 2))
    table = pd.DataFrame(synthetic.pair_features(pairs), columns=synthetic.feature_names)
    table.insert(0, "model_b", [b for _, b in pairs])
    table.insert(0, "model_a", [a for a, _ in pairs])
    features = root / "pairs.parquet"
    table.to_parquet(features)
    home = root / "home"
    train_selectors(labels, TablePairSource.read(features), home / "predictor", validate=False)
    checkpoints = root / "ckpts"
    template = write_tiny_llama(checkpoints / "base", seed=0, hidden=16, layers=1, vocab=32)
    for name in synthetic.names:
        shutil.copytree(template, checkpoints / name)
    return {"home": home, "features": features, "checkpoints": checkpoints, "names": synthetic.names}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_synthetic_home(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def client(synthetic: dict[str, Any], tmp_path: Path):
    home = tmp_path / "home"
    shutil.copytree(synthetic["home"], home)
    settings = ServiceSettings(
        home=home,
        catalog_roots=[synthetic["checkpoints"]],
        tokens=token_settings(),
        pair_features=synthetic["features"],
        job_poll_interval_s=0.05,
    )
    with TestClient(create_app(settings)) as client:
        root = synthetic["checkpoints"]
        base = {"path": str(root / "base"), "name": "base"}
        assert client.post("/v1/checkpoints", json=base, headers=auth("writer")).status_code == 201
        for name in synthetic["names"]:
            body = {"path": str(root / name), "name": name, "base": "base"}
            assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        task = b'{"prompt": "a", "completion": "b"}\n'
        headers = {**auth("writer"), "Content-Type": "application/x-ndjson"}
        assert (
            client.post("/v1/tasks", params={"name": "task0"}, content=task, headers=headers).status_code
            == 201
        )
        yield client


def test_recommendation_is_ranked_and_runnable(client: TestClient, synthetic: dict[str, Any]) -> None:
    models = synthetic["names"][:3]
    response = client.post("/v1/recommendations", json={"models": models, "top": 4})
    assert response.status_code == 200, response.text
    plans = response.json()["plans"]
    # The route serialises the plans itself: the body is exactly what the response model would give.
    from service.api.schemas import RecommendationOut

    assert response.json() == RecommendationOut.model_validate_json(response.content).model_dump(mode="json")
    assert [p["rank"] for p in plans] == [1, 2, 3, 4]
    scores = [p["predicted_score"] for p in plans]
    assert scores == sorted(scores, reverse=True)
    for plan in plans:
        assert set(plan["models"]) <= set(models) and plan["mergekit_yaml"].strip()
        assert plan["drivers"] and {"feature", "contribution"} <= set(plan["drivers"][0])
    # a recommended plan is accepted by the merge endpoint as it is
    merge = {"name": "top-merge", "plan": plans[0]["plan"], "predicted_score": plans[0]["predicted_score"]}
    submitted = client.post("/v1/merges", json=merge, headers=auth("writer"))
    assert submitted.status_code == 202, submitted.text


def test_feedback_moves_the_next_recommendation(client: TestClient, synthetic: dict[str, Any]) -> None:
    """Feedback that makes plan #1 worse than plan #2 puts #2 first (exploit, the default), and the
    response says the bandit ranked it, beside the regressor's own prediction."""
    models = synthetic["names"][:2]
    ask = {"models": models, "top": 100, "task": "task0"}
    first = client.post("/v1/recommendations", json=ask).json()
    assert first["ranked_by"] == "regressor"
    one, two = first["plans"][0], first["plans"][1]
    assert one.get("bandit_score") is None
    job = client.post(
        "/v1/merges", json={"name": "fed-back", "plan": one["plan"]}, headers=auth("writer")
    ).json()
    low = one["predicted_score"] - 0.5
    for _ in range(3):
        sent = client.post(
            "/v1/feedback",
            json={"merge_id": job["id"], "task": "task0", "score": low},
            headers=auth("writer"),
        )
        assert sent.status_code == 201, sent.text
    after = client.post("/v1/recommendations", json=ask).json()
    assert after["ranked_by"] == "bandit (exploit)"
    by_plan = {json.dumps(p["plan"], sort_keys=True): p for p in after["plans"]}
    same = by_plan[json.dumps(one["plan"], sort_keys=True)]
    assert same["bandit_score"] < one["predicted_score"] and same["predicted_score"] == one["predicted_score"]
    assert after["plans"][0]["plan"] != one["plan"]
    assert after["plans"][0]["bandit_score"] > same["bandit_score"]
    assert two["plan"] in [p["plan"] for p in after["plans"][:2]]


@pytest.mark.parametrize("score", [1e308, -1e6, 11])
def test_feedback_outside_the_score_range_is_refused(
    client: TestClient, synthetic: dict[str, Any], score
) -> None:
    plans = client.post("/v1/recommendations", json={"models": synthetic["names"][:2]}).json()["plans"]
    job = client.post(
        "/v1/merges", json={"name": "m", "plan": plans[0]["plan"]}, headers=auth("writer")
    ).json()
    sent = client.post(
        "/v1/feedback", json={"merge_id": job["id"], "task": "task0", "score": score}, headers=auth("writer")
    )
    assert sent.status_code == 422 and "score" in sent.text
    after = client.post("/v1/recommendations", json={"models": synthetic["names"][:2]}).json()
    assert after["ranked_by"] == "regressor"  # nothing was learned from it


def test_new_arm_is_a_candidate_from_the_next_request(client: TestClient, synthetic: dict[str, Any]) -> None:
    added = client.post(
        "/v1/operators/ties/arms", json={"parameters": {"density": 0.35}}, headers=auth("writer")
    )
    assert added.status_code == 201, added.text
    plans = client.post("/v1/recommendations", json={"models": synthetic["names"][:2], "top": 100}).json()[
        "plans"
    ]
    offered = [p["steps"][-1] for p in plans if p["steps"][-1]["method"] == "ties"]
    assert any(step["parameters"].get("density") == 0.35 for step in offered), offered


def test_catalog_scoring_names_an_unknown_method(client: TestClient, synthetic: dict[str, Any]) -> None:
    answer = client.post("/v1/scoring", json={"methods": ["frob"]}, headers=auth("writer"))
    assert answer.status_code == 400 and "'frob'" in answer.json()["error"]["message"]


def test_catalog_scoring_job_pages_and_plots(client: TestClient, synthetic: dict[str, Any]) -> None:
    models = synthetic["names"][:4]
    job = client.post("/v1/scoring", json={"models": models}, headers=auth("writer")).json()
    done = wait_for(
        lambda: (
            (s := client.get(f"/v1/scoring/{job['id']}").json())["status"] in ("succeeded", "failed") and s
        )
    )
    assert done["status"] == "succeeded", done
    page = client.get(f"/v1/scoring/{job['id']}/results", params={"limit": 5}).json()
    assert page["total"] >= 6 and len(page["items"]) == 5
    pairs = {frozenset((r["model_a"], r["model_b"])) for r in page["items"]}
    assert all(p <= set(models) for p in pairs)
    scores = [r["predicted_score"] for r in page["items"]]
    assert scores == sorted(scores, reverse=True)
    png = client.get(f"/v1/scoring/{job['id']}/heatmap.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@contextmanager
def serving_workers(synthetic: dict[str, Any], home: Path, workers: int = 2) -> Iterator[tuple[str, Any]]:
    """`simmerge serve --workers N` on a free port over a copy of the synthetic home: (url, process)."""
    import os
    import socket
    import subprocess
    import sys

    shutil.copytree(synthetic["home"], home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "SIMMERGE_HOME": str(home),
        "SIMMERGE_CATALOG_ROOTS": str(synthetic["checkpoints"]),
        "SIMMERGE_TOKENS": json.dumps(token_settings()),
        "SIMMERGE_PAIR_FEATURES": str(synthetic["features"]),
    }
    command = [sys.executable, "-m", "simmerge", "serve", "--workers", str(workers), "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), timeout=60)
        yield url, server
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_several_web_workers_share_the_store_the_bandit_and_the_metrics(
    synthetic: dict[str, Any], tmp_path: Path
) -> None:
    """`simmerge serve --workers 2`: requests land on either process; concurrent arm additions are all
    kept in the store; /metrics counts every worker's requests."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    home = tmp_path / "home"
    with serving_workers(synthetic, home) as (url, _):
        root = synthetic["checkpoints"]
        with httpx.Client(base_url=url, timeout=30) as http:
            bodies = [{"path": str(root / "base"), "name": "base"}] + [
                {"path": str(root / n), "name": n, "base": "base"} for n in synthetic["names"]
            ]
            for body in bodies:
                assert http.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
            densities = [round(0.05 + 0.01 * i, 2) for i in range(16)]

            def add(density: float) -> int:
                with httpx.Client(base_url=url, timeout=30) as own:  # own connection: spread over workers
                    body = {"parameters": {"density": density}}
                    return own.post("/v1/operators/ties/arms", json=body, headers=auth("writer")).status_code

            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(add, densities)) == {201}
            plans = http.post("/v1/recommendations", json={"models": synthetic["names"][:2], "top": 2})
            assert plans.status_code == 200 and len(plans.json()["plans"]) == 2
            arms = http.get("/v1/operators/ties/arms").json()
            metrics = http.get("/metrics").text
    assert set(densities) <= {arm["parameters"].get("density") for arm in arms}
    pattern = r'simmerge_http_requests_total\{method="POST",route="/v1/checkpoints",status="201"\} (\S+)'
    assert sum(float(v) for v in re.findall(pattern, metrics)) == len(bodies), metrics


def test_a_web_worker_that_dies_is_replaced(synthetic: dict[str, Any], tmp_path: Path) -> None:
    import psutil

    def listening_workers(server: Any, port: int) -> set[int]:
        return {
            child.pid
            for child in psutil.Process(server.pid).children()
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections())
        }

    with serving_workers(synthetic, tmp_path / "home") as (url, server):
        port = int(url.rsplit(":", 1)[1])

        def two_listening(other_than: frozenset[int] | set[int] = frozenset()) -> set[int] | None:
            found = listening_workers(server, port)
            return found if len(found) == 2 and found != other_than else None

        first = wait_for(two_listening)
        psutil.Process(next(iter(first))).kill()
        replaced = wait_for(lambda: two_listening(first))
        assert len(replaced & first) == 1  # one survivor, one newcomer
        assert _ready(url)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("kind", DATABASES)
def test_two_servers_on_one_database_take_feedback_concurrently(
    synthetic: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    """Two apps (two servers' worth of state) on one database take 24 feedback posts at once: every one is
    stored, and both servers' bandits have learned all of them, whichever server took which."""
    from concurrent.futures import ThreadPoolExecutor

    url = fresh_database_url(kind, tmp_path)
    home = tmp_path / "home"
    shutil.copytree(synthetic["home"], home)
    settings = ServiceSettings(
        home=home,
        database_url=url,
        catalog_roots=[synthetic["checkpoints"]],
        tokens=token_settings(),
        pair_features=synthetic["features"],
        start_jobs=False,
    )
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        root = synthetic["checkpoints"]
        assert (
            one.post(
                "/v1/checkpoints", json={"path": str(root / "base"), "name": "base"}, headers=auth("writer")
            ).status_code
            == 201
        )
        names = synthetic["names"][:3]
        for name in names:
            body = {"path": str(root / name), "name": name, "base": "base"}
            assert two.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        task = b'{"prompt": "a", "completion": "b"}\n'
        headers = {**auth("writer"), "Content-Type": "application/x-ndjson"}
        assert (
            one.post("/v1/tasks", params={"name": "task0"}, content=task, headers=headers).status_code == 201
        )
        plans = one.post("/v1/recommendations", json={"models": names, "top": 2}).json()["plans"]
        merged = []
        for i, plan in enumerate(plans):
            body = {"name": f"m{i}", "plan": plan["plan"]}
            merged.append(one.post("/v1/merges", json=body, headers=auth("writer")).json()["id"])

        def post(i: int) -> int:
            client = (one, two)[i % 2]
            body = {"merge_id": merged[i % len(merged)], "task": "task0", "score": 0.3 + 0.01 * i}
            return client.post("/v1/feedback", json=body, headers=auth("writer")).status_code

        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(post, range(24))) == {201}
        with one.app.state.store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM feedback")).scalar() == 24
        for client in (one, two):
            ranked = client.post("/v1/recommendations", json={"models": names, "top": 2}).json()
            assert ranked["ranked_by"] == "bandit (exploit)"
            assert client.app.state.selector._selection().posterior().pulls == 24


def test_a_checkpoint_without_signatures_is_a_409_naming_it(tmp_path: Path) -> None:
    """The service never computes a signature inside a request: it names the checkpoints and the job."""
    family = make_family(tmp_path / "zoo")
    settings = ServiceSettings(
        home=tmp_path / "home", catalog_roots=[tmp_path / "zoo"], tokens=token_settings(), start_jobs=False
    )
    with TestClient(create_app(settings)) as client:
        assert (
            client.post(
                "/v1/checkpoints", json={"path": str(family["base"]), "name": "base"}, headers=auth("writer")
            ).status_code
            == 201
        )
        for name in ("math", "code"):
            body = {"path": str(family[name]), "name": name, "base": "base"}
            assert client.post("/v1/checkpoints", json=body, headers=auth("writer")).status_code == 201
        answer = client.post("/v1/recommendations", json={"models": ["math", "code"]})
        assert answer.status_code == 409, answer.text
        message = answer.json()["error"]["message"]
        assert "'code'" in message and "'math'" in message and "/v1/features" in message
        assert not list((tmp_path / "home").rglob("*.npz"))  # nothing was computed
