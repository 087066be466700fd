"""`make demo`: the whole SimMerge story on the tiny `ci` zoo, through the REST service.

Builds (or reuses) the zoo, starts `simmerge serve` on loopback with the embedded defaults (SQLite
under the demo home, the in-process job backend), registers the catalog, computes signatures, asks
which merge to make, runs the top plan as a job, scores the merged checkpoint on its tasks, reports
that score as feedback, asks again, and stops the server. Everything goes through HTTP as a user's
client would; only the scoring of the merged model runs here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TERMINAL = {"succeeded", "failed", "cancelled"}


class Client:
    """A minimal JSON client (stdlib only) that raises with the server's error envelope."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/x-ndjson" if raw is not None else "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise SystemExit(f"demo: {method} {path} failed with {exc.code}: {detail}") from exc
        return json.loads(payload) if payload else None

    def wait_for_job(self, job: dict[str, Any], label: str) -> dict[str, Any]:
        shown = -1
        while job["status"] not in TERMINAL:
            percent = int(job["progress"] * 100)
            if percent != shown:
                print(f"  {label}: {job['status']} {percent}%", flush=True)
                shown = percent
            time.sleep(0.5)
            job = self.call("GET", f"/v1/jobs/{job['id']}")
        if job["status"] != "succeeded":
            raise SystemExit(f"demo: {label} job {job['id']} {job['status']}: {job.get('error')}")
        print(f"  {label}: succeeded (attempt {job['attempts']})", flush=True)
        return job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, zoo: Path, token: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        SIMMERGE_HOME=str(home),
        SIMMERGE_CATALOG_ROOTS=str(zoo),
        SIMMERGE_TOKENS=json.dumps(
            {"demo": {"scopes": ["admin"], "sha256": hashlib.sha256(token.encode()).hexdigest()}}
        ),
    )
    log = (home / "server.log").open("wb")
    argv = [sys.executable, "-m", "simmerge", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(client: Client, server: subprocess.Popen[bytes], home: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: the server exited early; see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(client.base_url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the server did not become ready; see {home / 'server.log'}")


def register_zoo(client: Client, zoo: Path, manifest: dict[str, Any]) -> None:
    for task in manifest["tasks"]:
        query = f"?name={task['name']}&metric={task.get('metric', 'token_accuracy')}&held_out={str(task['held_out']).lower()}"
        client.call("POST", "/v1/tasks" + query, raw=(zoo / task["file"]).read_bytes())
    ordered = sorted(manifest["checkpoints"], key=lambda c: c.get("base") is not None)
    for item in ordered:
        body = {
            "path": str((zoo / item["path"]).resolve()),
            "name": item["name"],
            "base": item.get("base"),
            "tasks": item.get("tasks", []),
            "family": item.get("family"),
        }
        client.call("POST", "/v1/checkpoints", body)
    print(f"registered {len(ordered)} checkpoints and {len(manifest['tasks'])} tasks", flush=True)


def score_merged(zoo: Path, merged_path: Path, experts: list[dict[str, Any]]) -> dict[str, float]:
    """Raw and normalised (merged / expert, docs/design.md §4) scores on the merged experts' own tasks."""
    from simmerge.evaluation import evaluate_checkpoint, load_tasks

    tasks = sorted({t for e in experts for t in e["tasks"]})
    loaded = load_tasks(zoo / "tasks", tasks)
    merged = evaluate_checkpoint(merged_path, loaded)
    normalised = {}
    for task in tasks:
        best_expert = max(
            evaluate_checkpoint(zoo / e["path"], loaded)[task] for e in experts if task in e["tasks"]
        )
        normalised[task] = merged[task] / best_expert if best_expert else 0.0
    return {"raw": merged, "normalised": normalised}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, required=True, help="demo state (recreated on each run)")
    parser.add_argument("--zoo", type=Path, required=True, help="where the ci zoo is built (cached)")
    args = parser.parse_args()
    from simmerge.zoo import build_zoo

    print("1/7 building the ci zoo (cached after the first run)", flush=True)
    zoo = build_zoo(args.zoo, size="ci", seed=0, progress=True, force=True)  # the demo's own cache
    manifest = json.loads((zoo / "catalog.json").read_text())
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    token = secrets.token_urlsafe(24)
    port = free_port()
    client = Client(f"http://127.0.0.1:{port}", token)
    print(f"2/7 starting the service on http://127.0.0.1:{port} (SQLite, in-process jobs)", flush=True)
    server = start_server(args.home, zoo.resolve(), token, port)
    try:
        wait_ready(client, server, args.home)
        run_story(client, zoo, manifest)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal, so -SIGTERM is a clean stop.
    clean = server.returncode in (0, -signal.SIGTERM)
    print(
        f"server {'stopped cleanly' if clean else f'exited with {server.returncode}'}; "
        f"state and logs are in {args.home}",
        flush=True,
    )


def run_story(client: Client, zoo: Path, manifest: dict[str, Any]) -> None:
    print("3/7 registering the catalog", flush=True)
    register_zoo(client, zoo, manifest)
    print("4/7 computing signatures (one pass per checkpoint)", flush=True)
    client.wait_for_job(client.call("POST", "/v1/features", {}), "features")
    base = next(c for c in manifest["checkpoints"] if c["role"] == "base")
    one_per_task: dict[str, str] = {}
    for item in manifest["checkpoints"]:
        if item.get("base") == base["name"] and len(item["tasks"]) == 1:
            one_per_task.setdefault(item["tasks"][0], item["name"])
    candidates = list(one_per_task.values())[:3]
    print(f"5/7 asking which merge of {', '.join(candidates)} to make", flush=True)
    ranked = client.call("POST", "/v1/recommendations", {"models": candidates, "top": 3})["plans"]
    for plan in ranked:
        print(
            f"  #{plan['rank']} {plan.get('description') or plan['models']}: predicted "
            f"{plan['predicted_score']:.3f} ± {plan['uncertainty']:.3f}",
            flush=True,
        )
    top = ranked[0]
    print("6/7 running the top plan as a merge job", flush=True)
    job = client.call(
        "POST",
        "/v1/merges",
        {"name": "demo-merge", "plan": top["plan"], "predicted_score": top["predicted_score"]},
    )
    job = client.wait_for_job(job, "merge")
    merged = client.call("GET", "/v1/checkpoints/demo-merge")
    merged_experts = [e for e in manifest["checkpoints"] if e["name"] in top["models"]]
    scores = score_merged(zoo, Path(merged["path"]), merged_experts)
    held_in = sum(scores["normalised"].values()) / len(scores["normalised"])
    print(f"  merged checkpoint {merged['name']} at {merged['path']}", flush=True)
    print(
        f"  measured normalised held-in score {held_in:.3f} (predicted {top['predicted_score']:.3f})",
        flush=True,
    )
    print("7/7 reporting the measured scores as feedback, and asking again", flush=True)
    for task, score in scores["normalised"].items():
        client.call("POST", "/v1/feedback", {"merge_id": job["id"], "task": task, "score": score})
    again = client.call("POST", "/v1/recommendations", {"models": candidates, "top": 3})["plans"]
    for plan in again:
        bandit = plan.get("bandit_score")
        bandit_text = f", bandit {bandit:.3f}" if bandit is not None else ""
        print(
            f"  #{plan['rank']} {plan.get('description') or plan['models']}: predicted "
            f"{plan['predicted_score']:.3f}{bandit_text}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "recommended": top.get("description"),
                "predicted": top["predicted_score"],
                "measured_held_in": held_in,
                "per_task": scores,
            },
            indent=2,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
