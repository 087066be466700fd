"""`simmerge merge`: run a merge from flags or from a mergekit-style YAML plan."""

from __future__ import annotations

from pathlib import Path

import click

from simmerge.cli import Context, home_option, pass_context
from simmerge.errors import PlanError, SimMergeError
from simmerge.plan import Plan
from simmerge.resources import device_option_callback


def parse_param(text: str) -> tuple[str, object]:
    """`k=v` with v read as YAML scalar (so 0.5 is a float, true a bool, 0.3,0.7 a list)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise PlanError(f"--param {text!r} is not of the form key=value")
    value = yaml.safe_load(f"[{raw}]") if "," in raw else yaml.safe_load(raw)
    return key.strip(), value


def plan_from_flags(method: str, models: tuple[str, ...], base: str | None, params: tuple[str, ...]) -> Plan:
    """Build a one-step plan; a per-model parameter takes one value for all or one per model.

    slerp without `--base` interpolates from the first model towards the second (mergekit's v0 is
    the base), so `--method slerp --models A B --param t=0.3` means 30% of the way from A to B.
    """
    from simmerge.operators import get_operator

    try:
        operator = get_operator(method)
    except KeyError as exc:
        raise PlanError(f"unknown merge method {method!r}") from exc
    if method == "slerp" and base is None and len(models) == 2:
        base = models[0]
    members = [m for m in models if m != base]
    per_model_names = {p.name for p in operator.model_params}
    method_params: dict[str, object] = {}
    model_params: list[dict[str, object]] = [{} for _ in members]
    for text in params:
        key, value = parse_param(text)
        if key not in per_model_names:
            method_params[key] = value
            continue
        values = value if isinstance(value, list) else [value] * len(members)
        if len(values) != len(members):
            raise PlanError(f"--param {key} has {len(values)} values for {len(members)} models")
        for entry, item in zip(model_params, values, strict=True):
            entry[key] = item
    if method == "slerp" and base is not None:  # mergekit lists both slerp endpoints
        members, model_params = [base, *members], [{}, *model_params]
    return Plan.single(method, members, base, method_params, model_params)


@click.command(name="merge")
@click.option("--method", help="Operator family, e.g. linear, slerp, ties (see docs/operators.md).")
@click.option("--models", multiple=True, help="Models by catalog name or path; repeat or give several.")
@click.option("--base", default=None, help="Base model (catalog name or path).")
@click.option("--param", "params", multiple=True, metavar="K=V", help="Operator parameter; repeatable.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="mergekit-style YAML plan.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint directory.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Output dtype [default: the sources' dtype].",
)
@click.option(
    "--device", default="cpu", show_default=True, callback=device_option_callback, help="cpu or cuda[:N]."
)
@click.option("--seed", default=0, show_default=True, help="Seed for random operators (DARE).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.argument("extra_models", nargs=-1)
@home_option
@pass_context
def merge(
    ctx: Context,
    method: str | None,
    models: tuple[str, ...],
    base: str | None,
    params: tuple[str, ...],
    config: Path | None,
    out: Path,
    dtype: str | None,
    device: str,
    seed: int,
    max_shard_size: str,
    overwrite: bool,
    no_progress: bool,
    extra_models: tuple[str, ...],
) -> None:
    """Merge checkpoints: `--method NAME --models A B... [--base B]`, or `--config plan.yaml`."""
    from simmerge.engine import run_merge
    from simmerge.resolve import catalog_resolver, registered_paths

    models = models + extra_models
    if config is not None:
        if method or models:
            raise PlanError("give either --config or --method/--models, not both")
        if not config.is_file():
            raise SimMergeError(f"{config}: no such plan file")
        try:
            text = config.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{config}: not UTF-8 text (byte {exc.start})") from None
        plan = Plan.from_yaml(text, source=str(config))
    else:
        if not method or not models:
            raise PlanError("--method and --models are required (or --config)")
        plan = plan_from_flags(method, models, base, params)
    report = run_merge(
        plan,
        out,
        resolve=catalog_resolver(ctx.home),
        device=device,
        dtype=dtype,
        seed=seed,
        max_shard_size=max_shard_size,
        progress=not no_progress,
        overwrite=overwrite,
        protected=registered_paths(ctx.home),
    )
    click.echo(
        f"merged {plan.describe()} -> {report.out_dir} "
        f"({report.tensors} tensors, {report.bytes_written / 1e6:.1f} MB written, {report.seconds:.2f} s)"
    )
