"""64-bit ids an agent chooses, on PostgreSQL too; sessions for the web UI's login.

The protocol allows event and job ids up to 2**62, and PostgreSQL's INTEGER stops at 2**31 - 1:
an agent whose event id passed it could not be stored, and resent it forever. SQLite's INTEGER is
64-bit already, so only PostgreSQL's columns (and the event id's sequence) change.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDENED = (("hosts", "last_event"), ("commands", "job_id"), ("events", "id"), ("events", "agent_event"))


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column in WIDENED:
            op.alter_column(table, column, type_=sa.BigInteger, existing_type=sa.Integer)
        op.execute("ALTER SEQUENCE events_id_seq AS bigint")
    op.create_table(
        "sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("admin", sa.String(64), sa.ForeignKey("admins.name", ondelete="CASCADE"), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sessions")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER SEQUENCE events_id_seq AS integer")
        for table, column in WIDENED:
            op.alter_column(table, column, type_=sa.Integer, existing_type=sa.BigInteger)
