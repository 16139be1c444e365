"""Backups and restores of the hub's database (`rastos-hub db backup`, `db restore`), on SQLite and on a
private PostgreSQL server, and the lock that keeps SQLite to one hub process: beside a real `rastos-hub
serve` in a process of its own. On each backend one backup and its restore are made by the real command
in a process of its own, as are a second `serve` and a backup whose argv is checked; every other command
runs rastos-hub's main() in the test's process (`Hub.call`), the same code without a new interpreter's
start for each."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import create_engine, text

from hub.cli import DEFAULT_DATABASE, default_database
from hub.store import database_url, token_hash, with_driver
from tests.hub_fixtures import Hub, any_hub, database_at, free_port, hub, made
from tests.hub_fixtures import _serving as serving
from tests.test_hub_tokens import agent, refused, still_open

__all__ = ["any_hub", "hub"]  # fixtures

STEP = {"target": {"hosts": ["web-1"]}, "steps": [{"op": "motd", "params": {"text": "hi"}}]}


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The output of a command (`hub.cli(...)` or `hub.call(...)`) that succeeded."""
    assert done.returncode == 0, done.stderr
    return done.stdout


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The message of a command that was refused."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    return done.stderr


@pytest.fixture
def unserved_hub(tmp_path: Path) -> Hub:
    """A hub's SQLite database with its first admin, and no hub serving: for what needs no server."""
    return made(Hub(tmp_path / "hub"))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_unserved_hub(request: pytest.FixtureRequest, tmp_path: Path) -> Hub:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_database")
    return made(Hub(tmp_path / "hub", database_url=url))


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def token_of(output: str) -> str:
    return output.strip().splitlines()[-1]


def agents_work(hub: Hub, tokens: list[str], report: bool = False) -> list[dict[str, Any]]:
    """Each agent is welcomed (with `report`, an event of its own is acknowledged too); returns the
    first message each gets after the welcome, if one comes within a second."""
    firsts = []

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for token in tokens:
                socket = await agent(hub, session, token)
                if report:
                    await still_open(socket, hub)
                else:
                    with contextlib.suppress(TimeoutError):
                        firsts.append(await socket.receive_json(timeout=1))
                await socket.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    return firsts


def agent_refused(hub: Hub, token: str) -> int:
    async def scenario() -> int:
        async with aiohttp.ClientSession() as session:
            return await refused(hub, session, "/api/v1/agent", token)

    return asyncio.run(asyncio.wait_for(scenario(), 60))


def snapshot(hub: Hub) -> dict[str, Any]:
    """What a restore must bring back: hosts, runs with their commands, the event log."""
    state = hub.state()
    events = hub.api("GET", "/api/v1/events?limit=1000")
    return {
        "hosts": {name: (host["groups"], host["last_seen"] is None) for name, host in state["hosts"].items()},
        "runs": state["runs"],
        "events": [(event["id"], event["actor"], event["method"]) for event in events],
    }


