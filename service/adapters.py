"""Thin seams to the learned selector (`models/`) and signatures (`features/`).

The API depends on these protocols only, so tests inject fakes through FastAPI dependencies and
the real packages are imported lazily, on first use, never at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from service.api.errors import UnavailableError
from simmerge.catalog import Catalog

Progress = Callable[[float, str | None], None]


class Selector(Protocol):
    """What the recommendation and feedback endpoints need from the learned selector."""

    def recommend(self, models: Sequence[str], *, top: int, task: str | None) -> list[dict[str, Any]]:
        """Ranked plans: dicts with rank, models, steps, predicted_score, uncertainty, mergekit_yaml, drivers."""
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
        self, home: Path, request: dict[str, Any], out_dir: Path, progress: Progress
    ) -> dict: ...

    def compute_features(self, home: Path, request: dict[str, Any], progress: Progress) -> dict: ...


def _missing(what: str, exc: Exception) -> UnavailableError:
    return UnavailableError(f"{what} is not available in this installation ({type(exc).__name__}: {exc})")


class ModelsSelector:
    """The real selector from `models/`, imported on first use (it pulls in LightGBM and friends)."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def _models(self) -> Any:
        try:
            import models

            return models
        except ImportError as exc:
            raise _missing("the learned selector (models)", exc) from exc

    def recommend(self, models: Sequence[str], *, top: int, task: str | None) -> list[dict[str, Any]]:
        package = self._models()
        recommend = getattr(package, "recommend", None)
        if recommend is None:
            raise _missing("models.recommend", AttributeError("recommend"))
        result = recommend(list(models), top=top, home=self.home, task=task)
        return result["plans"] if isinstance(result, dict) else list(result)

    def feedback(self, plan: dict[str, Any], task: str, score: float) -> None:
        package = self._models()
        update = getattr(package, "bandit_update", None)
        if update is None:
            raise _missing("models.bandit_update", AttributeError("bandit_update"))
        update(plan, task, score, home=self.home)

    def add_arm(self, family: str, parameters: dict[str, Any]) -> None:
        package = self._models()
        add_arm = getattr(package, "bandit_add_arm", None)
        if add_arm is not None:
            add_arm(family, parameters, home=self.home)


class ModelsRunners:
    """Catalog scoring and signatures, run inside job workers."""

    def score_catalog(
        self, catalog: Catalog, home: Path, request: dict[str, Any], out_dir: Path, progress: Progress
    ) -> dict:
        try:
            from models import score_catalog
        except ImportError as exc:
            raise _missing("models.score_catalog", exc) from exc
        return score_catalog(catalog=catalog, home=home, out_dir=out_dir, progress=progress, **request)

    def compute_features(
        self, catalog: Catalog, home: Path, request: dict[str, Any], progress: Progress
    ) -> dict:
        try:
            from features import compute_signatures
        except ImportError as exc:
            raise _missing("features.compute_signatures", exc) from exc
        return compute_signatures(catalog=catalog, home=home, progress=progress, **request)


MODELS_RUNNERS = ModelsRunners()
