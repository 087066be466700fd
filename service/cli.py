"""`simmerge serve`: run the REST service with uvicorn."""

from __future__ import annotations

import click

from simmerge.cli import Context, home_option, pass_context


@click.command("serve")
@home_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 in a container)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"])
)
@pass_context
def serve(ctx: Context, host: str, port: int, log_level: str) -> None:
    """Serve the REST API (OpenAPI at /docs); settings come from SIMMERGE_* variables and .env."""
    import logging

    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the catalog is opened (and checked) often
    settings = ServiceSettings(home=ctx.home) if ctx.home_option is not None else ServiceSettings()
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
