"""`simmerge train`, `evaluate-selector`, `recommend`, `score-catalog`: thin click layers over `models.api`.

Heavy imports (LightGBM, pandas, matplotlib) happen inside the commands, so `simmerge --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context
from simmerge.errors import SimMergeError

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)
_pair_features_option = click.option(
    "--pair-features",
    type=_FILE,
    default=None,
    help="Table of precomputed pair features (model_a, model_b, feature columns) instead of the home's signatures.",
)


def _source(ctx: Context, pair_features: Path | None, zoo: Path | None):
    from models.api import home_source

    return home_source(ctx.home, pair_features, zoo)


def _schema_version(source) -> str:
    return str(getattr(source, "schema_version", "unknown"))


@click.command("train")
@home_option
@click.option("--labels", type=_FILE, required=True, help="Labels file from `simmerge label` (Parquet).")
@click.option(
    "--zoo", type=_DIR, default=None, help="Zoo the labels were made on (names → checkpoint paths)."
)
@_pair_features_option
@click.option("--out", type=_DIR, default=None, help="Output directory [default: HOME/predictor].")
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
@click.option("--labels", type=_FILE, required=True, help="Training labels.")
@click.option(
    "--holdout-labels", type=_FILE, default=None, help="Labels of another catalog (other seed, tasks)."
)
@click.option("--zoo", type=_DIR, default=None, help="Zoo of --labels (tasks per checkpoint, paths).")
@click.option("--holdout-zoo", type=_DIR, default=None, help="Zoo of --holdout-labels.")
@_pair_features_option
@click.option(
    "--holdout-pair-features", type=_FILE, default=None, help="Pair-feature table of the held-out catalog."
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


@click.command("recommend")
@home_option
@click.option("--models", multiple=True, help="Checkpoints by catalog name; give several: --models A B C.")
@click.argument("extra_models", nargs=-1)
@click.option("--top", type=int, default=5, show_default=True)
@click.option("--max-models", type=int, default=None, help="Largest subset to merge [default: all given].")
@click.option("--base", default=None, help="The experts' base [default: from the catalog].")
@_pair_features_option
@click.option(
    "--predictor",
    type=_DIR,
    default=None,
    help="Predictor directory [default: HOME/predictor, else shipped].",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"plans": [...]} as JSON.')
@pass_context
def recommend(
    ctx: Context,
    models: tuple[str, ...],
    extra_models: tuple[str, ...],
    top: int,
    max_models: int | None,
    base: str | None,
    pair_features: Path | None,
    predictor: Path | None,
    as_json: bool,
) -> None:
    """Rank merge plans (operator, subset, order) of the given checkpoints by predicted score."""
    from models.api import recommend as recommend_plans

    names = list(models) + list(extra_models)
    if len(names) < 2:
        raise SimMergeError(f"--models needs at least two checkpoints, got {names}")
    result = recommend_plans(
        names,
        top=top,
        home=ctx.home,
        max_models=max_models,
        base=base,
        pair_features=pair_features,
        predictor=predictor,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for plan in result["plans"]:
        drivers = ", ".join(f"{d['feature']} ({d['contribution']:+.3f})" for d in plan["drivers"])
        click.echo(
            f"{plan['rank']:2d}. {plan['predicted_score']:.3f} ± {plan['uncertainty']:.3f}  {plan['description']}"
            f"\n    drivers: {drivers}"
        )


@click.command("score-catalog")
@home_option
@click.option("--out", type=_FILE, default=None, help="Write the table to FILE.parquet or FILE.csv.")
@click.option(
    "--plot", type=_FILE, default=None, help="Write a heatmap of the best predicted merge per pair (PNG)."
)
@click.option(
    "--models", multiple=True, help="Score only these checkpoints [default: every expert in the catalog]."
)
@_pair_features_option
@click.option(
    "--predictor",
    type=_DIR,
    default=None,
    help="Predictor directory [default: HOME/predictor, else shipped].",
)
@pass_context
def score_catalog(
    ctx: Context,
    out: Path | None,
    plot: Path | None,
    models: tuple[str, ...],
    pair_features: Path | None,
    predictor: Path | None,
) -> None:
    """Predict every pair × operator setting of the catalog."""
    from models.api import score_catalog as score

    result = score(
        home=ctx.home,
        models=list(models) or None,
        out=out,
        plot=plot,
        pair_features=pair_features,
        predictor=predictor,
    )
    click.echo(f"scored {result['rows']} candidates over {result['checkpoints']} checkpoints")
    for key in ("table", "plot"):
        if key in result:
            click.echo(f"  {key}: {result[key]}")
    for row in result["best"][:5]:
        click.echo(
            f"  {row['model_a']} ⊕ {row['model_b']}: {row['method']} {json.dumps(row['parameters'])} "
            f"→ {row['predicted_score']:.3f} ± {row['uncertainty']:.3f}"
        )
