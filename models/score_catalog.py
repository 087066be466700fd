"""Score every pair of a catalog under every operator setting, and draw the best merge per pair.

For n checkpoints and s settings this predicts n(n−1)/2 · s rows, so it is vectorised: the pairs'
features are computed once, each setting's block is built by broadcasting its descriptor, and
prediction runs in chunks that bound memory. Names and methods stay categorical (Parquet dictionary
encoding), so a million-row table stays small.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.dataset import PairFeatureSource
from models.descriptors import DEFAULT_SETTINGS, OperatorSetting, descriptor_names, operator_descriptor
from simmerge.errors import SimMergeError

COLUMNS = ("model_a", "model_b", "method", "parameters", "predicted_score", "uncertainty")
CHUNK_ROWS = 100_000
Progress = Callable[[float, str | None], None]


def score_pairs(
    names: Sequence[str],
    selector: Any,
    source: PairFeatureSource,
    settings: Sequence[OperatorSetting] = DEFAULT_SETTINGS,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """One row per (pair, setting) with the columns of `COLUMNS`."""
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        raise SimMergeError(f"scoring a catalog needs at least two checkpoints, got {len(names)}")
    if not settings:
        raise SimMergeError("no operator settings to score")
    ia, ib = np.triu_indices(len(names), k=1)
    pairs = [(names[a], names[b]) for a, b in zip(ia, ib, strict=True)]
    features = np.asarray(source.pair_features(pairs), dtype=np.float64)
    n_pairs, n_desc = len(pairs), len(descriptor_names())
    means, uncs = [], []
    for index, setting in enumerate(settings):
        desc = operator_descriptor(setting.method, setting.params, kind="pair", n_models=2)
        mean, unc = np.empty(n_pairs), np.empty(n_pairs)
        for start in range(0, n_pairs, CHUNK_ROWS):
            block = features[start : start + CHUNK_ROWS]
            X = np.empty((len(block), n_desc + 3 * block.shape[1]))
            X[:, :n_desc] = desc
            for k in range(3):  # one pair: its mean, min and max are the pair's own features
                X[:, n_desc + k * block.shape[1] : n_desc + (k + 1) * block.shape[1]] = block
            mean[start : start + len(block)], unc[start : start + len(block)] = selector.predict(X)
        means.append(mean)
        uncs.append(unc)
        if progress is not None:
            progress((index + 1) / len(settings), setting.label())
    n_settings = len(settings)
    setting_codes = np.repeat(np.arange(n_settings), n_pairs)
    return pd.DataFrame(
        {
            "model_a": pd.Categorical.from_codes(np.tile(ia, n_settings), categories=pd.Index(names)),
            "model_b": pd.Categorical.from_codes(np.tile(ib, n_settings), categories=pd.Index(names)),
            "method": _categorical([s.method for s in settings], setting_codes),
            "parameters": _categorical(
                [json.dumps(dict(s.params), sort_keys=True) for s in settings], setting_codes
            ),
            "predicted_score": np.concatenate(means),
            "uncertainty": np.concatenate(uncs),
        }
    )


def _categorical(per_setting: list[str], setting_codes: np.ndarray) -> pd.Categorical:
    """A column that repeats one value per setting, stored as codes into its distinct values."""
    categories = list(dict.fromkeys(per_setting))
    lookup = np.asarray([categories.index(v) for v in per_setting])
    return pd.Categorical.from_codes(lookup[setting_codes], categories=pd.Index(categories))


def best_per_pair(table: pd.DataFrame) -> pd.DataFrame:
    """The highest predicted setting of each pair."""
    order = table.sort_values("predicted_score", ascending=False, kind="stable")
    return order.drop_duplicates(["model_a", "model_b"]).reset_index(drop=True)


def write_table(table: pd.DataFrame, out: Path) -> Path:
    """Parquet or CSV by suffix, written to a temporary name and renamed into place."""
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise SimMergeError(f"output {out} must end in .parquet or .csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        table.to_parquet(tmp, index=False)
    else:
        table.to_csv(tmp, index=False)
    tmp.replace(out)
    return out


_ABBREVIATIONS = {
    "linear": "lin",
    "slerp": "slerp",
    "task_arithmetic": "TA",
    "ties": "ties",
    "dare_linear": "dareL",
    "dare_ties": "dareT",
    "breadcrumbs": "bc",
    "breadcrumbs_ties": "bcT",
}


def plot_best_merges(table: pd.DataFrame, out: Path, max_models: int = 24) -> Path:
    """Heatmap of the best predicted score per pair, each cell annotated with its method.

    Large catalogs are cut to the `max_models` checkpoints with the best average best-merge score, so
    the picture stays readable; the title says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_per_pair(table)
    names = sorted(set(best["model_a"].astype(str)) | set(best["model_b"].astype(str)))
    shown = names
    if len(names) > max_models:
        per_model = pd.concat(
            [
                best[["model_a", "predicted_score"]].set_axis(["m", "s"], axis=1),
                best[["model_b", "predicted_score"]].set_axis(["m", "s"], axis=1),
            ]
        )
        per_model["m"] = per_model["m"].astype(str)
        shown = sorted(per_model.groupby("m")["s"].mean().nlargest(max_models).index)
    index = {n: i for i, n in enumerate(shown)}
    grid = np.full((len(shown), len(shown)), np.nan)
    labels = [["" for _ in shown] for _ in shown]
    for a, b, method, score in best[["model_a", "model_b", "method", "predicted_score"]].itertuples(
        index=False
    ):
        a, b = str(a), str(b)
        if a in index and b in index:
            for i, j in ((index[a], index[b]), (index[b], index[a])):
                grid[i, j] = score
                labels[i][j] = _ABBREVIATIONS.get(str(method), str(method)[:5])
                if len(shown) <= 12:  # room for the score too
                    labels[i][j] += f"\n{score:.2f}"
    size = max(5.0, 0.55 * len(shown) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(grid, cmap="viridis")
    fig.colorbar(image, ax=ax, label="best predicted score")
    ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), shown, fontsize=7)
    finite = grid[np.isfinite(grid)]
    middle = float(np.median(finite)) if finite.size else 0.0
    for i in range(len(shown)):
        for j in range(len(shown)):
            if labels[i][j]:
                colour = "black" if grid[i, j] > middle else "white"
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=6, color=colour)
    title = "Best predicted merge per pair"
    if len(shown) < len(names):
        title += f" (top {len(shown)} of {len(names)} checkpoints)"
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
