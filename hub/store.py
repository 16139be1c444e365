"""The hub's persistent state: one database (SQLite by default, PostgreSQL for large fleets).

The schema is made and moved only by the Alembic migrations in hub/migrations, run by `migrate()`
when the hub starts (or by `rastos-hub db upgrade`). Every mutation also writes a row to `events`
in the same transaction, so the event log never disagrees with what it describes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BindParameter,
    Connection,
    Select,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from hub import strictjson
from hub.errors import Conflict, HubError, NotFound
from hub.roles import Admin, Role
from hub.schema import (
    admins,
    commands,
    compliance_reports,
    credential_changes,
    events,
    hosts,
    rollout_hosts,
    runs,
    sessions,
)

log = logging.getLogger("rastos-hub.store")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The drivers each database is reached with: synchronous ones for migrations, asyncio ones to serve.
DRIVERS = {"sqlite": ("sqlite", "sqlite+aiosqlite"), "postgresql": ("postgresql+psycopg", "postgresql+asyncpg")}
SLOW_COMMIT = 0.5  # seconds: a group commit slower than this is logged (a slow disk delays every report)
FINAL_COMMAND_STATES = frozenset({"done", "failed", "cancelled", "interrupted"})
KEPT_AGENT_EVENTS = 5000  # per host, the newest: older ones are deleted as new ones arrive
PRUNE_EVERY = 500  # events stored for a host between two prunings of its oldest
PAGE_BYTES = 4 << 20  # an /events page holds at most this much (and at least one event)
# Hosts per statement when a hub starts and reads each host's newest events and jobs: one statement
# is a union of per-host queries, each on the host index with its own limit (a window over the whole
# events table would read every kept event of every host). Below SQLite's 500 terms of a union.
LOAD_CHUNK = 250
SECRET_COLUMNS = frozenset({"token_hash", "old_token_hash"})


def _page(rows: Collection[RowMapping | dict[str, Any]]) -> list[dict[str, Any]]:
    """Events given newest first as an /events page: oldest first, at most PAGE_BYTES (and at least one
    event): a page too large loses its oldest events."""
    page: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        size += len(strictjson.dumps(row["detail"])) + 200
        if page and size > PAGE_BYTES:
            break
        page.append(dict(row))
    return page[::-1]


def database_url(value: str) -> str:
    """A path means SQLite; otherwise a SQLAlchemy URL of a supported database."""
    if "://" not in value:
        return f"sqlite:///{Path(value).resolve()}"
    backend = make_url(value).get_backend_name()
    if backend not in DRIVERS:
        raise HubError(f"database: {backend!r} is not supported", hint="use a file path (SQLite) or postgresql://")
    return value


def with_driver(url: str, asynchronous: bool) -> str:
    parsed = make_url(url)
    driver = DRIVERS[parsed.get_backend_name()][1 if asynchronous else 0]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the UI read while agents write; FULL makes a commit survive a power cut.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


MIGRATION_LOCK_KEY = 0x7261736D  # b"rasm"; hub/bus.py's and hub/holders.py's locks are other keys


def migrate(url: str) -> str:
    """Bring the database to the newest schema; returns the revision it is at."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(with_driver(url, asynchronous=False))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # Two migrations at once (a hub starting, the admin's first `host add`) would both create
                # Alembic's table, and one fail; the second waits, then finds the schema at its head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            return _revision(connection)
    finally:
        engine.dispose()


def _revision(connection: Connection) -> str:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision() or ""


# What a host's token is: its hash, the one before a rotation and its end, and whether it is revoked.
TOKEN_COLUMNS = (hosts.c.token_hash, hosts.c.old_token_hash, hosts.c.old_token_expires, hosts.c.token_revoked)


def _without_token(row: RowMapping) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in SECRET_COLUMNS}


@dataclass
class LiveCredentials:
    """What may authenticate now, by hash: each host's tokens (its old one while its grace lasts),
    the admins' tokens and the sessions not expired, each with its admin's role; and when the soonest
    of them expires."""

    hosts: dict[str, set[str]] = field(default_factory=dict)  # host name -> its valid token hashes
    admins: dict[str, str] = field(default_factory=dict)  # token hash -> the admin's role
    sessions: dict[str, str] = field(default_factory=dict)  # session id hash -> its admin's role
    next_expiry: float = float("inf")


