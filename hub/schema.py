"""The hub's tables, in SQLAlchemy Core so one schema serves SQLite and PostgreSQL.

The schema changes only through migrations (hub/migrations, run by Alembic); this module says what
the newest migration leaves, and a test checks that the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

# Ids an agent chooses (its events, its jobs) are 64-bit: the protocol allows up to 2**62. SQLite's
# INTEGER is 64-bit already, and only INTEGER makes a primary key SQLite's own row id.
ID = BigInteger().with_variant(Integer(), "sqlite")

hosts = Table(
    "hosts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 of the agent's token
    Column("groups", JSON, nullable=False),  # list of group names
    Column("created", Float, nullable=False),
    Column("last_seen", Float),
    Column("last_event", ID, nullable=False, server_default="0"),  # the agent's newest event the hub has
    Column("facts", JSON),  # the agent's newest report: hostname, version, boot state, snapshots, ops
    # After `host rotate --grace`: the token before, accepted beside the new one until it expires.
    Column("old_token_hash", String(64)),
    Column("old_token_expires", Float),
    Column("token_revoked", Float),  # when `host revoke` ended its token; None while it has one
)
Index("hosts_old_token_hash", hosts.c.old_token_hash, unique=True)

admins = Table(
    "admins",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
    # viewer, operator or admin (hub/roles.py); the admins made before roles became admins (migration 0006).
    Column("role", String(16), nullable=False, server_default="admin"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created", Float, nullable=False),
    Column("admin", String(64), nullable=False),
    Column("target", JSON, nullable=False),  # {"hosts": [...]}, {"group": NAME} or {"all": true}
    Column("steps", JSON, nullable=False),  # [{"op": ..., "params": {...}}]; [] for a compliance run
    # A compliance run's {"action": "scan" | "remediate", "checks": [...]}; None for a run of steps.
    Column("compliance", JSON),
    Column("flags", Integer, nullable=False),
    Column("parallelism", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # running, complete, partial, failed, cancelled
    Column("finished", Float),
)

commands = Table(
    "commands",
    metadata,
    # Also the idempotency key the agent stores with the job it runs: a command sent twice runs once.
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("runs.id"), nullable=False, index=True),
    Column("host", String(64), ForeignKey("hosts.name", ondelete="CASCADE"), nullable=False, index=True),
    Column("state", String(16), nullable=False),  # pending, sent, queued, running, done, failed, ...
    Column("job_id", ID),  # the agent's job
    Column("result", JSON),
    Column("created", Float, nullable=False),
    Column("sent", Float),
    Column("finished", Float),
)

# Each host's newest compliance report (the agent's `compliance` frame): what its score is made of.
compliance_reports = Table(
    "compliance_reports",
    metadata,
    Column("host", String(64), ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
    Column("time", Float, nullable=False),  # when the host scanned, by its clock
    Column("received", Float, nullable=False),  # when the hub stored it
    Column("passed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("not_applicable", Integer, nullable=False),
    Column("failed_checks", JSON, nullable=False),  # [{"id", "title", "severity", "finding"}]
    Column("command", String(36)),  # the command of the run that asked for it; None for one unasked
)

events = Table(
    "events",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("host", String(64), index=True),  # None: the hub's own mutation
    Column("agent_event", ID),  # the agent's event id: the key that keeps a resent event single
    Column("actor", String(64), nullable=False),  # admin name, "agent", or "hub"
    Column("method", String(64), nullable=False),
    Column("detail", JSON, nullable=False),
    UniqueConstraint("host", "agent_event", name="events_host_agent_event"),
)

# One row: a counter that every change able to end a credential moves (a token rotated or revoked,
# an admin removed, a session ended), in the same transaction. A running hub polls it to close the
# connections whose credentials ended, whichever process made the change.
credential_changes = Table(
    "credential_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("revision", ID, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    # A web UI's login: the cookie holds a random id, the table only its sha256 (as with tokens).
    Column("id_hash", String(64), primary_key=True),
    Column("admin", String(64), ForeignKey("admins.name", ondelete="CASCADE"), nullable=False),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
)

images = Table(
    "images",
    metadata,
    # An update bundle the hub keeps (hub/images.py): the file is DATA/images/SHA256.rbundle.
    Column("id", String(36), primary_key=True),  # the first 16 hex digits of its sha256
    Column("sha256", String(64), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("version", String(64), nullable=False, index=True),
    Column("parent_version", String(64)),  # set for a delta: only hosts on that version can take it
    Column("key_id", String(16), nullable=False),  # the key its signature names
    Column("signature_checked", Boolean, nullable=False),  # against the hub's trusted keys
    Column("uploaded", Float, nullable=False),
    Column("uploaded_by", String(64), nullable=False),
    Column("manifest", JSON, nullable=False),  # manifest.json as the bundle carries it
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created", Float, nullable=False),
    Column("admin", String(64), nullable=False),
    # No foreign key: a finished rollout outlives its image (an image in use cannot be removed).
    Column("image", String(36), nullable=False, index=True),
    Column("profile", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("target", JSON, nullable=False),  # {"hosts": [...]}, {"group": NAME} or {"all": true}
    Column("canary", Integer, nullable=False),
    Column("wave_percent", Integer, nullable=False),
    Column("health_timeout_s", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # running, paused, halted, complete, aborted
    Column("reason", String(1024)),  # why it is halted, while it is: the host and what happened
    # Each change of its state: [{"time", "state", "by", "reason"}], the newest MAX_HISTORY (hub/rollouts.py).
    Column("history", JSON, nullable=False, server_default="[]"),
    Column("wave", Integer, nullable=False),  # the wave under way (1 is the canary), 0 before any
    Column("waves", Integer, nullable=False),
    Column("finished", Float),
)

rollout_hosts = Table(
    "rollout_hosts",
    metadata,
    Column("rollout_id", String(36), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    Column("host", String(64), ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True, index=True),
    Column("wave", Integer, nullable=False),  # 0: skipped, it ran the version already
    # pending, sent, staging, staged, done, failed, skipped, cancelled
    Column("state", String(16), nullable=False),
    Column("update_id", String(36), nullable=False, unique=True),  # the id of the agent's `update` frame
    Column("sent", Float),
    Column("finished", Float),
    Column("detail", String(4096)),  # the agent's word on a failed staging, or why the hub failed it
    Column("from_version", String(64)),  # the image version the host ran when the update was sent
    # The entry a boot had fallen back from when the update was sent: that fallback is not this update's.
    Column("fallback_before", String(4096)),
)

# What one hub process tells the others that share a PostgreSQL database (hub/bus.py): each change it
# published to its UIs, each agent link made or lost, each frame for an agent connected elsewhere.
# Written only under the hubs' shared dispatch lock, so ids are committed in order; kept minutes.
bus = Table(
    "bus",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("origin", String(32), nullable=False),  # the hub process that wrote it (its bus id)
    Column("time", Float, nullable=False, index=True),
    Column("body", JSON, nullable=False),
)
