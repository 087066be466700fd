"""Signature settings and the pairwise feature schema that `models/` trains on.

Bump `FEATURE_SCHEMA_VERSION` whenever a feature's meaning, order or the signature layout changes:
cached signatures and trained predictors carry it, so stale ones are recomputed or refused rather
than silently mixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FEATURE_SCHEMA_VERSION = 1

# Densities at which merge operators trim task vectors (TIES, DARE, breadcrumbs).
MASK_DENSITIES = (0.2, 0.5, 0.8)
# |τ| quantile levels kept per tensor; 1 − density for each mask density must be among them.
QUANTILE_LEVELS = (0.2, 0.5, 0.8, 0.9, 0.99)
KINDS = ("attention", "mlp", "embedding", "norm", "other")
DEPTHS = ("first", "mid", "last")


@dataclass(frozen=True)
class SignatureConfig:
    """Everything that fixes a signature's content; part of every cache key."""

    seed: int = 0
    top_k: int = 8  # next-token log-probs kept per position
    positions: int = 64  # seeded token positions, spread evenly over the probes (fixed divergence cost)
    max_length: int = 64  # probes are truncated to this many tokens
    hidden_width: int = 64  # hidden states are projected (or zero-padded) to this width
    sample_size: int = 8192  # task-vector coordinates sampled per checkpoint (all tensors together)
    min_per_tensor: int = 8  # every tensor gets at least this many sampled coordinates
    quantile_sample: int = 2048  # coordinates per tensor used to estimate |τ| quantiles

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def functional_key(self) -> str:
        return f"k{self.top_k}-p{self.positions}-l{self.max_length}-w{self.hidden_width}-s{self.seed}"

    def structural_key(self) -> str:
        return f"n{self.sample_size}-m{self.min_per_tensor}-q{self.quantile_sample}-s{self.seed}"


DEFAULT_CONFIG = SignatureConfig()


def depth_thirds(n_layers: int) -> np.ndarray:
    """Third (0 first, 1 middle, 2 last) of each of `n_layers` layers; the first and last layers always
    land in the first and last third, so shallow models still fill both ends."""
    if n_layers <= 1:
        return np.zeros(max(n_layers, 0), dtype=np.int8)
    return np.rint(2 * np.arange(n_layers) / (n_layers - 1)).astype(np.int8)


def _summary(prefix: str) -> list[str]:
    return [f"{prefix}_{part}" for part in (*DEPTHS, "mean", "min")]


def feature_names() -> list[str]:
    """Names of the pairwise feature columns, in the order `pairwise_features` returns them."""
    functional = [
        *(f"{d}_{s}" for d in ("kl_ab", "kl_ba", "js") for s in ("mean", "median", "p90")),
        "top1_agree",
        *_summary("hidden_cos"),
        *_summary("cka"),
    ]
    structural = [
        "tv_cos",
        *(f"tv_cos_{kind}" for kind in KINDS),
        *(f"tv_cos_{depth}" for depth in DEPTHS),
        "sign_agree",
        *(f"mask_overlap_{round(d * 100)}" for d in MASK_DENSITIES),
        "log_norm_ratio",
        "tv_dist",
        "tv_dist_rel",
        "tv_norm_a",
        "tv_norm_b",
        "tv_rel_norm_a",
        "tv_rel_norm_b",
    ]
    return functional + structural
