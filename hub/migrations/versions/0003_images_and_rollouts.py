"""Images (update bundles the hub keeps) and rollouts of them to hosts, wave by wave.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("parent_version", sa.String(64)),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("signature_checked", sa.Boolean, nullable=False),
        sa.Column("uploaded", sa.Float, nullable=False),
        sa.Column("uploaded_by", sa.String(64), nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
    )
    op.create_index("ix_images_version", "images", ["version"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("admin", sa.String(64), nullable=False),
        sa.Column("image", sa.String(36), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("target", sa.JSON, nullable=False),
        sa.Column("canary", sa.Integer, nullable=False),
        sa.Column("wave_percent", sa.Integer, nullable=False),
        sa.Column("health_timeout_s", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1024)),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("waves", sa.Integer, nullable=False),
        sa.Column("finished", sa.Float),
    )
    op.create_index("ix_rollouts_image", "rollouts", ["image"])
    op.create_table(
        "rollout_hosts",
        sa.Column("rollout_id", sa.String(36), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("update_id", sa.String(36), nullable=False, unique=True),
        sa.Column("sent", sa.Float),
        sa.Column("finished", sa.Float),
        sa.Column("detail", sa.String(4096)),
        sa.Column("from_version", sa.String(64)),
        sa.Column("fallback_before", sa.String(4096)),
    )
    op.create_index("ix_rollout_hosts_host", "rollout_hosts", ["host"])


def downgrade() -> None:
    op.drop_table("rollout_hosts")
    op.drop_table("rollouts")
    op.drop_table("images")
