"""`simmerge recommend` and `simmerge score-catalog`: the selection over the home's store.

They live beside the service because they read what the service writes (the catalog, the arms added
online, the feedback that trains the bandit) from the same store: SQLite under `--home`, or the
database `SIMMERGE_DATABASE_URL` names. Unlike the service, the command line computes a missing
signature on the spot (with the features package's cache), since a user asked for it and waits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from models.cli import FILE, pair_features_option, predictor_option
from simmerge.cli import Context, home_option, pass_context
from simmerge.errors import NotFoundError, SimMergeError


@contextmanager
def home_selection(
    ctx: Context, pair_features: Path | None, predictor: Path | None
) -> Iterator[tuple[Any, Any]]:
    """(selection, catalog) over the home's store: its catalog, arms and feedback."""
    from models.api import home_source, load_selection
    from service.store import open_store

    store = open_store(ctx.home)
    try:
        catalog = store.catalog()
        paths = {e.name: e.path for e in catalog.list()}
        source = home_source(ctx.home, pair_features, paths=paths)
        yield (
            load_selection(ctx.home, source, predictor=predictor, feedback=store, arms=store),
            catalog,
            store,
        )
    finally:
        store.dispose()


@click.command("recommend")
@home_option
@click.option("--models", multiple=True, help="Checkpoints by catalog name; give several: --models A B C.")
@click.argument("extra_models", nargs=-1)
@click.option("--top", type=int, default=5, show_default=True)
@click.option("--max-models", type=int, default=None, help="Largest subset to merge [default: all given].")
@click.option("--base", default=None, help="The experts' base, a catalog name [default: from the catalog].")
@click.option(
    "--mode",
    type=click.Choice(["exploit", "explore"]),
    default="exploit",
    show_default=True,
    help="Once feedback exists: the bandit's posterior mean, or its upper confidence bound.",
)
@pair_features_option
@predictor_option
@click.option("--json", "as_json", is_flag=True, help='Print {"plans": [...]} as JSON.')
@pass_context
def recommend(
    ctx: Context,
    models: tuple[str, ...],
    extra_models: tuple[str, ...],
    top: int,
    max_models: int | None,
    base: str | None,
    mode: str,
    pair_features: Path | None,
    predictor: Path | None,
    as_json: bool,
) -> None:
    """Rank merge plans (operator, subset, order) of the given checkpoints by predicted score."""
    from models.plans import PlanQuery, is_cross_family

    names = list(models) + list(extra_models)
    if len(names) < 2:
        raise SimMergeError(f"--models needs at least two checkpoints, got {names}")
    with home_selection(ctx, pair_features, predictor) as (selection, catalog, _store):
        bases = catalog.bases(names)
        if base is not None and pair_features is None and not catalog.has(base):
            raise NotFoundError(f"--base {base!r} is not a checkpoint in the catalog")
        members = [bases.get(n) for n in names]
        if base is None and len(set(members)) == 1:
            base = members[0]
        query = PlanQuery(
            tuple(names), base, max_models, is_cross_family(members) if len(bases) == len(names) else False
        )
        result = selection.recommend_many([query], [top], mode)[0]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"ranked by the {result['ranked_by']}")
    for plan in result["plans"]:
        drivers = ", ".join(f"{d['feature']} ({d['contribution']:+.3f})" for d in plan["drivers"])
        bandit = f"  bandit {plan['bandit_score']:.3f}" if "bandit_score" in plan else ""
        click.echo(
            f"{plan['rank']:2d}. {plan['predicted_score']:.3f} ± {plan['uncertainty']:.3f}{bandit}  "
            f"{plan['description']}\n    drivers: {drivers}"
        )


@click.command("score-catalog")
@home_option
@click.option("--out", type=FILE, default=None, help="Write the table to FILE.parquet or FILE.csv.")
@click.option(
    "--plot", type=FILE, default=None, help="Write a heatmap of the best predicted merge per pair (PNG)."
)
@click.option(
    "--models", multiple=True, help="Score only these checkpoints [default: every expert in the catalog]."
)
@click.option(
    "--methods", multiple=True, help="Score only these operator families [default: every one offered]."
)
@pair_features_option
@predictor_option
@pass_context
def score_catalog(
    ctx: Context,
    out: Path | None,
    plot: Path | None,
    models: tuple[str, ...],
    methods: tuple[str, ...],
    pair_features: Path | None,
    predictor: Path | None,
) -> None:
    """Predict every pair × operator setting of the catalog."""
    from models.api import score_catalog as score

    with home_selection(ctx, pair_features, predictor) as (selection, catalog, _store):
        entries = catalog.list()
        names = list(models) or [e.name for e in entries if e.base]
        if not names:
            raise NotFoundError(
                f"no experts in the catalog of {ctx.home}; register checkpoints with `simmerge catalog add`"
            )
        bases = {e.name: e.base for e in entries}
        result = score(selection, names, bases=bases, methods=list(methods) or None, out=out, plot=plot)
    click.echo(f"scored {result['rows']} candidates over {result['checkpoints']} checkpoints")
    for key in ("table", "plot"):
        if key in result:
            click.echo(f"  {key}: {result[key]}")
    for row in result["best"][:5]:
        click.echo(
            f"  {row['model_a']} ⊕ {row['model_b']}: {row['method']} {json.dumps(row['parameters'])} "
            f"→ {row['predicted_score']:.3f} ± {row['uncertainty']:.3f}"
        )


@click.command("feedback")
@home_option
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A JSON file with one plan exactly as `recommend --json` prints it (or its `plan` object).",
)
@click.option("--task", required=True, help="The task the score was measured on.")
@click.option("--score", type=float, required=True, help="The normalised score (1: the expert's own).")
@pair_features_option
@predictor_option
@pass_context
def feedback(
    ctx: Context, plan_file: Path, task: str, score: float, pair_features: Path | None, predictor: Path | None
) -> None:
    """Report a measured score of a plan: the CLI twin of POST /v1/feedback (one row in the store, which
    the bandit learns from in every later recommendation)."""
    from simmerge.plan import Plan

    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimMergeError(f"--plan {plan_file}: not a JSON plan ({exc})") from exc
    if not isinstance(plan, dict):
        raise SimMergeError(f"--plan {plan_file}: expected a JSON object, got {type(plan).__name__}")
    body = plan.get("plan", plan)
    if not isinstance(body, dict):
        raise SimMergeError(f"--plan {plan_file}: 'plan' is not an object")
    with home_selection(ctx, pair_features, predictor) as (selection, _catalog, store):
        selection.check_feedback(body, score)
        plan_id = Plan.from_dict(body).plan_id()
        row = store.add_feedback(checkpoint=plan_id, task=task, score=score, plan=body, merge_job_id=None)
    click.echo(f"feedback {row.id}: {task} = {score:g}")
