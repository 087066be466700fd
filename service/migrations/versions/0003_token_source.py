"""Token origin and revocation time: configured tokens are reconciled with the configuration at
every start, tokens made through the API are not.

Rows older than this revision cannot be told apart, so they count as configured: one that is not in
the configuration is removed at the next start (fail closed; an API token must be made again).

Revision ID: 0003_token_source
Revises: 0002_job_leases
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_token_source"
down_revision = "0002_job_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="config"))
        batch.add_column(sa.Column("revoked_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("source")
