"""Job leases: the dispatcher that runs a job and when it last vouched for it.

Revision ID: 0002_job_leases
Revises: 0001_service_tables
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_leases"
down_revision = "0001_service_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("heartbeat_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
