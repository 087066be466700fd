"""`simmerge catalog`: register and list checkpoints and tasks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context
from simmerge.errors import SimMergeError


@click.group(name="catalog")
def catalog() -> None:
    """Register checkpoints (one base, many experts) and tasks."""


@catalog.command(name="add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--base", default=None, help="Catalog name of the checkpoint these were fine-tuned from.")
@click.option("--name", default=None, help="Name for a single checkpoint [default: its directory name].")
@click.option("--task", "tasks", multiple=True, help="A task the checkpoint was trained on; repeatable.")
@home_option
@pass_context
def add(
    ctx: Context, paths: tuple[Path, ...], base: str | None, name: str | None, tasks: tuple[str, ...]
) -> None:
    """Register checkpoint directories (validated: safetensors weights, tensors matching the base)."""
    from simmerge.catalog import Catalog

    if name is not None and len(paths) > 1:
        raise SimMergeError(f"--name {name!r} names one checkpoint, but {len(paths)} paths were given")
    with Catalog.open(ctx.home) as store:
        for path in paths:
            entry = store.add(path, name=name, base=base, tasks=tasks)
            click.echo(f"added {entry.name} ({entry.architecture}, {entry.num_parameters:,} parameters)")


@catalog.command(name="import")
@click.argument("zoo_dir", type=click.Path(path_type=Path))
@home_option
@pass_context
def import_zoo(ctx: Context, zoo_dir: Path) -> None:
    """Register every checkpoint and task of a zoo (its catalog.json)."""
    from simmerge.catalog import Catalog

    with Catalog.open(ctx.home) as store:
        added = store.import_zoo(zoo_dir)
        click.echo(f"imported {len(added)} checkpoints and {len(store.tasks())} tasks from {zoo_dir}")


@catalog.command(name="add-task")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Task name [default: the file's stem].")
@click.option(
    "--metric", type=click.Choice(["token_accuracy", "exact_match", "loglik"]), default="token_accuracy"
)
@click.option("--held-out", is_flag=True, help="No expert trained on it (scored against the base).")
@home_option
@pass_context
def add_task(ctx: Context, path: Path, name: str | None, metric: str, held_out: bool) -> None:
    """Register a task file (JSON Lines of {"prompt", "completion"})."""
    from simmerge.catalog import Catalog

    with Catalog.open(ctx.home) as store:
        task = store.add_task(path, name, metric, held_out)
        click.echo(f"added task {task.name} ({task.metric})")


@catalog.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@home_option
@pass_context
def list_checkpoints(ctx: Context, as_json: bool) -> None:
    """List registered checkpoints."""
    from simmerge.catalog import Catalog

    with Catalog.open(ctx.home) as store:
        entries = store.list()
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo("the catalog is empty (add checkpoints with `simmerge catalog add PATH...`)")
    for e in entries:
        tasks = ",".join(e.tasks) or "-"
        click.echo(f"{e.name:32} base={e.base or '-':20} tasks={tasks:24} {e.content_hash[:12]} {e.path}")
