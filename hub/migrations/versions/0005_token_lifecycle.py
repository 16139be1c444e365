"""Tokens that can be rotated (the old one kept for a grace period) and revoked, and a counter that
tells running hubs when a credential ended, so they close the connections it opened.

A host's row keeps its token's hash as before; `old_token_hash` holds the one before a rotation
until `old_token_expires`, and `token_revoked` says when `host revoke` ended it (the host stays, with
its history, until it is given a new token or removed). Only columns are added and a table made:
hosts is never rebuilt, which on SQLite (foreign keys on) would cascade into its commands.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hosts", sa.Column("old_token_hash", sa.String(64)))
    op.add_column("hosts", sa.Column("old_token_expires", sa.Float))
    op.add_column("hosts", sa.Column("token_revoked", sa.Float))
    op.create_index("hosts_old_token_hash", "hosts", ["old_token_hash"], unique=True)
    changes = op.create_table(
        "credential_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    )
    op.bulk_insert(changes, [{"id": 1, "revision": 0}])


def downgrade() -> None:
    op.drop_table("credential_changes")
    op.drop_index("hosts_old_token_hash", "hosts")
    # Dropped in place (SQLite 3.35 and later can), not by rebuilding hosts: see above.
    for column in ("token_revoked", "old_token_expires", "old_token_hash"):
        op.drop_column("hosts", column)
