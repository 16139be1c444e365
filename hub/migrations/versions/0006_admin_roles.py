"""A role for each admin (hub/roles.py): viewer, operator or admin.

Every admin made before this could do everything, and still can: they become `admin`. Only a column
is added: admins is never rebuilt, which on SQLite (foreign keys on) would cascade into its sessions.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("admins", sa.Column("role", sa.String(16), nullable=False, server_default="admin"))


def downgrade() -> None:
    op.drop_column("admins", "role")
