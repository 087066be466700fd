"""`simmerge features`: fill the signature cache for the home catalog or a zoo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context
from simmerge.errors import NotFoundError
from simmerge.resources import device_option_callback


@click.command("features")
@click.option(
    "--probes",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Probe set (JSON Lines of {"text"}) [default: with --zoo its probes.jsonl; else the home\'s '
    "last probe set, else a zoo's beside the checkpoints, else a small built-in set].",
)
@click.option(
    "--zoo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Take the checkpoints from this zoo's catalog.json instead of the home catalog.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=device_option_callback,
    help="cpu or cuda[:N] for the probe forward passes.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@home_option
@pass_context
def features(
    ctx: Context,
    probes: Path | None,
    zoo: Path | None,
    device: str,
    batch_size: int,
    progress: bool,
    as_json: bool,
) -> None:
    """Compute (or reuse) the signature of every catalog checkpoint."""
    from features.cache import compute_signatures

    paths, bases = _zoo_checkpoints(zoo) if zoo is not None else _catalog_checkpoints(ctx.home)
    if probes is None and zoo is not None and (zoo / "probes.jsonl").is_file():
        probes = zoo / "probes.jsonl"
    summary = compute_signatures(
        paths, bases, probes, ctx.home, progress=progress, device=device, batch_size=batch_size
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{summary['checkpoints']} checkpoints: computed {summary['computed_functional']} functional and "
            f"{summary['computed_structural']} structural parts, {summary['cached']} cached "
            f"(probes {summary['probe_hash'][:12]}) in {summary['directory']}"
        )


def _zoo_checkpoints(zoo: Path) -> tuple[dict[str, Path], dict[str, str | None]]:
    from simmerge.zoo import read_catalog

    rows = read_catalog(zoo).get("checkpoints", [])
    return {r["name"]: zoo / r["path"] for r in rows}, {r["name"]: r.get("base") for r in rows}


def _catalog_checkpoints(home: Path) -> tuple[dict[str, Path], dict[str, str | None]]:
    from simmerge.catalog import Catalog

    if not (home / "simmerge.db").exists():
        raise NotFoundError(
            f"no catalog in {home}; register checkpoints with `simmerge catalog add` or pass --zoo"
        )
    with Catalog.open(home) as catalog:
        entries = catalog.list()
    if not entries:
        raise NotFoundError(f"the catalog in {home} is empty")
    return {e.name: Path(e.path) for e in entries}, {e.name: e.base for e in entries}
