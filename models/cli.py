"""`simmerge train`, `evaluate-selector`: thin click layers over `models.api` (the commands that read the
store, `recommend` and `score-catalog`, are in `service.cli_selection`).

Heavy imports (LightGBM, pandas, matplotlib) happen inside the commands, so `simmerge --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context

# Shared with the commands over the store (`service.cli_selection`).
FILE = click.Path(dir_okay=False, path_type=Path)
DIR = click.Path(file_okay=False, path_type=Path)
pair_features_option = click.option(
    "--pair-features",
    type=FILE,
    default=None,
    help="Table of precomputed pair features (model_a, model_b, feature columns) instead of the home's signatures.",
)
predictor_option = click.option(
    "--predictor", type=DIR, default=None, help="Predictor directory [default: HOME/predictor, else shipped]."
)


def _source(ctx: Context, pair_features: Path | None, zoo: Path | None):
    from models.api import home_source

    return home_source(ctx.home, pair_features, zoo)


def _schema_version(source) -> str:
    return str(getattr(source, "schema_version", "unknown"))


@click.command("train")
@home_option
@click.option("--labels", type=FILE, required=True, help="Labels file from `simmerge label` (Parquet).")
@click.option("--zoo", type=DIR, default=None, help="Zoo the labels were made on (names → checkpoint paths).")
@pair_features_option
@click.option("--out", type=DIR, default=None, help="Output directory [default: HOME/predictor].")
@click.option("--target", type=click.Choice(["held_in", "held_out"]), default="held_in", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@pass_context
def train(
    ctx: Context,
    labels: Path,
    zoo: Path | None,
    pair_features: Path | None,
    out: Path | None,
    target: str,
    seed: int,
) -> None:
    """Train the predictor (LightGBM + quantiles) and its baselines on labelled merges."""
    from models.api import PREDICTOR_DIR, train_selectors
    from models.sources import labels_zoo

    source = _source(ctx, pair_features, zoo or (labels_zoo(labels) if pair_features is None else None))
    out = out or ctx.home / PREDICTOR_DIR
    meta = train_selectors(
        labels, source, out, target=target, seed=seed, schema_version=_schema_version(source)
    )
    click.echo(f"trained on {meta['n_rows']} plans in {meta['n_pools']} pools → {out}")
    validation = meta.get("validation", {})
    for name in ("lightgbm", "lasso", "best_fixed"):
        if name in validation:
            v = validation[name]
            click.echo(
                f"  held-out pairs {name:10s} gap closed {v['gap_closed']:.3f}  regret {v['mean_regret']:.4f}  "
                f"Spearman {v['spearman_pooled']:.3f}"
            )


@click.command("evaluate-selector")
@home_option
@click.option("--labels", type=FILE, required=True, help="Training labels.")
@click.option(
    "--holdout-labels", type=FILE, default=None, help="Labels of another catalog (other seed, tasks)."
)
@click.option("--zoo", type=DIR, default=None, help="Zoo of --labels (tasks per checkpoint, paths).")
@click.option("--holdout-zoo", type=DIR, default=None, help="Zoo of --holdout-labels.")
@pair_features_option
@click.option(
    "--holdout-pair-features", type=FILE, default=None, help="Pair-feature table of the held-out catalog."
)
@click.option("--target", type=click.Choice(["held_in", "held_out"]), default="held_in", show_default=True)
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON instead of a table.")
@pass_context
def evaluate_selector(
    ctx: Context,
    labels: Path,
    holdout_labels: Path | None,
    zoo: Path | None,
    holdout_zoo: Path | None,
    pair_features: Path | None,
    holdout_pair_features: Path | None,
    target: str,
    folds: int,
    seed: int,
    as_json: bool,
) -> None:
    """Predictor vs best fixed, Lasso, random and oracle on held-out pairs, tasks and catalog."""
    from models.evaluate import evaluate_all, markdown_table
    from models.sources import labels_zoo

    zoo = zoo or labels_zoo(labels)
    holdout_zoo = holdout_zoo or (labels_zoo(holdout_labels) if holdout_labels else None)
    results = evaluate_all(
        labels,
        _source(ctx, pair_features, zoo),
        holdout_labels=holdout_labels,
        holdout_source=_source(ctx, holdout_pair_features, holdout_zoo) if holdout_labels else None,
        zoo=zoo,
        target=target,
        folds=folds,
        seed=seed,
    )
    if as_json:
        click.echo(
            json.dumps({p: {k: v.to_dict() for k, v in r.items()} for p, r in results.items()}, indent=2)
        )
    else:
        click.echo(markdown_table(results))
