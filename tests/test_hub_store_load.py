"""What a hub reads of each host when it starts (hub/store.py, newest_per_host): each host's newest
events, boot events and finished jobs, read a chunk of hosts per statement, are what one query per
host finds, on SQLite and PostgreSQL, across more hosts than a chunk holds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from hub.schema import commands, events, runs
from hub.store import LOAD_CHUNK, Store, database_url, migrate

HOSTS = LOAD_CHUNK + 7  # a full chunk and a short one


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(str(tmp_path / "hub.db"))
    url: str = request.getfixturevalue("postgresql_database")
    return url


def test_each_hosts_newest_rows_are_read_in_chunks_as_one_query_a_host_reads_them(store_url: str) -> None:
    migrate(store_url)

    async def scenario() -> None:
        store = Store(store_url)
        try:
            names = [f"host-{n:03d}" for n in range(HOSTS)]
            for name in names:
                await store.add_host(name, [], "cli")
            now = time.time()
            # Host n has n % 7 boot events among 3 * (n % 5) others, and n % 4 finished commands.
            rows = []
            for n, name in enumerate(names):
                methods = ["Booted"] * (n % 7) + ["Apply"] * (3 * (n % 5))
                rows += [{"time": now + i, "host": name, "agent_event": i + 1, "actor": "agent", "method": method,
                          "detail": {"i": i}} for i, method in enumerate(methods[::2] + methods[1::2])]  # fmt: skip
            run = {"id": "r1", "admin": "alice", "steps": [{"op": "motd", "params": {}}], "flags": 0, "parallelism": 1,
                   "state": "complete", "created": now, "target": {"all": True}}  # fmt: skip
            made = [{"id": f"c-{n}-{i}", "run_id": "r1", "host": name, "state": ("done", "failed")[i % 2],
                     "job_id": i, "result": None, "created": now, "sent": now, "finished": now + i}
                    for n, name in enumerate(names) for i in range(n % 4)]  # fmt: skip
            async with store.transaction() as db:
                await db.execute(insert(events), rows)
                await db.execute(insert(runs).values(**run))
                await db.execute(insert(commands), made)
            limit = 4
            recent = await store.newest_events_per_host(names, limit)
            boots = await store.host_events_of_each(names, ["Booted"], limit)
            finished = await store.finished_commands(names, 2)
            async with store.engine.connect() as db:
                for name in names:
                    newest = select(events).where(events.c.host == name).order_by(events.c.id.desc()).limit(limit)
                    expected: list[dict[str, Any]] = [dict(r) for r in (await db.execute(newest)).mappings()][::-1]
                    assert recent[name] == expected, name
                    booted = newest.where(events.c.method == "Booted")
                    assert boots[name] == [dict(r) for r in (await db.execute(booted)).mappings()][::-1], name
            assert len(recent["host-000"]) == 1, "its HostAdded alone"
            assert [len(boots[name]) for name in names[:8]] == [0, 1, 2, 3, 4, 4, 4, 0]
            for n, name in enumerate(names):
                assert [c["id"] for c in finished[name]] == [f"c-{n}-{i}" for i in range(n % 4)][::-1][:2], name
                assert all(c["run"]["admin"] == "alice" for c in finished[name])
        finally:
            await store.close()

    asyncio.run(scenario())
