"""`simmerge eval`: score a checkpoint on tasks and print `{task: score}` as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context
from simmerge.resources import device_option_callback


@click.command(name="eval")
@click.argument("checkpoint")
@click.option("--tasks", "task_source", required=True, type=click.Path(path_type=Path),
              help="A zoo directory (catalog.json), a folder of .jsonl task files, or one file.")  # fmt: skip
@click.option("--task", "names", multiple=True, help="Only this task (by name); repeatable.")
@click.option("--metric", type=click.Choice(["token_accuracy", "exact_match", "loglik"]), default=None,
              help="Override every task's metric [default: each task's own, else token_accuracy].")  # fmt: skip
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--device", default="cpu", show_default=True, callback=device_option_callback, help="cpu or cuda[:N]."
)
@home_option
@pass_context
def eval_command(
    ctx: Context,
    checkpoint: str,
    task_source: Path,
    names: tuple[str, ...],
    metric: str | None,
    batch_size: int,
    device: str,
) -> None:
    """Score CHECKPOINT (a directory or a catalog name) on the tasks."""
    from simmerge.evaluation import evaluate_checkpoint, load_tasks
    from simmerge.resolve import catalog_resolver

    tasks = load_tasks(task_source, names or None)
    path = catalog_resolver(ctx.home)(checkpoint)
    scores = evaluate_checkpoint(path, tasks, metric, batch_size, device)
    click.echo(json.dumps(scores, indent=2))
