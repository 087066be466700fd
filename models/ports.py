"""What `models/` needs from the outside world, as small interfaces the service and the CLI implement.

`models/` holds no state of its own: the catalog, the signatures and the feedback live in the store
(`service.store.Store`, SQLite under `--home` or PostgreSQL), which implements these protocols; tests
implement them with plain objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simmerge.errors import ConflictError


class PairFeatureSource(Protocol):
    """Checkpoint pairs → feature rows (the features package over cached signatures, or a table)."""

    @property
    def feature_names(self) -> list[str]: ...

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray: ...


class MissingSignaturesError(ConflictError):
    """Checkpoints have no cached signature and the caller may not compute them inline (the service)."""

    def __init__(self, checkpoints: Sequence[str]) -> None:
        self.checkpoints = list(checkpoints)
        names = ", ".join(repr(c) for c in self.checkpoints)
        super().__init__(
            f"no cached signatures for {names}; compute them first with a features job "
            '(POST /v1/features {"models": [...]}) or `simmerge features`'
        )


@dataclass(frozen=True)
class FeedbackRecord:
    """One measured score of a merged plan on a task: the bandit's evidence (`FeedbackLog`)."""

    id: int
    plan: dict[str, Any]
    task: str
    score: float


class FeedbackLog(Protocol):
    """The store's feedback table: written once per measurement, read by the bandit."""

    def feedback_since(self, after_id: int) -> list[FeedbackRecord]:
        """Feedback rows with an id above `after_id`, oldest first."""
        ...


class ArmSource(Protocol):
    """Operator settings offered online (`POST /v1/operators/{family}/arms`): candidates from then on."""

    def arm_settings(self) -> list[tuple[str, dict[str, Any]]]:
        """(family, parameters) of every arm, in the order they were added."""
        ...