def test_a_restore_brings_back_hosts_tokens_admins_runs_and_events(any_hub: Hub, tmp_path: Path) -> None:
    hub = any_hub
    web1 = hub.api("POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})["token"]
    web2 = hub.api("POST", "/api/v1/hosts", {"name": "web-2"})["token"]
    bob = token_of(ok(hub.call("admin", "add", "bob", "--role", "viewer")))
    agents_work(hub, [web1], report=True)  # an event of the agent's own, acknowledged
    hub.api("POST", "/api/v1/runs", STEP)
    before = snapshot(hub)
    assert len(before["runs"]) == 1 and any(actor == "agent" for _, actor, _ in before["events"])

    folder = tmp_path / "backups"
    folder.mkdir()
    written = Path(ok(hub.cli("db", "backup", str(folder))).split()[-1])  # while the hub serves
    assert written.parent == folder and stat.S_IMODE(written.stat().st_mode) == 0o600
    assert names(folder) == [written.name], "no temporary file is left"

    hub.api("DELETE", "/api/v1/hosts/web-1")
    web3 = hub.api("POST", "/api/v1/hosts", {"name": "web-3"})["token"]
    ok(hub.call("host", "rotate", "web-2"))
    ok(hub.call("admin", "remove", "bob"))
    assert agent_refused(hub, web2) == 401 and hub.request("GET", "/api/v1/hosts", token=bob)[0] == 401
    hub.stop()

    restored = ok(hub.cli("db", "restore", str(written)))
    assert restored.startswith(f"database restored from {written} (schema revision 0008)"), restored
    hub.start()
    assert snapshot(hub) == before
    (run_id,) = before["runs"]
    sent = agents_work(hub, [web1, web2])
    assert [message["command"]["steps"] for message in sent] == [STEP["steps"]], "the restored run goes on"
    assert hub.api("GET", f"/api/v1/runs/{run_id}")["id"] == run_id
    assert agent_refused(hub, web3) == 401
    status, hosts = hub.request("GET", "/api/v1/hosts", token=bob)
    assert status == 200 and [host["name"] for host in hosts] == ["web-1", "web-2"]


def test_a_restore_is_refused_while_a_sqlite_hub_serves_even_with_force(hub: Hub, tmp_path: Path) -> None:
    hub.api("POST", "/api/v1/hosts", {"name": "web-1"})
    backup = tmp_path / "hub.backup"
    ok(hub.call("db", "backup", str(backup)))
    assert hub.process is not None
    for force in ([], ["--force"]):
        message = refusal(hub.call("db", "restore", str(backup), *force))
        assert f"database: {hub.database} is in use by a rastos-hub process (PID {hub.process.pid})" in message
        assert "stop the hub" in message
    hub.stop()
    ok(hub.call("db", "restore", str(backup)))


@pytest.fixture
def postgresql_hub(tmp_path: Path, postgresql_database: str) -> Iterator[Hub]:
    yield from serving(Hub(tmp_path / "hub", database_url=postgresql_database))


def test_a_restore_on_postgresql_is_refused_while_a_hub_serves_unless_forced(
    postgresql_hub: Hub, tmp_path: Path
) -> None:
    hub = postgresql_hub
    web1 = hub.api("POST", "/api/v1/hosts", {"name": "web-1"})["token"]
    backup = tmp_path / "hub.pgdump"
    ok(hub.call("db", "backup", str(backup)))
    hub.api("DELETE", "/api/v1/hosts/web-1")
    assert hub.process is not None
    message = refusal(hub.call("db", "restore", str(backup)))
    assert re.search(rf"database: rastos-hub processes use it \(rastos-hub serve {hub.process.pid}@\S+\)", message)
    ok(hub.call("db", "restore", str(backup), "--force"))
    hub.stop()  # a forced restore wants the hubs restarted
    hub.start()
    agents_work(hub, [web1], report=True)


def test_a_second_hub_on_one_sqlite_file_is_refused_and_a_killed_ones_lock_is_gone(hub: Hub) -> None:
    assert hub.process is not None
    second = hub.cli("serve", "--listen", f"127.0.0.1:{free_port()}")
    assert second.returncode == 1
    assert f"database: {hub.database} is in use by another rastos-hub process (PID {hub.process.pid})" in second.stderr
    assert "use PostgreSQL" in second.stderr
    assert hub.state()["hosts"] == {}, "the first one serves on"
    hub.stop(signal.SIGKILL)  # no cleanup at all: the kernel drops its lock
    hub.start()
    ok(hub.call("db", "backup", str(hub.directory / "while-it-serves.backup")))


def test_a_restore_refuses_what_is_not_a_backup_of_its_kind_naming_what_is_wrong(
    unserved_hub: Hub, tmp_path: Path
) -> None:
    hub = unserved_hub
    before = Path(hub.database).read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "notes.txt": (b"not a backup", "is not a rastos-hub backup (neither an SQLite database nor a pg_dump"),
        "empty": (b"", "is not a rastos-hub backup"),
        "dump.pgdump": (b"PGDMP\x01\x0e\x00", "is a backup of a PostgreSQL hub, and --database is SQLite"),
        "other.sqlite": (None, "is an SQLite database, but not a rastos-hub backup: it has no table admins, "
                         "alembic_version, events, hosts"),
    }  # fmt: skip
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is None:
            sqlite3.connect(path).execute("CREATE TABLE notes (line TEXT)").connection.close()
        else:
            path.write_bytes(content)
        message = refusal(hub.call("db", "restore", str(path)))
        assert f"FILE: {path} {expected}" in message, message
    assert Path(hub.database).read_bytes() == before, "nothing was written"


def test_a_backup_of_a_newer_schema_is_refused_naming_both_revisions(any_unserved_hub: Hub, tmp_path: Path) -> None:
    hub = any_unserved_hub
    ok(hub.call("host", "add", "web-1"))
    backup = tmp_path / "newer.backup"
    with revision_set(hub, "0099"):
        ok(hub.call("db", "backup", str(backup)))
    message = refusal(hub.call("db", "restore", str(backup)))
    assert f"FILE: {backup} is at schema revision 0099, newer than this hub's 0008" in message, message
    assert host_names(hub) == ["web-1"], "the database is as it was, and still migrates and serves"


