"""What hub processes sharing one PostgreSQL database tell each other (SQLite takes one process).

Each `rastos-hub serve` keeps the fleet in memory (hub/fleet.py); with several on one database, the
database is the source of truth and the bus keeps their memories equal. Two things make it so:

- The dispatch lock: every change of the fleet is made under a PostgreSQL advisory lock the hubs
  share (besides each one's own asyncio lock). A hub that takes it first reads what the others wrote
  since it last looked, so it decides (what to send, how many commands are in flight) on the current
  state, never a stale one.
- The `bus` table: before a hub lets the lock go, it writes there what it changed (the deltas its
  own UIs got, agent links made and lost, frames for agents connected to another hub), in one
  transaction that also NOTIFYs the others. Written only under the lock, its ids are committed in
  order, so "every row after the last one I read" never skips one. The NOTIFY wakes the others to
  read at once; it only wakes them, the rows carry the payload (a NOTIFY holds under 8000 bytes, a
  run of many hosts does not fit).

Which agent is connected to which hub lives only in the hubs' memory: a hub that starts says `hello`,
and the others announce their agents again. Each hub process names its bus session `rastos-hub bus
ID`: a hub whose session has gone from pg_stat_activity has died, and the agents it held are offline
until they connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from hub import strictjson
from hub.store import with_driver

log = logging.getLogger("rastos-hub.bus")

LOCK_KEY = 0x72617375  # b"rasu": the dispatch lock; hub/holders.py's serving lock is another key
CHANNEL = "rastos_hub_bus"
NAME_PREFIX = "rastos-hub bus "
KEPT = 300.0  # seconds a row stays; each hub reads the bus at least every second (its rollouts tick)


class Bus:
    def __init__(self, url: str) -> None:
        self.id = secrets.token_hex(8)
        self.woken = asyncio.Event()  # set by every NOTIFY: there may be rows to read
        args = {"server_settings": {"application_name": NAME_PREFIX + self.id}}
        self._engine = create_async_engine(with_driver(url, asynchronous=True), poolclass=NullPool, connect_args=args)
        self._work: AsyncConnection | None = None  # the lock, reads and writes: one user at a time
        self._listen: AsyncConnection | None = None

    async def start(self) -> None:
        self._work = await self._engine.connect()
        await self.listen()

    async def listen(self) -> None:
        """Listen, on a session of its own, unless it listens already (called again at each tick: a
        session lost with the database comes back, and rows written meanwhile are read at once)."""
        if self._listen is not None:
            if not (await self._listen.get_raw_connection()).driver_connection.is_closed():  # type: ignore[union-attr]
                return
            with contextlib.suppress(Exception):
                await self._listen.close()
        self._listen = await self._engine.connect()
        raw = await self._listen.get_raw_connection()
        await raw.driver_connection.add_listener(CHANNEL, self._notified)  # type: ignore[union-attr]
        self.woken.set()

    def _notified(self, *_args: Any) -> None:
        self.woken.set()

    async def close(self) -> None:
        for connection in (self._listen, self._work):
            if connection is not None:
                await connection.close()
        await self._engine.dispose()

    async def _raw(self) -> Any:
        assert self._work is not None, "started"
        raw = (await self._work.get_raw_connection()).driver_connection
        if raw is not None and not raw.is_closed():
            return raw
        # The session was lost (the database restarted, say), and any lock it held with it: a new one.
        with contextlib.suppress(Exception):
            await self._work.close()
        self._work = await self._engine.connect()
        return (await self._work.get_raw_connection()).driver_connection

    async def lock(self) -> None:
        await (await self._raw()).execute("SELECT pg_advisory_lock($1)", LOCK_KEY)

    async def unlock(self) -> None:
        await (await self._raw()).execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)

    async def last(self) -> int:
        return int(await (await self._raw()).fetchval("SELECT coalesce(max(id), 0) FROM bus"))

    async def read(self, after: int) -> list[tuple[int, str, dict[str, Any]]]:
        """The rows after `after`, in order: their id, the hub that wrote each, and what it says."""
        rows = await (await self._raw()).fetch("SELECT id, origin, body FROM bus WHERE id > $1 ORDER BY id", after)
        return [(int(row["id"]), str(row["origin"]), _json(row["body"])) for row in rows]

    async def write(self, bodies: list[dict[str, Any]]) -> None:
        now = time.time()
        rows = []
        for body in bodies:
            try:
                rows.append((self.id, now, strictjson.dumps_strict(body)))
            except ValueError:  # a non-finite number: the edge refuses them, so never; kept out, not retried
                log.error("a %s for the other hubs held a non-finite number: not sent", body.get("kind"))
        raw = await self._raw()
        async with raw.transaction():
            await raw.executemany("INSERT INTO bus (origin, time, body) VALUES ($1, $2, $3::json)", rows)
            await raw.execute("SELECT pg_notify($1, $2)", CHANNEL, self.id)

    async def prune(self) -> None:
        await (await self._raw()).execute("DELETE FROM bus WHERE time < $1", time.time() - KEPT)

    async def alive(self) -> set[str]:
        """The bus ids of the hub processes connected to the database now."""
        rows = await (await self._raw()).fetch(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1", NAME_PREFIX + "%"
        )
        return {str(row["application_name"]).removeprefix(NAME_PREFIX) for row in rows}


def _json(value: Any) -> Any:
    # SQLAlchemy's asyncpg dialect gives its connections a json codec that decodes; a bare one does not.
    return strictjson.loads_stored(value) if isinstance(value, str) else value
