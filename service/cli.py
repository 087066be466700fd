"""`simmerge serve`: run the REST service with uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from simmerge.cli import Context, home_option, pass_context

if TYPE_CHECKING:
    from service.settings import ServiceSettings


@click.command("serve")
@home_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 in a container)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"])
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Web worker processes [default: SIMMERGE_WORKERS, else 1]; jobs are dispatched by one process.",
)
@pass_context
def serve(ctx: Context, host: str, port: int, log_level: str, workers: int | None) -> None:
    """Serve the REST API (OpenAPI at /docs); settings come from SIMMERGE_* variables and .env."""
    import logging

    from service.server import serve as run_server
    from service.settings import drop_secret_environment, load_settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the catalog is opened (and checked) often
    settings = load_settings(home=ctx.home) if ctx.home_option is not None else load_settings()
    drop_secret_environment()
    check_database(settings)
    run_server(settings, host=host, port=port, log_level=log_level, workers=workers or settings.workers)


def check_database(settings: ServiceSettings) -> None:
    """Reach the database before serving, so an unreachable one is one line (password masked),
    not a traceback from the app's start-up."""
    from service.settings import SettingsInvalidError, mask_url
    from service.store import Store

    try:
        store = Store(settings.db_url)
        try:
            store.ping()
        finally:
            store.dispose()
    except Exception as exc:
        raise SettingsInvalidError(
            f"SIMMERGE_DATABASE_URL {mask_url(settings.db_url)!r}: the database cannot be reached "
            f"({type(exc).__name__})"
        ) from None
