"""The hub's tables, in SQLAlchemy Core so one schema serves SQLite and PostgreSQL.

The schema changes only through migrations (hub/migrations, run by Alembic); this module says what
the newest migration leaves, and a test checks that the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
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
)

admins = Table(
    "admins",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created", Float, nullable=False),
    Column("admin", String(64), nullable=False),
    Column("target", JSON, nullable=False),  # {"hosts": [...]}, {"group": NAME} or {"all": true}
    Column("steps", JSON, nullable=False),  # [{"op": ..., "params": {...}}]
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

sessions = Table(
    "sessions",
    metadata,
    # A web UI's login: the cookie holds a random id, the table only its sha256 (as with tokens).
    Column("id_hash", String(64), primary_key=True),
    Column("admin", String(64), ForeignKey("admins.name", ondelete="CASCADE"), nullable=False),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
)
