"""`simmerge zoo build`: the demo and test catalog of tiny Llama checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context


@click.group(name="zoo")
def zoo() -> None:
    """Build the demo zoo: bases, experts, tasks and probes (see docs/zoo.md)."""


@zoo.command(name="build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice(["ci", "full"]), default="ci", show_default=True,
              help="ci: seconds, for tests; full: minutes, for demos and benchmarks.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seed for inits, data and training.")
@click.option("--tasks", default=None, metavar="A,B,...",
              help="Task subset [default: the size's own]; copy (the bases' skill) is always added.")  # fmt: skip
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="torch threads while training.",
)
@click.option("--force", is_flag=True, help="Replace a directory that holds something else.")
@click.option("--no-progress", is_flag=True, help="Hide the per-run progress bars.")
@home_option
@pass_context
def build(
    ctx: Context,
    directory: Path,
    size: str,
    seed: int,
    tasks: str | None,
    threads: int,
    force: bool,
    no_progress: bool,
) -> None:
    """Build the zoo into DIRECTORY (instant when the same zoo is already there)."""
    from simmerge.resolve import registered_paths
    from simmerge.zoo import build_zoo, read_catalog

    subset = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    started = time.perf_counter()
    root = build_zoo(
        directory,
        size,
        seed,
        subset,
        force=force,
        progress=not no_progress,
        threads=threads,
        protected=registered_paths(ctx.home),
    )
    catalog = read_catalog(root)
    experts = sum(1 for c in catalog["checkpoints"] if c["role"] == "expert")
    click.echo(
        f"zoo {root}: {len(catalog['checkpoints']) - experts} bases, {experts} experts, "
        f"{len(catalog['tasks'])} tasks ({time.perf_counter() - started:.1f}s)"
    )
