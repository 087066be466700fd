"""A synthetic catalog with a known score function, for tests and for benchmarks that run before labels exist.

Each checkpoint is a latent task vector (a task direction plus noise). Pair features are what the
real features resemble (cosine of task vectors, distance, norms) plus pure-noise columns, and a plan's
score follows the folk wisdom the real labels are expected to show: averaging wins for similar experts
and preserves identical ones exactly; sign election (TIES) wins when experts interfere; dropping too
much hurts. Its labels use the schema of `simmerge label`, so everything downstream runs unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from models.plans import DEFAULT_SETTINGS, OperatorSetting
from simmerge.plan import Plan

SYNTHETIC_FEATURES = ("cosine", "distance", "norm_sum", "norm_gap", "noise0", "noise1", "noise2")
LATENT_DIM = 8


@dataclass
class SyntheticCatalog:
    names: list[str]
    tasks: dict[str, list[str]]
    vectors: dict[str, np.ndarray]
    noise_seed: int = 0
    feature_names: list[str] = field(default_factory=lambda: list(SYNTHETIC_FEATURES))

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Vectorised, symmetric in (a, b); the noise columns are a fixed hash of the pair."""
        if not pairs:
            return np.zeros((0, len(SYNTHETIC_FEATURES)))
        index = {name: i for i, name in enumerate(self.names)}
        ia = np.asarray([index[a] for a, _ in pairs])
        ib = np.asarray([index[b] for _, b in pairs])
        matrix = np.stack([self.vectors[n] for n in self.names])
        norms = np.linalg.norm(matrix, axis=1)
        va, vb = matrix[ia], matrix[ib]
        cosine = np.einsum("ij,ij->i", va, vb) / np.maximum(norms[ia] * norms[ib], 1e-12)
        distance = np.linalg.norm(va - vb, axis=1)
        lo, hi = np.minimum(ia, ib).astype(np.float64), np.maximum(ia, ib).astype(np.float64)
        noise = [
            np.sin((lo * 12.9898 + hi * 78.233 + k * 37.719 + self.noise_seed) * 1.618) * 1.7
            for k in range(3)
        ]
        return np.stack(
            [cosine, distance, norms[ia] + norms[ib], np.abs(norms[ia] - norms[ib]), *noise], axis=1
        )


def make_catalog(
    n_tasks: int = 4, per_task: int = 3, seed: int = 0, task_offset: int = 0
) -> SyntheticCatalog:
    """`n_tasks × per_task` experts; experts of a task share a direction (task ids start at `task_offset`)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    tasks: dict[str, list[str]] = {}
    vectors: dict[str, np.ndarray] = {}
    for t in range(n_tasks):
        direction = rng.normal(size=LATENT_DIM)
        direction /= np.linalg.norm(direction)
        for e in range(per_task):
            name = f"s{seed}-task{t + task_offset}-e{e}"
            vectors[name] = direction * rng.uniform(0.6, 1.4) + rng.normal(scale=0.3, size=LATENT_DIM)
            tasks[name] = [f"task{t + task_offset}"]
            names.append(name)
    return SyntheticCatalog(names, tasks, vectors, noise_seed=seed)


def setting_score(setting: OperatorSetting, cosine: float, norm_gap: float) -> float:
    """The known (noise-free) score of merging experts with this mean cosine using `setting`."""
    family = setting.method
    flags = setting.operator.traits()
    interference = 1.0 - cosine
    if family in ("linear", "slerp"):
        return (
            1.0 - 0.3 * interference + (0.01 if family == "slerp" else 0.0) * interference - 0.06 * norm_gap
        )
    lam = float(setting.params.get("lambda", 1.0))
    density = float(setting.params.get("density", 1.0))
    return (
        0.95
        - 0.2 * interference * (1.0 - 0.65 * flags["sign_election"])
        - 0.05 * flags["sign_election"]
        - 0.3 * abs(lam - 1.0)
        - 0.2 * (1.0 - density) ** 2 * (1.0 + flags["random_drop"])
        + 0.03 * flags["magnitude_trim"] * (interference - 0.5)
        + 0.08 * flags["random_drop"] * (norm_gap - 0.3)
    )


def make_labels(
    catalog: SyntheticCatalog,
    settings: Sequence[OperatorSetting] = DEFAULT_SETTINGS,
    seed: int = 0,
    noise: float = 0.015,
    triples: int = 0,
) -> pd.DataFrame:
    """Pair labels for every pair × setting, plus `triples` random 3-way pools (k-way and fold plans)."""
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in combinations(catalog.names, 2):
        feats = catalog.pair_features([(a, b)])[0]
        for s in settings:
            score = setting_score(s, feats[0], feats[3]) + rng.normal(scale=noise)
            rows.append(
                _row(
                    Plan.single(s.method, [a, b], base="base", parameters=dict(s.params)),
                    s,
                    "pair",
                    [a, b],
                    score,
                    catalog,
                )
            )
    for _ in range(triples):
        members = [str(m) for m in rng.choice(catalog.names, size=3, replace=False)]
        feats = catalog.pair_features(list(combinations(sorted(members), 2)))
        cosine, gap = float(feats[:, 0].mean()), float(feats[:, 3].mean())
        for s in settings:
            if s.method == "slerp":
                continue
            score = setting_score(s, cosine, gap) - 0.02 + rng.normal(scale=noise)
            plan = Plan.single(s.method, members, base="base", parameters=dict(s.params))
            rows.append(_row(plan, s, "kway", members, score, catalog))
        for order in ([0, 1, 2], [2, 1, 0]):
            ordered = [members[i] for i in order]
            steps = [settings[int(i)] for i in rng.choice(len(settings), size=2)]
            plan = Plan.fold(ordered, [(s.method, dict(s.params)) for s in steps], base="base")
            score = (
                float(np.mean([setting_score(s, cosine, gap) for s in steps]))
                - 0.04
                + rng.normal(scale=noise)
            )
            rows.append(_row(plan, steps[-1], "fold", ordered, score, catalog))
    return pd.DataFrame(rows)


def _row(
    plan: Plan,
    setting: OperatorSetting,
    kind: str,
    models: list[str],
    score: float,
    catalog: SyntheticCatalog,
) -> dict:
    return {
        "held_in_tasks": sorted({t for m in models for t in catalog.tasks[m]}),
        "plan_id": plan.plan_id(),
        "plan_json": json.dumps(plan.to_dict()),
        "kind": kind,
        "method": setting.method,
        "params_json": json.dumps(dict(setting.params), sort_keys=True),
        "models": list(models),
        "model_a": models[0],
        "model_b": models[1],
        "base": "base",
        "held_in_score": float(score),
        "held_out_score": float(score) * 0.8 + 0.1,
    }
