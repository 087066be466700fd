"""Thin seams to the learned selector (`models/`) and signatures (`features/`).

The API depends on these protocols only, so tests inject fakes through FastAPI dependencies and
the real packages are imported lazily: when the app starts (`ModelsSelector.warm`, so no request pays
for loading the predictor) or on first use, never when `service` is imported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.api.errors import UnavailableError
from simmerge.catalog import Catalog

Progress = Callable[[float, str | None], None]
log = logging.getLogger("simmerge.service")


@dataclass(frozen=True)
class RecommendationQuery:
    """One recommendation request as the selector sees it (`base`: the experts' common base, if any)."""

    models: tuple[str, ...]
    top: int
    task: str | None = None
    base: str | None = None


class Selector(Protocol):
    """What the recommendation and feedback endpoints need from the learned selector."""

    def recommend_many(self, queries: Sequence[RecommendationQuery]) -> list[list[dict[str, Any]]]:
        """Each query's ranked plans, computed together (the requests a busy server batches).

        Dicts with rank, models, steps, predicted_score, uncertainty, mergekit_yaml, drivers.
        """
        ...

    def feedback(self, plan: dict[str, Any], task: str, score: float) -> None:
        """Teach the bandit a measured reward so the next recommendation reflects it."""
        ...

    def add_arm(self, family: str, parameters: dict[str, Any]) -> None:
        """Offer a new operator setting to the bandit."""
        ...


class JobRunners(Protocol):
    """Long computations run inside job workers (never on a request thread)."""

    def score_catalog(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], out_dir: Path, progress: Progress
    ) -> dict:
        """Write `scores.jsonl` (rows best first) and `heatmap.png` into `out_dir`."""
        ...

    def compute_features(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], progress: Progress
    ) -> dict:
        """Compute cached signatures; return {"signatures": [{checkpoint, content_hash, probes_hash, path}]}."""
        ...


def _missing(what: str, exc: Exception) -> UnavailableError:
    return UnavailableError(f"{what} is not available in this installation ({type(exc).__name__}: {exc})")


class ModelsSelector:
    """The real selector: `models.api` over the home's predictor, bandit and cached signatures.

    `models` is imported on first use (it pulls in LightGBM and pandas), never at start-up. The
    predictor and the pair-feature source are kept between requests (reloaded when their files
    change): parsing the boosters and the table costs ~100 ms, several times the prediction itself.
    The catalog is the service's (it may live in PostgreSQL), so the common base is looked up here.
    """

    def __init__(self, home: Path, catalog: Catalog, pair_features: Path | None = None) -> None:
        self.home = home
        self.catalog = catalog
        self.pair_features = pair_features
        self._lock = threading.Lock()
        self._cached: tuple[tuple[Any, ...], Any, dict[str, Any], Any] | None = None

    @staticmethod
    def _api() -> Any:
        try:
            from models import api
        except ImportError as exc:
            raise _missing("the learned selector (models.api)", exc) from exc
        return api

    def _loaded(self, api: Any) -> tuple[Any, dict[str, Any], Any]:
        """(predictor, its metadata, pair-feature source), rebuilt when a file or the catalog changes."""
        directory = api.predictor_dir(self.home)
        watched = (directory / "meta.json", self.pair_features or directory / "meta.json")
        stamp = (
            str(directory),
            *(p.stat().st_mtime_ns if p.exists() else None for p in watched),
            self._catalog_version() if self.pair_features is None else None,
        )
        if self._cached is None or self._cached[0] != stamp:
            predictor, meta = api.load_predictor(directory)
            source = self._source(api)
            api.check_source(meta, source)
            self._cached = (stamp, predictor, meta, source)
        return self._cached[1], self._cached[2], self._cached[3]

    def _source(self, api: Any) -> Any:
        """A pair-feature table if configured, else the signature cache with paths from *this* catalog
        (which may be PostgreSQL, where `models.api.home_source` would look for a SQLite file)."""
        if self.pair_features is not None:
            return api.home_source(self.home, self.pair_features)
        from models.sources import FeaturesPackageSource

        return FeaturesPackageSource(self.home, {e.name: e.path for e in self.catalog.list()})

    def _catalog_version(self) -> tuple[int, int]:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from simmerge.catalog import CheckpointRow

        with Session(self.catalog.engine) as session:
            count, last = session.execute(select(func.count(), func.max(CheckpointRow.id))).one()
        return int(count), int(last or 0)

    def warm(self) -> None:
        """Load the predictor and feature source now, at start-up, rather than in the first request
        (each web worker process would otherwise make one request per worker wait ~0.5 s or more).
        A home without a predictor or features yet is fine: the first request that needs them says so."""
        try:
            with self._lock:
                predictor, _meta, _source = self._loaded(self._api())
                self._exercise(predictor)
        except Exception as exc:
            log.info("selector not preloaded: %s", exc)

    @staticmethod
    def _exercise(predictor: Any) -> None:
        """One prediction and one explanation on a zero row: loads the compiled trees' machine code and
        builds their SHAP tables (~0.5 s) here rather than in a request."""
        import numpy as np

        names = getattr(predictor, "feature_names", None)
        if not names:
            return
        row = np.zeros((1, len(names)))
        predictor.predict(row)
        if hasattr(predictor, "contributions"):
            predictor.contributions(row)

    def recommend_many(self, queries: Sequence[RecommendationQuery]) -> list[list[dict[str, Any]]]:
        """What `models.api.recommend` does for each query, with the predictor and source kept warm."""
        from models.plan_ranking import PlanQuery

        api = self._api()
        with self._lock:  # one prediction at a time: LightGBM parallelises inside a call
            predictor, meta, source = self._loaded(api)
            results = api.recommend_loaded_many(
                [PlanQuery(q.models, q.base) for q in queries],
                predictor,
                meta,
                source,
                home=self.home,
                top=[q.top for q in queries],
                tasks=[q.task for q in queries],
            )
        return [list(result["plans"]) for result in results]

    def feedback(self, plan: dict[str, Any], task: str, score: float) -> None:
        with self._lock:
            self._api().bandit_update(plan, task, score, home=self.home, pair_features=self.pair_features)

    def add_arm(self, family: str, parameters: dict[str, Any]) -> None:
        with self._lock:
            self._api().bandit_add_arm(family, parameters, home=self.home, pair_features=self.pair_features)


