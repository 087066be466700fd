"""`simmerge label`: ground-truth labels (merge, score, normalise) for a grid of plans over a zoo."""

from __future__ import annotations

from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context


@click.command(name="label")
@click.option(
    "--zoo",
    "zoo_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A zoo directory (catalog.json, tasks/, checkpoints/), e.g. from `simmerge zoo build`.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Labels file (Parquet). An existing file is resumed: stored plan ids are skipped.",
)
@click.option(
    "--grid",
    type=click.Choice(["default", "small"]),
    default="default",
    show_default=True,
    help="Operator settings and coverage; `small` is a few pairs and settings, for tests.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; torch threads are split between them.",
)
@click.option(
    "--triples",
    type=click.IntRange(min=0),
    default=None,
    help="Sampled triples (k-way merges and folds) [default: the grid's].",
)
@click.option(
    "--cross-family",
    type=click.IntRange(min=0),
    default=None,
    help="Sampled pairs of experts with different bases [default: the grid's].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the sampling and random operators."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Keep only the grid's first N plans (stored ones count).",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@home_option
@pass_context
def label(
    ctx: Context,
    zoo_dir: Path,
    out: Path,
    grid: str,
    workers: int,
    triples: int | None,
    cross_family: int | None,
    seed: int,
    limit: int | None,
    progress: bool,
) -> None:
    """Merge every plan of the grid in memory, score it on every zoo task, and append it to OUT."""
    from simmerge.labels import label_zoo

    _exit_cleanly_on_sigterm()
    summary = label_zoo(
        zoo_dir,
        out,
        grid=grid,
        workers=workers,
        triples=triples,
        cross_family=cross_family,
        seed=seed,
        limit=limit,
        progress=progress,
    )
    click.echo(
        f"labelled {summary.labelled} plan(s), {summary.skipped} already stored, "
        f"{summary.checkpoints_scored} checkpoint(s) scored, {summary.planned} in the grid → {summary.out} "
        f"({summary.wall_seconds:.1f} s)"
    )


def _exit_cleanly_on_sigterm() -> None:
    """`kill PID` raises SystemExit instead of ending the process, so the rows finished so far are flushed."""
    import signal

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
