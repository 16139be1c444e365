"""The bus: what hub processes sharing one PostgreSQL database tell each other (hub/bus.py). SQLite
gets the table too, unused: one schema for both, and SQLite takes one hub process.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "bus",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    op.create_index("ix_bus_time", "bus", ["time"])


def downgrade() -> None:
    op.drop_index("ix_bus_time", "bus")
    op.drop_table("bus")
