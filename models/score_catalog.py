"""Catalog scoring's outputs: the table (Parquet or CSV) and the heatmap of the best merge per pair.

The scores themselves come from `models.selection.Selection.score_pairs`, through the plan table.
Names and methods stay categorical (Parquet dictionary encoding), so a million-row table stays small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simmerge.errors import SimMergeError

COLUMNS = ("model_a", "model_b", "method", "parameters", "predicted_score", "uncertainty")


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
