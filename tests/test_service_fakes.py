"""Job runners for the service tests: the worker process imports them by `module:attribute`.

They do real (small) work, so the tests see real files, rows and pagination, without the learned
selector: scores are a deterministic function of the pair and method.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from simmerge.catalog import Catalog


def _pair_score(a: str, b: str, method: str) -> float:
    digest = hashlib.sha256(f"{min(a, b)}|{max(a, b)}|{method}".encode()).digest()
    return digest[0] / 255


class FakeRunners:
    def score_catalog(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], out_dir: Path, progress: Any
    ) -> dict:
        names = request.get("models") or [e.name for e in catalog.list()]
        methods = request.get("methods") or ["linear", "ties"]
        rows = [
            {
                "model_a": a,
                "model_b": b,
                "method": method,
                "parameters": {},
                "predicted_score": _pair_score(a, b, method),
                "uncertainty": 0.05,
            }
            for i, a in enumerate(names)
            for b in names[i + 1 :]
            for method in methods
        ]
        rows.sort(key=lambda r: -r["predicted_score"])
        with (out_dir / "scores.jsonl").open("w") as out:
            for done, row in enumerate(rows, start=1):
                out.write(json.dumps(row) + "\n")
                progress(done / len(rows), "scoring")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2, 2))
        ax.imshow([[r["predicted_score"] for r in rows[:4]]])
        fig.savefig(out_dir / "heatmap.png")
        plt.close(fig)
        return {"candidates": len(rows)}

    def compute_features(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], progress: Any
    ) -> dict:
        entries = [catalog.get(n) for n in request["models"]] if request.get("models") else catalog.list()
        signatures = [
            {
                "checkpoint": e.name,
                "content_hash": e.content_hash,
                "probes_hash": "p" * 64,
                "path": str(e.path),
            }
            for e in entries
        ]
        progress(1.0, "signatures")
        return {"signatures": signatures}


FAKE_RUNNERS = FakeRunners()


class BrokenRunners(FakeRunners):
    """Fails the same way every time (a bug, or input the checks missed): retrying cannot help."""

    def compute_features(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], progress: Any
    ) -> dict:
        raise ValueError("the probe table has no rows")


class FlakyRunners(FakeRunners):
    """The first attempt meets a transient error (EAGAIN); the next succeeds. The marker file under
    the home remembers the first attempt across worker processes."""

    def compute_features(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], progress: Any
    ) -> dict:
        marker = Path(settings.home_dir) / "flaky-attempted"
        if not marker.exists():
            marker.touch()
            raise BlockingIOError(11, "resource temporarily unavailable")
        return super().compute_features(catalog, settings, request, progress)


BROKEN_RUNNERS = BrokenRunners()
FLAKY_RUNNERS = FlakyRunners()
