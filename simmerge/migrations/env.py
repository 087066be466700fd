"""Alembic environment for the catalog tables; run through `simmerge.catalog.migrate`."""

from alembic import context

from simmerge.catalog import VERSION_TABLE, CatalogBase

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run catalog migrations through simmerge.catalog.migrate(engine)")
context.configure(
    connection=connection,
    target_metadata=CatalogBase.metadata,
    version_table=config.get_main_option("version_table") or VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