def new_token() -> tuple[str, str]:
    """A token and its hash: the hub keeps only the hash, the token is shown once."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    # The tokens are 256 random bits, so a plain hash is as strong as a slow one here.
    return hashlib.sha256(token.encode()).hexdigest()


COMPLIANCE_COLUMNS = ("time", "received", "passed", "failed", "not_applicable", "failed_checks", "command")


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        # Nothing non-finite is written (PostgreSQL refuses it, and it is not JSON); what an older hub
        # wrote to SQLite reads back as null.
        self.engine: AsyncEngine = create_async_engine(
            with_driver(url, asynchronous=True),
            json_serializer=strictjson.dumps_strict,
            json_deserializer=strictjson.loads_stored,
        )
        self._pending_events: list[tuple[list[dict[str, Any]], asyncio.Future[list[dict[str, Any]]]]] = []
        self._pending_facts: dict[str, dict[str, Any]] = {}
        self._unpruned: dict[str, int] = {}  # events stored per host since its oldest were last pruned
        self._writer: asyncio.Task[None] | None = None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as connection:
            yield connection

    async def log(
        self, db: AsyncConnection, actor: str, method: str, detail: dict[str, Any], host: str | None = None
    ) -> dict[str, Any]:
        row = {"time": time.time(), "host": host, "agent_event": None, "actor": actor, "method": method,
               "detail": detail}  # fmt: skip
        result = await db.execute(insert(events).values(**row))
        return {"id": result.inserted_primary_key[0], **row}  # type: ignore[index]

    # Hosts and admins

    async def add_host(self, name: str, groups: list[str], actor: str) -> tuple[str, dict[str, Any]]:
        token, digest = new_token()
        async with self.transaction() as db:
            try:
                await db.execute(insert(hosts).values(name=name, token_hash=digest, groups=groups, created=time.time()))
            except IntegrityError:
                raise Conflict(f"name: a host named {name!r} exists already") from None
            logged = await self.log(db, actor, "HostAdded", {"groups": groups}, host=name)
        return token, logged

    async def remove_host(self, name: str, actor: str) -> dict[str, Any]:
        async with self.transaction() as db:
            await db.execute(delete(commands).where(commands.c.host == name))
            await db.execute(delete(rollout_hosts).where(rollout_hosts.c.host == name))  # it leaves its rollouts
            # Its events stay in the log, but no longer hold the (host, agent_event) key: a host added
            # again under the name starts from cursor 0, and its daemon resends from its first event.
            await db.execute(update(events).where(events.c.host == name).values(agent_event=None))
            result = await db.execute(delete(hosts).where(hosts.c.name == name))
            if result.rowcount == 0:
                raise NotFound(f"name: no host named {name!r}")
            await self._credentials_changed(db)
            return await self.log(db, actor, "HostRemoved", {}, host=name)

    async def replace_host_token(self, name: str, actor: str) -> tuple[str, dict[str, Any]]:
        """A new token for the host, the one before ending now (`host enrol --rotate`), a revoked
        host's too; returns the token and what the host's token columns held, which
        `restore_host_token` puts back if the new one never reached the host."""
        token, digest = new_token()
        async with self.transaction() as db:
            row = (await db.execute(select(*TOKEN_COLUMNS).where(hosts.c.name == name))).mappings().first()
            if row is None:
                raise NotFound(f"name: no host named {name!r}")
            values = {"token_hash": digest, "old_token_hash": None, "old_token_expires": None, "token_revoked": None}
            await db.execute(update(hosts).where(hosts.c.name == name).values(**values))
            await self._credentials_changed(db)  # the agent on the token before is disconnected
            await self.log(db, actor, "HostTokenReplaced", {}, host=name)
        return token, dict(row)

    async def restore_host_token(self, name: str, previous: dict[str, Any], actor: str) -> None:
        async with self.transaction() as db:
            await db.execute(update(hosts).where(hosts.c.name == name).values(**previous))
            await self._credentials_changed(db)  # a connection the new token made ends with it
            await self.log(db, actor, "HostTokenRestored", {}, host=name)

    async def add_admin(self, name: str, role: Role, actor: str) -> str:
        token, digest = new_token()
        async with self.transaction() as db:
            try:
                await db.execute(insert(admins).values(name=name, token_hash=digest, created=time.time(), role=role))
            except IntegrityError:
                raise Conflict(f"name: an admin named {name!r} exists already") from None
            await self.log(db, actor, "AdminAdded", {"admin": name, "role": role.value})
        return token

    async def host_for_token(self, token: str) -> str | None:
        """The host whose token this is: its current one, or the one before a rotation while its
        grace lasts; None for a revoked host's."""
        digest = token_hash(token)
        live = hosts.c.token_revoked.is_(None)
        async with self.engine.connect() as db:
            row = (await db.execute(select(hosts.c.name).where(hosts.c.token_hash == digest, live))).first()
            if row is None:  # two lookups, each by its own index, rather than one OR that may scan
                old = (hosts.c.old_token_hash == digest) & (hosts.c.old_token_expires > time.time())
                row = (await db.execute(select(hosts.c.name).where(old, live))).first()
        return None if row is None else str(row[0])

    async def admin_for_token(self, token: str) -> Admin | None:
        query = select(admins.c.name, admins.c.role).where(admins.c.token_hash == token_hash(token))
        async with self.engine.connect() as db:
            row = (await db.execute(query)).first()
        return None if row is None else Admin(str(row.name), Role(row.role))

    # Token lifecycle: every change that can end a credential moves the revision running hubs poll

    async def rotate_host_token(self, name: str, grace: int, actor: str) -> tuple[str, float | None, dict[str, Any]]:
        """A new token for the host; the one it had stays valid `grace` seconds more (0: it ends
        now). Returns the token, when the old one stops (None: it has) and the logged event. A
        revoked host's rotation gives it a token again; a rotation within another's grace ends the
        older token at once (a host has at most two)."""
        token, digest = new_token()
        now = time.time()
        async with self.transaction() as db:
            query = select(hosts.c.token_hash, hosts.c.token_revoked).where(hosts.c.name == name)
            row = (await db.execute(query)).first()
            if row is None:
                raise NotFound(f"name: no host named {name!r}")
            keep_old = grace > 0 and row.token_revoked is None
            expires = now + grace if keep_old else None
            values = {"token_hash": digest, "old_token_hash": row.token_hash if keep_old else None,
                      "old_token_expires": expires, "token_revoked": None}  # fmt: skip
            await db.execute(update(hosts).where(hosts.c.name == name).values(**values))
            await self._credentials_changed(db)
            logged = await self.log(db, actor, "HostTokenRotated", {"grace_s": grace if keep_old else 0}, host=name)
        return token, expires, logged

    async def revoke_host_token(self, name: str, actor: str) -> dict[str, Any]:
        """The host's token (and an old one in its grace) stop now; the host stays until removed."""
        values = {"old_token_hash": None, "old_token_expires": None, "token_revoked": time.time()}
        async with self.transaction() as db:
            result = await db.execute(update(hosts).where(hosts.c.name == name).values(**values))
            if result.rowcount == 0:
                raise NotFound(f"name: no host named {name!r}")
            await self._credentials_changed(db)
            return await self.log(db, actor, "HostTokenRevoked", {}, host=name)

    async def rotate_admin_token(self, name: str, actor: str) -> str:
        """A new token for the admin; the old one stops now, and so do the sessions it opened."""
        token, digest = new_token()
        async with self.transaction() as db:
            result = await db.execute(update(admins).where(admins.c.name == name).values(token_hash=digest))
            if result.rowcount == 0:
                raise NotFound(f"name: no admin named {name!r}")
            await db.execute(delete(sessions).where(sessions.c.admin == name))
            await self._credentials_changed(db)
            await self.log(db, actor, "AdminTokenRotated", {"admin": name})
        return token

    async def remove_admin(self, name: str, actor: str) -> None:
        async with self.transaction() as db:
            await self._keep_an_admin(db, name, "removing them")
            await db.execute(delete(sessions).where(sessions.c.admin == name))
            result = await db.execute(delete(admins).where(admins.c.name == name))
            if result.rowcount == 0:
                raise NotFound(f"name: no admin named {name!r}")
            await self._credentials_changed(db)
            await self.log(db, actor, "AdminRemoved", {"admin": name})

    async def set_admin_role(self, name: str, role: Role, actor: str) -> Role:
        """Give the admin `role`; returns the one they had. Their open UI streams are closed, so their
        pages connect again and show what the new role allows (hub/credentials.py)."""
        async with self.transaction() as db:
            row = (await db.execute(select(admins.c.role).where(admins.c.name == name))).first()
            if row is None:
                raise NotFound(f"name: no admin named {name!r}")
            before = Role(row.role)
            if before == role:
                return before
            if role != Role.admin:
                await self._keep_an_admin(db, name, f"making them {role.value}")
            await db.execute(update(admins).where(admins.c.name == name).values(role=role))
            await self._credentials_changed(db)
            await self.log(db, actor, "AdminRoleSet", {"admin": name, "role": role.value, "was": before.value})
        return before

    @staticmethod
    async def _keep_an_admin(db: AsyncConnection, name: str, change: str) -> None:
        """Refuse a change that would leave the hub with no admin: nobody could then manage its hosts
        or images through the API. The admins' rows are locked (on PostgreSQL) while it is decided, so
        two such changes at once cannot both pass."""
        query = select(admins.c.name).where(admins.c.role == Role.admin).with_for_update()
        if set((await db.execute(query)).scalars()) == {name}:
            raise Conflict(
                f"name: {name} is the hub's last admin, and {change} would leave it without one",
                hint="make another admin first: rastos-hub admin add NAME --role admin, or admin set-role NAME admin",
            )

    async def admins(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as db:
            rows = (await db.execute(select(admins).order_by(admins.c.name))).mappings().all()
        return [_without_token(row) for row in rows]

    @staticmethod
    async def _credentials_changed(db: AsyncConnection) -> None:
        await db.execute(update(credential_changes).values(revision=credential_changes.c.revision + 1))

    async def credentials_revision(self) -> int:
        async with self.engine.connect() as db:
            return int((await db.execute(select(credential_changes.c.revision))).scalar_one())

    async def live_credentials(self) -> LiveCredentials:
        now = time.time()
        live = LiveCredentials()
        columns = (hosts.c.name, hosts.c.token_hash, hosts.c.old_token_hash, hosts.c.old_token_expires)
        async with self.engine.connect() as db:
            for name, digest, old, expires in await db.execute(select(*columns).where(hosts.c.token_revoked.is_(None))):
                live.hosts[name] = {digest}
                if old is not None and expires > now:
                    live.hosts[name].add(old)
                    live.next_expiry = min(live.next_expiry, expires)
            live.admins = {
                digest: role for digest, role in await db.execute(select(admins.c.token_hash, admins.c.role))
            }
            query = select(sessions.c.id_hash, sessions.c.expires, admins.c.role).join(admins)
            for digest, expires, role in await db.execute(query.where(sessions.c.expires > now)):
                live.sessions[digest] = role
                live.next_expiry = min(live.next_expiry, expires)
        return live

    # Sessions of the web UI: the cookie holds a random id, the database its hash and when it ends

    async def add_session(self, admin: str, lifetime: float) -> tuple[str, float]:
        session, digest = new_token()
        now = time.time()
        async with self.transaction() as db:
            await db.execute(delete(sessions).where(sessions.c.expires <= now))
            await db.execute(insert(sessions).values(id_hash=digest, admin=admin, created=now, expires=now + lifetime))
        return session, now + lifetime

    async def admin_for_session(self, session: str) -> Admin | None:
        query = select(admins.c.name, admins.c.role).join(sessions).where(sessions.c.id_hash == token_hash(session))
        async with self.engine.connect() as db:
            row = (await db.execute(query.where(sessions.c.expires > time.time()))).first()
        return None if row is None else Admin(str(row.name), Role(row.role))

    async def remove_session(self, session: str) -> None:
        async with self.transaction() as db:
            await db.execute(delete(sessions).where(sessions.c.id_hash == token_hash(session)))
            await self._credentials_changed(db)

    async def hosts(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as db:
            rows = (await db.execute(select(hosts).order_by(hosts.c.name))).mappings().all()
        return [_without_token(row) for row in rows]

    async def host(self, name: str) -> dict[str, Any] | None:
        async with self.engine.connect() as db:
            row = (await db.execute(select(hosts).where(hosts.c.name == name))).mappings().first()
        return None if row is None else _without_token(row)

    # What agents report: many small writes, committed in groups

    async def add_agent_events(self, host: str, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store events the caller found newer than the host's cursor and move the cursor, in one
        transaction (an event resent after a lost acknowledgement is never kept twice); returns them
        as stored, once committed. Reports that arrive meanwhile share the commit (see _write_groups)."""
        rows = [{"time": item["time"], "host": host, "agent_event": item["id"], "actor": "agent",
                 "method": item["method"], "detail": item["detail"]} for item in batch]  # fmt: skip
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending_events.append((rows, future))
        self._start_writer()
        return await future

    def save_facts(self, host: str, facts: dict[str, Any]) -> None:
        """Facts go with the next group commit; nobody waits for them (an agent resends them anyway)."""
        self._pending_facts[host] = facts
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups())

    async def _write_groups(self) -> None:
        """One transaction, and a few statements, for every report that arrived since the last one:
        a fleet's reports cost one fsync a group, not one each. A group that fails is committed again
        host by host, so one host's bad rows fail that host alone."""
        await asyncio.sleep(0)  # let the reports that arrive in this same turn of the loop join
        while self._pending_events or self._pending_facts:
            pending, self._pending_events = self._pending_events, []
            facts, self._pending_facts = self._pending_facts, {}
            try:
                await self._commit_group(pending, facts)
            except Exception as error:
                hosts = {batch[0]["host"] for batch, _ in pending} | set(facts)
                if len(hosts) > 1:
                    log.warning("a group commit of %d hosts failed (%s); committing each host apart", len(hosts), error)
                for host in sorted(hosts):
                    own = [(batch, future) for batch, future in pending if batch[0]["host"] == host]
                    await self._commit_host(host, own, {host: facts[host]} if host in facts else {})

    async def _commit_host(
        self, host: str, pending: list[tuple[list[dict[str, Any]], asyncio.Future[list[dict[str, Any]]]]],
        facts: dict[str, Any],
    ) -> None:  # fmt: skip
        try:
            await self._commit_group(pending, facts)
        except Exception as error:  # this host's writers hear of it; nothing of theirs was kept
            log.error("the reports of %s could not be stored: %s", host, error)
            for _, future in pending:
                if not future.done():
                    future.set_exception(error)

    async def _commit_group(
        self, pending: list[tuple[list[dict[str, Any]], asyncio.Future[list[dict[str, Any]]]]], facts: dict[str, Any]
    ) -> None:
        rows = [row for batch, _ in pending for row in batch]
        started = time.monotonic()
        async with self.transaction() as db:
            ids = await self._insert_events(db, rows)
            await self._update_hosts(db, rows, facts)
        if (took := time.monotonic() - started) > SLOW_COMMIT:
            log.warning("a group commit of %d events and %d facts took %.2fs", len(rows), len(facts), took)
        for row, event_id in zip(rows, ids, strict=True):
            row["id"] = event_id
        for batch, future in pending:
            if not future.done():
                future.set_result(batch)

    @staticmethod
    async def _insert_events(db: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
        if not rows:
            return []
        statement = insert(events).returning(events.c.id, sort_by_parameter_order=True)
        return [int(event_id) for event_id in (await db.execute(statement, rows)).scalars().all()]

    async def _update_hosts(self, db: AsyncConnection, rows: list[dict[str, Any]], facts: dict[str, Any]) -> None:
        now = time.time()
        cursors = {row["host"]: row["agent_event"] for row in rows}  # rows are in order: the last one wins
        if cursors:
            statement = update(hosts).where(hosts.c.name == bindparam("b_host"))
            await db.execute(
                statement.values(last_event=bindparam("b_last"), last_seen=now),
                [{"b_host": host, "b_last": last} for host, last in cursors.items()],
            )
            await self._prune(db, rows)
        if facts:
            statement = update(hosts).where(hosts.c.name == bindparam("b_host"))
            await db.execute(
                statement.values(facts=bindparam("b_facts", type_=JSON), last_seen=now),
                [{"b_host": host, "b_facts": value} for host, value in facts.items()],
            )

    async def _prune(self, db: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        """Each host keeps its newest KEPT_AGENT_EVENTS events; its older ones go, a few hundred at a time."""
        for row in rows:
            self._unpruned[row["host"]] = self._unpruned.get(row["host"], 0) + 1
        for host in {row["host"] for row in rows}:
            if self._unpruned[host] < PRUNE_EVERY:
                continue
            self._unpruned[host] = 0
            own = (events.c.host == host) & events.c.agent_event.is_not(None)
            newest = select(events.c.agent_event).where(own).order_by(events.c.agent_event.desc())
            oldest_kept = newest.offset(KEPT_AGENT_EVENTS - 1).limit(1).scalar_subquery()
            await db.execute(delete(events).where(own, events.c.agent_event < oldest_kept))

    async def events(
        self, limit: int, host: str | None = None, before: int | None = None, *, actor: str | None = None,
        method: str | None = None, since: float | None = None, until: float | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The newest `limit` events (and at most PAGE_BYTES) that match every filter given, oldest
        first: of a host, before an id, by an actor, of a method, from `since` to `until` (seconds)."""
        query = select(events).order_by(events.c.id.desc()).limit(limit)
        for column, value in ((events.c.host, host), (events.c.actor, actor), (events.c.method, method)):
            if value is not None:
                query = query.where(column == value)
        if before is not None:
            query = query.where(events.c.id < before)
        if since is not None:
            query = query.where(events.c.time >= since)
        if until is not None:
            query = query.where(events.c.time <= until)
        async with self.engine.connect() as db:
            rows = (await db.execute(query)).mappings().all()
        return _page(rows)

    async def newest_per_host(
        self, names: list[str], query: Callable[[BindParameter[str]], Select[Any]]
    ) -> dict[str, list[dict[str, Any]]]:
        """What `query(host)` (a limited query with a `host` column, the host a bound parameter) finds
        for each host, in as few statements as LOAD_CHUNK allows, on one connection: a hub's start reads
        each host's newest events and jobs, and a statement for each host made that start take half a
        minute for 10,000. A chunk's statement is built once and run with each chunk's names."""
        found: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        statements: dict[int, Any] = {}
        async with self.engine.connect() as db:
            for start in range(0, len(names), LOAD_CHUNK):
                chunk = names[start : start + LOAD_CHUNK]
                if len(chunk) not in statements:
                    parts = [query(bindparam(f"host_{i}", type_=String)).subquery().select() for i in range(len(chunk))]
                    statements[len(chunk)] = parts[0] if len(parts) == 1 else union_all(*parts)
                values = {f"host_{i}": name for i, name in enumerate(chunk)}
                for row in (await db.execute(statements[len(chunk)], values)).mappings():
                    found[row["host"]].append(dict(row))
        return found

    async def newest_events_per_host(self, names: list[str], limit: int) -> dict[str, list[dict[str, Any]]]:
        """Each host's newest `limit` events (and at most PAGE_BYTES), oldest first, as `events(limit,
        host=name)` gives them one host at a time."""
        found = await self.newest_per_host(
            names, lambda host: select(events).where(events.c.host == host).order_by(events.c.id.desc()).limit(limit)
        )
        return {name: _page(sorted(rows, key=lambda row: -row["id"])) for name, rows in found.items()}

    async def host_events_of_each(
        self, names: list[str], methods: Collection[str], limit: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Each host's newest `limit` events of these methods, oldest first (its boot history, at start)."""
        wanted = list(methods)

        def newest(host: BindParameter[str]) -> Select[Any]:
            query = select(events).where(events.c.host == host, events.c.method.in_(wanted))
            return query.order_by(events.c.id.desc()).limit(limit)

        found = await self.newest_per_host(names, newest)
        return {name: sorted(rows, key=lambda row: row["id"]) for name, rows in found.items()}

    # Compliance reports: each host's newest

    async def save_compliance(self, host: str, report: dict[str, Any]) -> dict[str, Any]:
        """Replace the host's report with this one and log it (ComplianceReport), in one transaction."""
        row = {key: report[key] for key in COMPLIANCE_COLUMNS}
        async with self.transaction() as db:
            await db.execute(delete(compliance_reports).where(compliance_reports.c.host == host))
            await db.execute(insert(compliance_reports).values(host=host, **row))
            detail = {key: report[key] for key in ("passed", "failed", "not_applicable", "score", "command")}
            detail["failed_checks"] = [check["id"] for check in report["failed_checks"]]
            return await self.log(db, "agent", "ComplianceReport", detail, host=host)

    async def compliance_reports(self) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as db:
            rows = (await db.execute(select(compliance_reports))).mappings().all()
        return {row["host"]: {key: row[key] for key in COMPLIANCE_COLUMNS} for row in rows}

    # Runs and commands

    async def add_run(self, run: dict[str, Any], host_names: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        now = time.time()
        made = [
            {"id": secrets.token_hex(16), "run_id": run["id"], "host": name, "state": "pending", "job_id": None,
             "result": None, "created": now, "sent": None, "finished": None}
            for name in host_names
        ]  # fmt: skip
        async with self.transaction() as db:
            await db.execute(insert(runs).values(**run))
            try:
                if made:
                    await db.execute(insert(commands), made)
            except IntegrityError:  # `rastos-hub host remove` ran beside this hub
                raise Conflict("target: a host of this run was removed meanwhile; try again") from None
            detail = {"run": run["id"], "hosts": host_names, "ops": [s["op"] for s in run["steps"]]}
            if run.get("compliance") is not None:
                detail["compliance"] = run["compliance"]["action"]
            logged = await self.log(db, run["admin"], "RunStarted", detail)
        return made, logged

    async def update_command(self, command_id: str, **values: Any) -> None:
        async with self.transaction() as db:
            await db.execute(update(commands).where(commands.c.id == command_id).values(**values))

    async def finish_run(self, run_id: str, state: str, actor: str) -> dict[str, Any]:
        async with self.transaction() as db:
            await db.execute(update(runs).where(runs.c.id == run_id).values(state=state, finished=time.time()))
            return await self.log(db, actor, "RunFinished", {"run": run_id, "state": state})

    async def runs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` runs, and every run still running however old: a restarted hub must go
        on with all of them."""
        async with self.engine.connect() as db:
            newest = (await db.execute(select(runs).order_by(runs.c.created.desc()).limit(limit))).mappings().all()
            running = (await db.execute(select(runs).where(runs.c.state == "running"))).mappings().all()
        by_id = {row["id"]: dict(row) for row in [*running, *newest]}
        return sorted(by_id.values(), key=lambda run: run["created"])

    async def finished_commands(self, names: list[str], limit: int) -> dict[str, list[dict[str, Any]]]:
        """Each host's newest `limit` commands that ended done or failed, newest first, each with its
        run (`run`: id, admin, steps, flags): where a host's last change is found at start."""

        def newest(host: BindParameter[str]) -> Select[Any]:
            return (
                select(commands, runs.c.admin, runs.c.steps, runs.c.flags)
                .join(runs, runs.c.id == commands.c.run_id)
                .where(commands.c.host == host, commands.c.state.in_(["done", "failed"]))
                .order_by(commands.c.finished.desc())
                .limit(limit)
            )

        found = await self.newest_per_host(names, newest)
        commands_of: dict[str, list[dict[str, Any]]] = {}
        for name, rows in found.items():
            commands_of[name] = []
            for row in sorted(rows, key=lambda row: -(row["finished"] or 0)):
                item = {column.key: row[column.key] for column in commands.c}
                item["run"] = {"id": row["run_id"], "admin": row["admin"], "steps": row["steps"], "flags": row["flags"]}
                commands_of[name].append(item)
        return commands_of

    async def commands(self, run_ids: list[str]) -> list[dict[str, Any]]:
        if not run_ids:
            return []
        async with self.engine.connect() as db:
            query = select(commands).where(commands.c.run_id.in_(run_ids)).order_by(commands.c.created)
            rows = (await db.execute(query)).mappings().all()
        return [dict(row) for row in rows]
