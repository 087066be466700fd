"""Catalog: checkpoints and tasks.

Revision ID: 0001_catalog
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_catalog"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("architecture", sa.String(200), nullable=False),
        sa.Column("base", sa.String(200), nullable=True),
        sa.Column("family", sa.String(200), nullable=True),
        sa.Column("tasks", sa.JSON, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("plan", sa.JSON, nullable=True),
        sa.Column("num_parameters", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_checkpoints_name", "checkpoints", ["name"], unique=True)
    op.create_index("ix_checkpoints_content_hash", "checkpoints", ["content_hash"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("held_out", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tasks_name", "tasks", ["name"], unique=True)


def downgrade() -> None:
    op.drop_table("tasks")
    op.drop_table("checkpoints")
