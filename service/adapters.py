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
    """One recommendation request as the selector sees it (`base`: the experts' common base, if any;
    `cross_family`: the catalog knows their bases and they differ)."""

    models: tuple[str, ...]
    top: int
    task: str | None = None
    base: str | None = None
    cross_family: bool = False
    mode: str = "exploit"


class Selector(Protocol):
    """What the recommendation and feedback endpoints need from the learned selector."""

    def recommend_many(self, queries: Sequence[RecommendationQuery]) -> list[dict[str, Any]]:
        """Each query's `{"plans": [...], "ranked_by": ...}`, computed together (a batch).

        Plans are dicts with rank, models, steps, predicted_score, uncertainty, mergekit_yaml, drivers.
        """
        ...

    def check_feedback(self, plan: dict[str, Any], score: float) -> None:
        """Raise if a measured score of `plan` could not teach the bandit (before it is stored)."""
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
    """The real selector: `models.selection.Selection` over the home's predictor, the signature cache
    and the store's feedback and arms.

    `models` is imported on first use (it pulls in LightGBM and pandas), never when `service` is. The
    selection (predictor, feature source, plan table, the bandit's posterior) is kept between requests
    and rebuilt when the predictor's files or the catalog change: parsing the boosters costs ~100 ms,
    several times a recommendation. Feedback other processes stored is folded in on the next call.
    A request never computes a signature: a missing one is a 409 naming the checkpoints.
    """

    def __init__(self, home: Path, catalog: Catalog, store: Any, pair_features: Path | None = None) -> None:
        self.home = home
        self.catalog = catalog
        self.store = store
        self.pair_features = pair_features
        self._lock = threading.Lock()
        self._cached: tuple[tuple[Any, ...], Any] | None = None

    @staticmethod
    def _api() -> Any:
        try:
            from models import api
        except ImportError as exc:
            raise _missing("the learned selector (models.api)", exc) from exc
        return api

    def _selection(self) -> Any:
        """The kept selection, rebuilt when a predictor file or the catalog changes."""
        api = self._api()
        directory = api.predictor_dir(self.home)
        watched = (directory / "meta.json", self.pair_features or directory / "meta.json")
        stamp = (
            str(directory),
            *(p.stat().st_mtime_ns if p.exists() else None for p in watched),
            self._catalog_version() if self.pair_features is None else None,
        )
        if self._cached is None or self._cached[0] != stamp:
            paths = {e.name: e.path for e in self.catalog.list()}
            source = api.home_source(self.home, self.pair_features, paths=paths, compute_missing=False)
            selection = api.load_selection(self.home, source, feedback=self.store, arms=self.store)
            self._cached = (stamp, selection)
        return self._cached[1]

    def _catalog_version(self) -> tuple[int, int]:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from simmerge.catalog import CheckpointRow

        with Session(self.catalog.engine) as session:
            count, last = session.execute(select(func.count(), func.max(CheckpointRow.id))).one()
        return int(count), int(last or 0)

    def warm(self) -> None:
        """Load the predictor and feature source now, at start-up, rather than in the first request.
        A home without a predictor or features yet is fine: the first request that needs them says so."""
        try:
            with self._lock:
                self._exercise(self._selection().selector)
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

    def recommend_many(self, queries: Sequence[RecommendationQuery]) -> list[dict[str, Any]]:
        """`Selection.recommend_many` for the batch (queries of one mode at a time)."""
        from models.plans import PlanQuery

        with self._lock:  # one prediction at a time: LightGBM parallelises inside a call
            selection = self._selection()
            out: list[dict[str, Any] | None] = [None] * len(queries)
            for mode in dict.fromkeys(q.mode for q in queries):
                index = [i for i, q in enumerate(queries) if q.mode == mode]
                results = selection.recommend_many(
                    [
                        PlanQuery(queries[i].models, queries[i].base, None, queries[i].cross_family)
                        for i in index
                    ],
                    [queries[i].top for i in index],
                    mode,
                )
                for i, result in zip(index, results, strict=True):
                    out[i] = result
        return [r for r in out if r is not None]

    def check_feedback(self, plan: dict[str, Any], score: float) -> None:
        with self._lock:
            self._selection().check_feedback(plan, score)


class ModelsRunners:
    """Catalog scoring (models.api) and signatures (features), run inside job workers."""

    def score_catalog(
        self, catalog: Catalog, settings: Any, request: dict[str, Any], out_dir: Path, progress: Progress
    ) -> dict:
        """Score through the plan table (`models.api.score_catalog`), then store rows best first as
        JSON Lines for paging."""
        import json

        import pandas as pd

        from service.store import Store

        api = ModelsSelector._api()
        entries = catalog.list()
        names = request.get("models") or [e.name for e in entries if e.base]
        paths = {e.name: e.path for e in entries}
        source = api.home_source(settings.home_dir, settings.pair_features, paths=paths)
        store = Store(settings.db_url)
        try:
            selection = api.load_selection(settings.home_dir, source, arms=store)
            summary = api.score_catalog(
                selection,
                names,
                bases={e.name: e.base for e in entries},
                methods=request.get("methods"),
                out=out_dir / "models" / "scores.parquet",
                plot=out_dir / "heatmap.png",
                progress=progress,
            )
        finally:
            store.dispose()
        table = pd.read_parquet(summary["table"]).sort_values(
            "predicted_score", ascending=False, kind="stable"
        )
        with (out_dir / "scores.jsonl").open("w") as out:
            for row in table.to_dict("records"):
                row.update(
                    model_a=str(row["model_a"]),
                    model_b=str(row["model_b"]),
                    method=str(row["method"]),
                    parameters=json.loads(str(row["parameters"])),
                    predicted_score=float(row["predicted_score"]),
                    uncertainty=float(row["uncertainty"]),
                )
                out.write(json.dumps(row) + "\n")
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
        from service.roots import check_registered_within_roots

        check_registered_within_roots(catalog, [e.name for e in entries], settings)
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