@contextlib.contextmanager
def revision_set(hub: Hub, revision: str) -> Iterator[None]:
    """The hub's database marked as of `revision`, as a newer hub would leave it; put back after."""
    engine = create_engine(with_driver(database_url(hub.database), asynchronous=False))
    query = text("UPDATE alembic_version SET version_num = :r")
    try:
        with engine.begin() as db:
            before = str(db.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
            db.execute(query, {"r": revision})
        yield
        with engine.begin() as db:
            db.execute(query, {"r": before})
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_older_backup_is_restored_and_migrated_up_leaving_no_newer_table_behind(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A backup from revision 0002, before the images and rollouts tables: restored over a database at
    the newest revision, which has them, and migrated up again, as `serve` would at start."""
    with database_at("0002", backend, tmp_path, request) as (url, engine):
        with engine.begin() as db:
            db.execute(text("INSERT INTO hosts (name, token_hash, groups, created) VALUES ('old', :h, '[]', 1)"),
                       {"h": token_hash("host-token")})  # fmt: skip
        engine.dispose()
        old = Hub(tmp_path / "old", database_url=url if backend == "postgresql" else str(tmp_path / "hub.db"))
        old.directory.mkdir()
        ok(old.call("db", "backup", str(tmp_path / "old.backup")))
        ok(old.call("db", "upgrade"))
        ok(old.call("host", "add", "new"))
        restored = ok(old.call("db", "restore", str(tmp_path / "old.backup")))
        assert "(schema revision 0002, migrated to 0008)" in restored, restored
        assert host_names(old) == ["old"]


def host_names(hub: Hub) -> list[str]:
    """The hosts `rastos-hub host list` names (which migrates the database first, as `serve` does)."""
    return re.findall(r"^(\S+)\t", ok(hub.call("host", "list")), re.MULTILINE)


def test_keep_removes_only_the_oldest_backups_it_named(unserved_hub: Hub, tmp_path: Path) -> None:
    hub = unserved_hub
    folder = tmp_path / "backups"
    folder.mkdir()
    older = ["rastos-hub-20240101T000000Z.sqlite", "rastos-hub-20240102T000000Z.pgdump",
             "rastos-hub-20240103T000000Z.sqlite"]  # fmt: skip
    others = ["notes.txt", "rastos-hub-manual.sqlite", "rastos-hub-20240101T000000Z.sqlite.old"]
    for name in [*older, *others]:
        (folder / name).write_text(name)
    # The refusals first: a backup named for this second would be refused as one that exists already.
    message = refusal(hub.call("db", "backup", "--keep", "2", str(folder / "one.sqlite")))
    assert "--keep: needs FILE to be a directory" in message
    message = refusal(hub.call("db", "backup", "--keep", "0", str(folder)))
    assert message.startswith("rastos-hub: --keep: must be at least 1")
    assert names(folder) == sorted([*older, *others]), "a refused backup removes nothing"
    written = Path(ok(hub.call("db", "backup", "--keep", "2", str(folder))).split()[-1])
    assert names(folder) == sorted([older[-1], written.name, *others])


def test_a_backup_that_fails_leaves_no_file_and_its_password_is_on_no_command_line(
    tmp_path: Path, postgresql: str
) -> None:
    """pg_dump of a database that does not exist fails; nothing is left where the backup was to be.
    The password (wrong for a server that trusts everyone) goes in a passfile, never in argv: the
    command runs in a process of its own, whose --debug log on stderr shows the pg_dump it ran."""
    missing = postgresql.replace("postgres@/postgres?", "postgres:s3cret@/no_such_db?")
    assert missing != postgresql
    broken = Hub(tmp_path / "hub", database_url=missing)
    broken.directory.mkdir()
    folder = tmp_path / "backups"
    folder.mkdir()
    message = refusal(broken.cli("--debug", "db", "backup", str(folder)))
    assert 'database "no_such_db" does not exist' in message, message
    assert "+ pg_dump --format=custom" in message and "s3cret" not in message
    assert names(folder) == []
    unserved = Hub(tmp_path / "none")
    unserved.directory.mkdir()
    assert f"database: {unserved.database} does not exist" in refusal(unserved.call("db", "backup", str(folder)))
    assert names(folder) == [] and not Path(unserved.database).exists()


@pytest.mark.parametrize(
    ("text", "database"),
    [
        ("RASTOS_HUB_DATABASE=postgresql://rastos-hub@/rastos-hub?host=/run/postgresql\n",
         "postgresql://rastos-hub@/rastos-hub?host=/run/postgresql"),
        ('# a comment\nRASTOS_HUB_OPTIONS=--listen 0.0.0.0:8470\nRASTOS_HUB_DATABASE="/srv/hub.db"\n', "/srv/hub.db"),
        ("RASTOS_HUB_OPTIONS=--listen 0.0.0.0:8470\n", DEFAULT_DATABASE),
        (None, DEFAULT_DATABASE),
    ],
)  # fmt: skip
def test_the_admins_commands_default_to_the_database_the_service_serves(
    tmp_path: Path, text: str | None, database: str
) -> None:
    env = tmp_path / "hub.env"
    if text is not None:
        env.write_text(text)
    assert default_database(env) == database


def test_migrations_at_once_on_a_new_postgresql_database_wait_for_each_other(postgresql_database: str) -> None:
    """A hub's first start and the admin's first command race on an empty database (the appliance's
    first boot): without the lock, both create Alembic's table and one fails."""
    from concurrent.futures import ThreadPoolExecutor

    from hub.store import migrate

    with ThreadPoolExecutor(8) as pool:
        revisions = list(pool.map(migrate, [database_url(postgresql_database)] * 8))
    assert len(set(revisions)) == 1, revisions
