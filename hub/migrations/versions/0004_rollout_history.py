"""A rollout's history: each change of its state, when, by whom, and why it halted.

A rollout's `reason` says why it is halted only while it is: a resume clears it. The history keeps
it, and who paused, resumed or aborted the rollout. Rollouts made before this get theirs from the
event log, which has every such change (the hub's own events are never pruned).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The events that changed a rollout's state (hub/rollouts.py), and the state each left it in.
STATES = {"RolloutStarted": "running", "RolloutPaused": "paused", "RolloutHalted": "halted",
          "RolloutResumed": "running", "RolloutAborted": "aborted", "RolloutFinished": "complete"}  # fmt: skip
KEPT = 32  # entries per rollout, the newest: hub/rollouts.py's MAX_HISTORY when this was written


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("history", sa.JSON, nullable=False, server_default="[]"))
    bind = op.get_bind()
    events = sa.table("events", sa.column("id"), sa.column("time"), sa.column("host"), sa.column("actor"),
                      sa.column("method"), sa.column("detail", sa.JSON))  # fmt: skip
    rollouts = sa.table("rollouts", sa.column("id"), sa.column("history", sa.JSON))
    query = sa.select(events).where(events.c.method.in_(list(STATES)), events.c.host.is_(None)).order_by(events.c.id)
    histories: dict[str, list[dict[str, Any]]] = {}
    for row in bind.execute(query):
        detail = row.detail if isinstance(row.detail, dict) else {}
        if not isinstance(rollout := detail.get("rollout"), str):
            continue
        reason = detail.get("reason") if row.method == "RolloutHalted" else None
        entry = {"time": row.time, "state": STATES[row.method], "by": row.actor, "reason": reason}
        histories.setdefault(rollout, []).append(entry)
    for rollout, history in histories.items():
        bind.execute(sa.update(rollouts).where(rollouts.c.id == rollout).values(history=history[-KEPT:]))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("history")
