"""Compliance scans and remediations dispatched through the hub, and each host's latest report.

A run may now carry `compliance` ({"action": "scan" | "remediate", "checks": [...]}) instead of steps
(its `steps` is then []), and `compliance_reports` keeps each host's newest report: the counts its
score is made from and its failed checks. Only a column and a table are added: no table is rebuilt.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("compliance", sa.JSON))
    op.create_table(
        "compliance_reports",
        sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("received", sa.Float, nullable=False),
        sa.Column("passed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("not_applicable", sa.Integer, nullable=False),
        sa.Column("failed_checks", sa.JSON, nullable=False),
        sa.Column("command", sa.String(36)),
    )


def downgrade() -> None:
    op.drop_table("compliance_reports")
    op.drop_column("runs", "compliance")
