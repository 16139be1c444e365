"""The first schema: hosts, admins, runs, commands and the event log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("groups", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("last_event", sa.Integer, nullable=False, server_default="0"),
        sa.Column("facts", sa.JSON),
    )
    op.create_table(
        "admins",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("admin", sa.String(64), nullable=False),
        sa.Column("target", sa.JSON, nullable=False),
        sa.Column("steps", sa.JSON, nullable=False),
        sa.Column("flags", sa.Integer, nullable=False),
        sa.Column("parallelism", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("finished", sa.Float),
    )
    op.create_table(
        "commands",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_id", sa.Integer),
        sa.Column("result", sa.JSON),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("sent", sa.Float),
        sa.Column("finished", sa.Float),
    )
    op.create_index("ix_commands_run_id", "commands", ["run_id"])
    op.create_index("ix_commands_host", "commands", ["host"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("host", sa.String(64)),
        sa.Column("agent_event", sa.Integer),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.UniqueConstraint("host", "agent_event", name="events_host_agent_event"),
    )
    op.create_index("ix_events_host", "events", ["host"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("commands")
    op.drop_table("runs")
    op.drop_table("admins")
    op.drop_table("hosts")