class ModelsRunners:
    """Catalog scoring (models.api) and signatures (features), run inside job workers."""

    def score_catalog(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], out_dir: Path, progress: Progress
    ) -> dict:
        """Score with models.api, then store rows best first as JSON Lines for paging."""
        import json

        api = ModelsSelector._api()
        summary = api.score_catalog(
            home=settings.home_dir,
            out_dir=out_dir / "models",
            progress=progress,
            models=request.get("models"),
            pair_features=settings.pair_features,
        )
        import pandas as pd

        table = pd.read_parquet(summary["table"]).sort_values(
            "predicted_score", ascending=False, kind="stable"
        )
        columns = ["model_a", "model_b", "method", "parameters", "predicted_score", "uncertainty"]
        with (out_dir / "scores.jsonl").open("w") as out:
            for row in table[columns].to_dict("records"):
                params = row["parameters"]
                row["parameters"] = json.loads(params) if isinstance(params, str) and params else {}
                row.update(
                    model_a=str(row["model_a"]),
                    model_b=str(row["model_b"]),
                    method=str(row["method"]),
                    predicted_score=float(row["predicted_score"]),
                    uncertainty=float(row["uncertainty"]),
                )
                out.write(json.dumps(row) + "\n")
        if summary.get("plot"):
            Path(summary["plot"]).rename(out_dir / "heatmap.png")
        return {"checkpoints": summary.get("checkpoints"), "best": summary.get("best", [])[:3]}

    def compute_features(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], progress: Progress
    ) -> dict:
        """Fill the signature cache (features.compute_signatures) for the checkpoints and their bases."""
        import json

        try:
            from features import compute_signatures
        except ImportError as exc:
            raise _missing("the features package", exc) from exc
        entries = [catalog.get(n) for n in request["models"]] if request.get("models") else catalog.list()
        bases = {e.base for e in entries if e.base} - {e.name for e in entries}
        entries += [catalog.get(b) for b in sorted(bases)]
        probes = None
        if request.get("probes"):  # an uploaded task: its prompts are the probe texts
            task = next(t for t in catalog.tasks() if t.name == request["probes"])
            with task.path.open() as handle:
                probes = [json.loads(line)["prompt"] for line in handle if line.strip()]
        summary = compute_signatures(
            {e.name: e.path for e in entries},
            {e.name: e.base for e in entries},
            probes,
            settings.home_dir,
            progress,
            device=settings.resolved_merge_device,
        )
        summary["signatures"] = [
            {
                "checkpoint": e.name,
                "content_hash": e.content_hash,
                "probes_hash": summary["probe_hash"],
                "path": summary["directory"],
            }
            for e in entries
        ]
        return summary


MODELS_RUNNERS = ModelsRunners()
