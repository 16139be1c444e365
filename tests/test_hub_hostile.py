"""The hub under hostile input: whatever a client or an agent sends, an answer comes (never a 500),
the hub stays up and fair to everyone else, nothing refused is stored, and its memory stays bounded.

The first tests are the examples that once broke it, kept as plain regressions; the last ones are
property-based (hypothesis, with a fixed seed and a bounded number of examples) over every REST body
and every agent frame type. The hub is the real `rastos-hub serve` on loopback, on SQLite and, where
the database matters, PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Browser, expect
from sqlalchemy import create_engine, text

from hub.protocol import KEPT_DETAIL_BYTES, MAX_EVENT_ID, MAX_MESSAGE_BYTES
from hub.store import KEPT_AGENT_EVENTS, MIGRATIONS, PRUNE_EVERY, Store, database_url, migrate
from tests.hub_fixtures import Hub, _serving
from tests.hub_fixtures import any_hub as any_hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_ui import browser as browser

SECURITY_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "Referrer-Policy")


# Helpers: raw HTTP (for bytes no client library would send) and one-frame agent links


def raw_http(hub: Hub, request: bytes) -> tuple[int, dict[str, str], Any]:
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as connection:
        connection.sendall(request)
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = response.read()
        return response.status, dict(response.getheaders()), strict_json(body) if body else None


def strict_json(text: str | bytes) -> Any:
    """JSON as a browser's JSON.parse takes it: NaN or Infinity anywhere is an error."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"the hub served {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def nest(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def event(event_id: int, **fields: Any) -> dict[str, Any]:
    return {"id": event_id, "time": 1.0, "uid": 0, "method": "M", "job": None, "detail": {}, **fields}


async def exchange(hub: Hub, token: str, *frames: str, probe: bool = True) -> list[dict[str, Any]]:
    """Send `frames` on a fresh agent link, then (if `probe`) an empty events frame, which the hub
    answers with an ack if it is still listening; returns the acks and errors the hub sent after its
    welcome (not the commands it may send), until it closed the link or the probe's ack came."""
    answers: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.ws_connect(hub.agent_url, headers=headers, max_msg_size=0) as link:
            assert (await link.receive_json(timeout=10))["type"] == "welcome"
            for frame in frames:
                await link.send_str(frame)
            if probe:
                with contextlib.suppress(ConnectionError):
                    await link.send_str('{"type": "events", "events": []}')
            while True:
                message = await link.receive(timeout=10)
                if message.type != aiohttp.WSMsgType.TEXT:
                    return answers
                answer = strict_json(message.data)
                if answer["type"] in ("ack", "error"):
                    answers.append(answer)
                if answer["type"] == "ack" and probe:
                    return answers


async def send_each(hub: Hub, token: str, frames: list[str]) -> list[dict[str, Any]]:
    """Send each frame of events on one agent link and wait for its answer; returns the answers."""
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.ws_connect(hub.agent_url, headers=headers) as link:
            await link.receive_json(timeout=10)
            answers = []
            for frame in frames:
                await link.send_str(frame)
                answers.append(strict_json(await link.receive_str(timeout=30)))
            return answers


def cursor(hub: Hub, token: str) -> int:
    """The newest event of the host the hub has, as its welcome says."""

    async def welcome() -> int:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.ws_connect(hub.agent_url, headers=headers) as link:
                return int((await link.receive_json(timeout=10))["last_event"])

    return asyncio.run(welcome())


# Regressions: the examples that found bugs


def test_malformed_requests_get_a_4xx_naming_the_field_before_and_after_login(hub: Hub) -> None:
    surrogate_login = b'{"token": "\\ud800"}'
    for head, expected in (
        (b"POST /api/v1/login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
         % len(surrogate_login), (400, "token: lone surrogate")),
        (b"GET /api/v1/state HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\xc3\r\n", (401, "authorization:")),
        (b"GET /api/v1/state HTTP/1.1\r\nAuthorization: \xff\r\n", (401, "authorization:")),
        (b"GET /api/v1/state HTTP/1.1\r\nCookie: rastos_hub=\xff\xfe\x80; x=\xc3\r\n", (401, "authorization:")),
    ):  # fmt: skip
        body = surrogate_login if b"login" in head else b""
        status, headers, answer = raw_http(hub, head + b"Host: hub\r\nConnection: close\r\n\r\n" + body)
        assert (status, answer["error"][: len(expected[1])]) == expected, (head, answer)
        assert all(name in headers for name in SECURITY_HEADERS)
    hub.api("POST", "/api/v1/hosts", {"name": "one"})

    def nested(depth: int) -> bytes:
        params = '{"a": ' + "[" * depth + "]" * depth + "}"
        return ('{"target": {"all": true}, "steps": [{"op": "motd", "params": ' + params + "}]}").encode()

    for method, path, raw, expected in (
        ("GET", "/api/v1/events?before=99999999999999999999999", None, (400, "before: must be an integer")),
        ("GET", "/api/v1/events?before=-1", None, (400, "before: must be an integer")),
        ("GET", "/api/v1/events?limit=1e3", None, (400, "limit: must be an integer")),
        ("GET", "/api/v1/events?host=%FF", None, (400, "host:")),
        ("POST", "/api/v1/runs", nested(5000), (400, "body: nested deeper than 32 levels")),
        ("POST", "/api/v1/runs", nested(40), (400, "steps.0.params.a.0.0.0")),
        ("POST", "/api/v1/runs", b'{"target": {"all": true}, "steps": [{"op": "motd", "params": {"a": 1e400}}]}',
         (400, "steps.0.params.a: number out of range")),
        ("POST", "/api/v1/hosts", b'{"name": "x", "groups": ["\\udfff"]}', (400, "groups.0: lone surrogate")),
        ("POST", "/api/v1/hosts", b"\xff\xfe", (400, "body: not UTF-8")),
        ("GET", "/api/v1/nothing", None, (404, "path:")),
        ("PUT", "/api/v1/hosts", None, (405, "method: PUT is not allowed")),
    ):  # fmt: skip
        status, answer = hub.request(method, path, raw=raw)
        assert (status, answer["error"][: len(expected[1])]) == expected, (path, answer)
    # The Bearer scheme is case-insensitive, like every HTTP authentication scheme.
    request = urllib.request.Request(f"{hub.url}/api/v1/hosts", headers={"Authorization": f"bEaReR {hub.admin_token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert [e["method"] for e in hub.api("GET", "/api/v1/events")] == ["AdminAdded", "HostAdded"], "nothing stored"


def test_numbers_that_overflow_are_refused_and_an_old_hubs_infinity_is_served_as_null(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]
    for frame, expected in (
        ('{"type": "events", "events": [{"id": 1, "time": 1e400, "uid": 0, "method": "M", "detail": {}}]}',
         "events[0].time: number out of range"),
        ('{"type": "events", "events": [{"id": 1, "time": 1, "uid": 0, "method": "Rollback", '
         '"detail": {"x": -1e400}}]}', "events[0].detail.x: number out of range"),
        ('{"type": "facts", "facts": {"snapshots": [{"id": 1, "created": 1e400, "description": "", "kind": "a", '
         '"known_good": true}]}}', "facts.snapshots[0].created: number out of range"),
        ('{"type": "command_status", "command": "c", "state": "done", "result": {"t": 1e999}}',
         "result.t: number out of range"),
    ):  # fmt: skip
        answers = asyncio.run(exchange(hub, token, frame))
        assert [a["type"] for a in answers] == ["error"], (answers, expected)
        assert answers[0]["message"].startswith(expected), (answers, expected)
    assert hub.state()["hosts"]["one"]["facts"] is None and cursor(hub, token) == 0

    # A database an older hub wrote Infinity into (SQLite took it): served as null, never as Infinity.
    hub.stop()
    with contextlib.closing(sqlite3.connect(hub.database)) as db, db:
        db.execute("UPDATE hosts SET facts = ? WHERE name = 'one'", ('{"hostname": "h", "x": Infinity}',))
        db.execute("INSERT INTO events (time, host, agent_event, actor, method, detail) VALUES "
                   "(?, 'one', 1, 'agent', 'Rollback', '{\"t\": -Infinity, \"n\": NaN}')", (float("inf"),))  # fmt: skip
    hub.start()
    state = strict_json(urllib.request.urlopen(_authorized(hub, "/api/v1/state"), timeout=10).read())["state"]
    assert state["hosts"]["one"]["facts"] == {"hostname": "h", "x": None}
    rollback = state["hosts"]["one"]["last_rollback"]
    assert rollback == {"time": None, "method": "Rollback", "detail": {"t": None, "n": None}}
    strict_json(urllib.request.urlopen(_authorized(hub, "/api/v1/events"), timeout=10).read())

    async def init() -> None:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {hub.admin_token}"}
            async with session.ws_connect(f"{hub.url}/api/v1/stream", headers=headers) as stream:
                message = await stream.receive(timeout=10)
                assert strict_json(message.data)["type"] == "init"

    asyncio.run(init())


def _authorized(hub: Hub, path: str) -> urllib.request.Request:
    return urllib.request.Request(f"{hub.url}{path}", headers={"Authorization": f"Bearer {hub.admin_token}"})


def test_agent_ids_up_to_2_to_the_62_fit_both_databases_and_larger_ones_are_refused(any_hub: Hub) -> None:
    hub = any_hub
    token = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]
    run = hub.api(
        "POST", "/api/v1/runs", {"target": {"hosts": ["one"]}, "steps": [{"op": "motd", "params": {"text": "x"}}]}
    )
    command = run["commands"][0]["id"]

    async def scenario() -> None:
        answers = await exchange(hub, token, json.dumps({"type": "events", "events": [event(2**31), event(2**40)]}))
        assert answers == [{"type": "ack", "last_event": 2**40}]
        status = {"type": "command_status", "command": command, "state": "running", "job": 2**31}
        last = json.dumps({"type": "events", "events": [event(2**62)]})
        answers = await exchange(hub, token, json.dumps(status), last)
        assert {"type": "ack", "last_event": 2**62} in answers
        answers = await exchange(hub, token, json.dumps({"type": "events", "events": [event(2**62 + 1)]}))
        assert answers[0] == {"type": "error", "message": f"events[0].id: must be between 1 and 2**62, got {2**62 + 1}"}

    asyncio.run(scenario())
    assert cursor(hub, token) == MAX_EVENT_ID, "the cursor made it to the database and back"
    assert hub.api("GET", f"/api/v1/runs/{run['id']}")["commands"][0]["job_id"] == 2**31
    stored = [e["agent_event"] for e in hub.api("GET", "/api/v1/events?host=one") if e["actor"] == "agent"]
    assert stored == [2**31, 2**40, 2**62]


def test_each_host_keeps_its_newest_events_only(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "chatty"})["token"]
    total = KEPT_AGENT_EVENTS + 600
    frames = [json.dumps({"type": "events", "events": [event(n) for n in range(first, first + 400)]})
              for first in range(1, total + 1, 400)]  # fmt: skip
    answers = asyncio.run(send_each(hub, token, frames))
    assert answers[-1] == {"type": "ack", "last_event": total}
    with contextlib.closing(sqlite3.connect(hub.database)) as db:
        low, high, count = db.execute(
            "SELECT min(agent_event), max(agent_event), count(*) FROM events WHERE host = 'chatty' AND actor = 'agent'"
        ).fetchone()
    assert high == total and count == high - low + 1, "the oldest went, and only they"
    assert KEPT_AGENT_EVENTS <= count < KEPT_AGENT_EVENTS + PRUNE_EVERY, count


def test_migration_0002_widens_the_ids_of_a_postgresql_database_in_use(postgresql_database: str) -> None:
    """A hub at revision 0001 with rows in it: after the upgrade its ids take 2**62, and the event id
    sequence goes past 2**31 too."""
    url = postgresql_database
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
            connection.execute(text("INSERT INTO hosts (name, token_hash, groups, created) VALUES "
                                    "('old', 'h', '[]', 1), ('new', 'i', '[]', 1)"))  # fmt: skip
            connection.execute(text("INSERT INTO events (time, host, agent_event, actor, method, detail) "
                                    "VALUES (1, 'old', 7, 'agent', 'M', '{}')"))  # fmt: skip
        assert migrate(database_url(url)) == "0008"
        with engine.begin() as connection:
            connection.execute(text("UPDATE hosts SET last_event = 4611686018427387904 WHERE name = 'new'"))
            connection.execute(text("SELECT setval('events_id_seq', 3000000000)"))
            connection.execute(text("INSERT INTO events (time, host, agent_event, actor, method, detail) "
                                    "VALUES (1, 'new', 4611686018427387904, 'agent', 'M', '{}')"))  # fmt: skip
            rows = connection.execute(text("SELECT id, host, agent_event FROM events ORDER BY id")).all()
        assert [tuple(row) for row in rows] == [(1, "old", 7), (3000000001, "new", 2**62)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_poisoned_host_fails_only_its_own_part_of_a_group_commit(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Rows the edge would refuse, given to the store directly: the commit they share with other
    hosts' rows fails, and is made again host by host, so only the poisoned host's rows are lost."""
    if backend == "sqlite":
        url = database_url(str(tmp_path / "hub.db"))
    else:
        url = database_url(request.getfixturevalue("postgresql_database"))
    migrate(url)

    async def scenario() -> None:
        store = Store(url)
        try:
            for name in ("a", "b", "c", "bad-id", "bad-facts"):
                await store.add_host(name, [], "test")
            rows = {name: [{"id": n, "time": 1.0, "method": "M", "detail": {"n": n}} for n in (1, 2)]
                    for name in ("a", "b", "c")}  # fmt: skip
            rows["bad-id"] = [{"id": 2**63, "time": 1.0, "method": "M", "detail": {}}]  # past any 64-bit column
            store.save_facts("bad-facts", {"hostname": float("nan")})
            store.save_facts("c", {"hostname": "c.example"})
            results = await asyncio.gather(
                *(store.add_agent_events(name, batch) for name, batch in rows.items()), return_exceptions=True
            )
            by_host = dict(zip(rows, results, strict=True))
            assert isinstance(by_host.pop("bad-id"), Exception)
            for name, stored in by_host.items():
                assert not isinstance(stored, BaseException), (name, stored)
                assert [row["agent_event"] for row in stored] == [1, 2] and all(row["id"] for row in stored)
            hosts = {row["name"]: row for row in await store.hosts()}
            assert {name: hosts[name]["last_event"] for name in hosts} == {"a": 2, "b": 2, "c": 2, "bad-id": 0,
                                                                          "bad-facts": 0}  # fmt: skip
            assert hosts["c"]["facts"] == {"hostname": "c.example"} and hosts["bad-facts"]["facts"] is None
            agent_rows = [e for e in await store.events(100) if e["actor"] == "agent"]
            assert sorted((e["host"], e["agent_event"]) for e in agent_rows) == [
                (name, n) for name in ("a", "b", "c") for n in (1, 2)
            ]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_one_agent_sending_poison_disturbs_no_other_agent_streaming(any_hub: Hub) -> None:
    hub = any_hub
    tokens = {f"good-{n}": hub.api("POST", "/api/v1/hosts", {"name": f"good-{n}"})["token"] for n in range(5)}
    poisoner = hub.api("POST", "/api/v1/hosts", {"name": "poisoner"})["token"]
    poison = [
        '{"type": "facts", "facts": {"hostname": "x", "snapshots": [null]}}',
        '{"type": "events", "events": [{"id": 2147483648, "time": 1e400, "uid": 0, "method": "M", "detail": {}}]}',
        '{"type": "events", "events": [{"id": 1, "time": 1, "uid": 0, "method": "M", "detail": ' + "[" * 900 + "]" * 900
        + "}]}",
        '{"type": "facts", "facts": {"hostname": "\\ud800"}}',
    ]  # fmt: skip
    batches, size = 20, 5

    async def stream(token: str) -> None:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.ws_connect(hub.agent_url, headers=headers) as link:
                await link.receive_json(timeout=10)
                for batch in range(batches):
                    ids = range(batch * size + 1, (batch + 1) * size + 1)
                    await link.send_json({"type": "facts", "facts": {"hostname": f"h{batch}"}})
                    await link.send_json({"type": "events", "events": [event(n) for n in ids]})
                    assert await link.receive_json(timeout=30) == {"type": "ack", "last_event": ids[-1]}

    async def poison_all_along(done: asyncio.Event) -> int:
        sent = 0
        while not done.is_set():
            answers = await exchange(hub, poisoner, poison[sent % len(poison)])
            assert [a["type"] for a in answers] == ["error"], answers
            sent += 1
        return sent

    async def scenario() -> int:
        done = asyncio.Event()
        poisoning = asyncio.create_task(poison_all_along(done))
        await asyncio.gather(*(stream(token) for token in tokens.values()))
        done.set()
        return await poisoning

    assert asyncio.run(scenario()) >= len(poison), "the poison went on while the others streamed"
    events = hub.api("GET", "/api/v1/events?limit=1000")
    stored = [(e["host"], e["agent_event"]) for e in events if e["actor"] == "agent"]
    assert sorted(stored) == sorted((name, n) for name in tokens for n in range(1, batches * size + 1))
    assert hub.state()["hosts"]["poisoner"]["facts"] is None
    log = hub.log.read_text()
    assert "committing each host apart" not in log and "could not be stored" not in log, "no commit failed"


def test_bad_frames_are_each_answered_with_an_error_naming_the_field(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]
    deep = "[" * 100_000 + "]" * 100_000
    for frame, expected in (
        ('{"type": "events", "events": [' + json.dumps(event(1))[:-1] + ', "detail": {"x": ' + deep + "}}]}",
         "message: nested deeper than 32 levels"),
        (json.dumps({"type": "events", "events": [event(1, detail={"a": nest(33)})]}),
         "events[0].detail.a" + "[0]" * 28 + ": nested deeper than 32 levels"),  # 32 from the frame's top
        ('{"type": "events", "events": [{"id": 1, "time": ' + "9" * 4000 + ', "uid": 0, "method": "M", "detail": {}}]}',
         "events[0].time: number out of range"),
        ('{"type": "events", "events": [{"id": 1, "time": 1e300, "uid": 0, "method": "M", "detail": {}}]}',
         "events[0].time: number out of range"),
        ('{"type": "events", "events": [{"id": 1, "time": 1e19, "uid": 0, "method": "M", "detail": {}}]}',
         "events[0].time: must be seconds since 1970"),
        ('{"type": "events", "events": [{"id": 1, "time": 1, "uid": 0, "method": "M\\udc80", "detail": {}}]}',
         "events[0].method: lone surrogate"),
        ('{"type": "facts", "facts": {"snapshots": [null]}}', "facts.snapshots[0]: None is not of type 'object'"),
        ('{"type": "facts", "facts": {"boot_state": {"kind": {"deep": 1}}}}', "facts.boot_state.kind:"),
        (json.dumps({"type": "facts", "facts": {"snapshots": [
            {"id": n, "created": 1.0, "description": "d" * 4000, "kind": "k", "known_good": False} for n in range(100)
        ]}}), "facts: 40"),
        ('{"type": "command_status", "command": "c", "state": "done", "job": -1}', "message.job: must be between 0"),
        (json.dumps({"type": "facts", "facts": {"hostname": "x" * MAX_MESSAGE_BYTES}}),
         f"message: larger than the {MAX_MESSAGE_BYTES} bytes"),
    ):  # fmt: skip
        answers = asyncio.run(exchange(hub, token, frame))
        assert [a["type"] for a in answers] == ["error"], (answers, expected)
        assert answers[0]["message"].startswith(expected), (answers, expected)

    async def binary() -> None:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.ws_connect(hub.agent_url, headers=headers) as link:
                await link.receive_json(timeout=10)
                await link.send_bytes(b"\x00\x01")
                assert (await link.receive_json(timeout=10))["message"].startswith("message: must be a text frame")

    asyncio.run(binary())
    assert hub.state()["hosts"]["one"]["facts"] is None and cursor(hub, token) == 0, "nothing refused was stored"
    assert "Traceback" not in hub.log.read_text()


FLOOD_EVENTS = 250
FLOOD_RSS = 120 << 20  # the hub's resident memory after the flood is below this (it is ~75 MiB before)
FLOOD_PEAK = 150 << 20


def test_a_flood_of_large_events_keeps_the_hubs_memory_and_answers_bounded(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "flood"})["token"]
    before = hub.memory()
    line = "x" * 999
    frames = []
    for n in range(1, FLOOD_EVENTS + 1):
        if n % 2:  # a job's end with a megabyte of output
            detail = {"state": "done", "ops": ["motd"], "result": {"steps": [{"op": "motd", "state": "changed",
                                                                              "output": [line] * 1000}]}}  # fmt: skip
        else:  # a megabyte in one string
            detail = {"blob": "y" * 1_000_000}
        frames.append(json.dumps({"type": "events", "events": [event(n, method="JobFinished", job=n, detail=detail)]}))
    assert all(len(frame) <= MAX_MESSAGE_BYTES for frame in frames) and sum(map(len, frames)) > 250_000_000

    started = time.monotonic()
    answers = asyncio.run(send_each(hub, token, frames))
    assert answers == [{"type": "ack", "last_event": n} for n in range(1, FLOOD_EVENTS + 1)]
    took = time.monotonic() - started
    after = hub.memory()
    sizes = {path: len(urllib.request.urlopen(_authorized(hub, path), timeout=30).read())
             for path in ("/api/v1/state", "/api/v1/events?limit=1000", "/api/v1/hosts")}  # fmt: skip
    print(f"flood of {FLOOD_EVENTS} 1 MB events in {took:.1f}s: RSS {before['VmRSS'] >> 20} -> "
          f"{after['VmRSS'] >> 20} MiB, peak {after['VmHWM'] >> 20} MiB; answers {sizes}")  # fmt: skip
    assert after["VmRSS"] < FLOOD_RSS and after["VmHWM"] < FLOOD_PEAK, after
    assert sizes["/api/v1/state"] < 2 << 20 and sizes["/api/v1/events?limit=1000"] <= (4 << 20) + (64 << 10), sizes
    stored = hub.api("GET", "/api/v1/events?host=flood&limit=2")
    assert [e["agent_event"] for e in stored] == [FLOOD_EVENTS - 1, FLOOD_EVENTS]
    assert all(len(json.dumps(e["detail"])) <= KEPT_DETAIL_BYTES + 100 for e in stored)
    job = hub.state()["hosts"]["flood"]["jobs"][-2]  # the last job with a megabyte of output
    assert job["state"] == "done" and job["result"]["steps"][0]["output"][-1].startswith("x" * 200), "its end is kept"


IDLE_SOCKETS = 1100


def test_a_crowd_of_idle_sockets_does_not_keep_clients_out(tmp_path: Path) -> None:
    """With the usual 1,024 open files, 1,100 sockets that connect and say nothing: a client that then
    connects is served at once, the crowd is logged once, and the hub closes the idle ones itself."""
    for server in _serving(Hub(tmp_path / "hub", open_files=1024)):
        with contextlib.ExitStack() as stack:
            address = ("127.0.0.1", server.port)
            crowd = [stack.enter_context(socket.create_connection(address)) for _ in range(IDLE_SOCKETS)]
            time.sleep(0.5)
            started = time.monotonic()
            status, _ = server.request("GET", "/api/v1/state")
            assert status == 200 and time.monotonic() - started < 2
            newest = crowd[-1]  # kept while it is young; closed by the hub when its time without credentials ends
            newest.settimeout(20)
            assert newest.recv(1) == b""
        log = server.log.read_text()
        assert log.count("the hub is crowded") == 1 and "Too many open files" not in log, log[-3000:]
        assert server.request("GET", "/api/v1/state")[0] == 200


def test_sessions_headers_origin_and_content_type(hub: Hub) -> None:
    def call(
        method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        request = urllib.request.Request(f"{hub.url}{path}", data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers
        except urllib.error.HTTPError as error:
            return error.code, error.headers

    login = json.dumps({"token": hub.admin_token}).encode()
    status, headers = call("POST", "/api/v1/login", login, {"Content-Type": "text/plain"})
    assert status == 415
    status, headers = call("POST", "/api/v1/login", login, {"Content-Type": "application/json"})
    assert status == 204
    cookie = SimpleCookie(headers["Set-Cookie"])["rastos_hub"]
    assert cookie.value != hub.admin_token and len(cookie.value) >= 40, "a session id, not the token"
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and int(cookie["max-age"]) == 12 * 3600
    session = {"Cookie": f"rastos_hub={cookie.value}"}
    assert call("GET", "/api/v1/state", headers=session)[0] == 200
    same = {"Origin": hub.url, "Content-Type": "application/json"}
    assert call("POST", "/api/v1/hosts", b'{"name": "a"}', {**session, **same})[0] == 201
    foreign = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    assert call("POST", "/api/v1/hosts", b'{"name": "b"}', {**session, **foreign})[0] == 403
    assert call("DELETE", "/api/v1/hosts/a", headers={**session, "Origin": "null"})[0] == 403
    assert call("POST", "/api/v1/logout", headers={**session, "Origin": "http://evil.example"})[0] == 403

    async def stream(origin: str) -> int:
        async with aiohttp.ClientSession() as client:
            try:
                async with client.ws_connect(f"{hub.url}/api/v1/stream", headers={**session, "Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(stream(hub.url)) == 101 and asyncio.run(stream("http://evil.example")) == 403
    status, headers = call("POST", "/api/v1/logout", headers=session)
    assert status == 204 and SimpleCookie(headers["Set-Cookie"])["rastos_hub"].value == ""
    assert call("GET", "/api/v1/state", headers=session)[0] == 401, "a logged-out session is gone from the hub"
    for path in ("/", "/static/hub.js", "/api/v1/openapi.json", "/api/v1/nothing", "/api/v1/state"):
        _, headers = call("GET", path)
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["Referrer-Policy"], path
    assert [h["name"] for h in hub.api("GET", "/api/v1/hosts")] == ["a"]


# Property-based: every REST body and every agent frame type


class Raw(str):
    """JSON text put into a generated document as it is (1e400, a lone surrogate, deep nesting)."""


def render(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {render(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    return json.dumps(value)


HOSTILE = st.sampled_from([Raw(text) for text in (
    "1e400", "-1e400", "NaN", "Infinity", '"\\ud800"', '"a\\udfff"', "9" * 30, "-" + "9" * 500, "18446744073709551616",
    "[" * 40 + "]" * 40, "[" * 3000 + "]" * 3000, "null", '{"": null}', "1e-400", "-0.0",
)])  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12))  # fmt: skip
VALUES = st.recursive(SCALARS | HOSTILE, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)  # fmt: skip


def body_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Documents with any of the fields, each valid or hostile, and the odd extra or non-object."""
    mixed = {key: strategy | VALUES for key, strategy in fields.items()}
    extra = st.fixed_dictionaries({}, optional={**mixed, "x": VALUES})
    return st.one_of(st.fixed_dictionaries({}, optional=mixed), extra, VALUES)


NAMES = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,8}\Z")
BODIES = {
    "/api/v1/login": body_of({"token": st.text(max_size=30)}),
    "/api/v1/hosts": body_of({"name": NAMES, "groups": st.lists(NAMES, max_size=3)}),
    "/api/v1/runs": body_of({
        "target": st.sampled_from([{"all": True}, {"hosts": ["base"]}, {"group": "g"}]) | VALUES,
        "steps": st.lists(st.fixed_dictionaries({"op": st.just("motd")}, optional={"params": VALUES}), max_size=2),
        "flags": st.integers(-1, 8), "parallelism": st.integers(0, 3),
    }),
    "/api/v1/rollouts": body_of({
        "image": st.text(max_size=20), "target": st.sampled_from([{"all": True}, {"hosts": ["base"]}]) | VALUES,
        "canary": st.integers(-1, 3), "wave_percent": st.integers(0, 101), "health_timeout_s": st.integers(0, 9),
    }),
}  # fmt: skip
CONTENT_TYPES = st.sampled_from(["application/json", "application/json", "application/json", "text/plain", ""])


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    for server in _serving(Hub(Path(tmp_path_factory.mktemp("hostile")) / "hub")):
        server.api("POST", "/api/v1/hosts", {"name": "base", "groups": ["g"]})
        yield server


@pytest.fixture(scope="module")
def agent_token(shared_hub: Hub) -> str:
    token: str = shared_hub.api("POST", "/api/v1/hosts", {"name": "agent"})["token"]
    return token


def stored(hub: Hub) -> tuple[int, int, int]:
    hosts, runs, rollouts = (len(hub.api("GET", f"/api/v1/{kind}")) for kind in ("hosts", "runs", "rollouts"))
    return hosts, runs, rollouts


@settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(sorted(BODIES)), data=st.data(), content_type=CONTENT_TYPES, login=st.booleans())
def test_any_rest_body_is_answered_without_a_500_and_a_refused_one_stores_nothing(
    shared_hub: Hub, path: str, data: st.DataObject, content_type: str, login: bool
) -> None:
    hub = shared_hub
    text = render(data.draw(BODIES[path]))
    before = stored(hub)
    request = urllib.request.Request(f"{hub.url}{path}", data=text.encode("utf-8", "surrogatepass"), method="POST")
    request.add_header("Content-Type", content_type)
    if login:
        request.add_header("Authorization", f"Bearer {hub.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.read()
    assert status < 500, (status, answer, text)
    if status >= 400:
        assert strict_json(answer)["error"], answer
        assert stored(hub) == before, f"refused ({status}) yet stored: {text}"
    assert hub.process is not None and hub.process.poll() is None


EVENT_FIELDS = {
    "id": st.integers(1, 2**63), "time": st.floats(0, 2e9), "uid": st.integers(-1, 2**33),
    "method": st.text(max_size=70), "job": st.none() | st.integers(-1, 2**63),
    "detail": st.dictionaries(st.text(max_size=5), VALUES, max_size=3),
}  # fmt: skip
FRAMES = st.one_of(
    st.fixed_dictionaries({"type": st.just("events"), "events": st.lists(
        st.fixed_dictionaries({}, optional={key: value | VALUES for key, value in EVENT_FIELDS.items()}), max_size=3)
        | VALUES}),
    st.fixed_dictionaries({"type": st.just("facts"), "facts": st.fixed_dictionaries({}, optional={
        "hostname": st.text(max_size=10) | VALUES, "boot_state": VALUES,
        "snapshots": st.lists(VALUES | st.fixed_dictionaries({"id": st.integers(0, 9), "created": st.floats(0, 9),
                                                             "description": st.text(max_size=5), "kind": st.just("a"),
                                                             "known_good": st.booleans()}), max_size=3),
        "ops": st.lists(st.text(max_size=5)) | VALUES, "surprise": VALUES}) | VALUES}),
    st.fixed_dictionaries({"type": st.just("command_status")}, optional={
        "command": st.text(max_size=10) | VALUES, "state": st.sampled_from(["done", "running", "exploded"]) | VALUES,
        "job": st.integers(-1, 2**63) | VALUES, "result": VALUES}),
    st.fixed_dictionaries({"type": st.just("update_status")}, optional={
        "update": st.text(max_size=10) | VALUES, "state": st.sampled_from(["staged", "failed", "exploded"]) | VALUES,
        "version": st.text(max_size=10) | VALUES, "detail": st.none() | st.text(max_size=10) | VALUES}),
    st.fixed_dictionaries({"type": st.just("output")}, optional={
        "command": st.text(max_size=10) | VALUES, "step": st.integers(-1, 300) | VALUES,
        "first": st.integers(-1, 2**60) | VALUES,
        "lines": st.lists(st.text(max_size=20) | VALUES, max_size=3) | VALUES}),
    VALUES,
)  # fmt: skip


@settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=FRAMES)
def test_any_agent_frame_is_answered_and_a_refused_one_stores_nothing(
    shared_hub: Hub, agent_token: str, frame: Any
) -> None:
    hub, token = shared_hub, agent_token
    before = cursor(hub, token), hub.api("GET", "/api/v1/hosts/agent")["facts"]
    answers = asyncio.run(exchange(hub, token, render(frame)))
    kinds = [answer["type"] for answer in answers]
    assert kinds in (["error"], ["ack"], ["ack", "ack"]), (answers, render(frame)[:300])
    if kinds == ["error"]:
        assert (cursor(hub, token), hub.api("GET", "/api/v1/hosts/agent")["facts"]) == before, "refused yet stored"
    assert hub.process is not None and hub.process.poll() is None


def test_the_ui_renders_agent_data_of_any_shape_without_throwing(hub: Hub, browser: Browser) -> None:
    """What the hub lets through of an agent's free-form data, in shapes the UI does not expect: the page
    shows the host, its jobs and events, with no error thrown; logging out leaves the login form."""
    token = hub.api("POST", "/api/v1/hosts", {"name": "odd"})["token"]
    odd = [
        event(
            1,
            method="JobFinished",
            job=1,
            detail={
                "state": {"x": 1},
                "ops": 5,
                "result": {"steps": [None, 3, {"op": ["a"], "state": None, "output": "not a list", "error": {"e": 1}}]},
            },
        ),
        event(2, method="JobFinished", job=2, detail={"ops": [None, {"o": 1}], "result": [1, 2]}),
        event(3, method="Rollback", detail={"x": None}),
        event(4, method="BootFallback", time=0, detail={"failed_entry": ["<b>not html</b>"]}),
    ]
    facts = {"hostname": "", "boot_state": {"kind": "x"}, "snapshots": [], "ops": []}
    frames = json.dumps({"type": "facts", "facts": facts}), json.dumps({"type": "events", "events": odd})
    with ThreadPoolExecutor(1) as thread:  # Playwright's own event loop runs in this one
        answers = thread.submit(asyncio.run, exchange(hub, token, *frames)).result()
    assert answers[0] == {"type": "ack", "last_event": 4}
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(hub.url)
    page.fill("#token", hub.admin_token)
    page.click("#login button")
    row = page.locator('#hosts tr[data-host="odd"]')
    expect(row).to_contain_text("BootFallback")
    row.click()
    expect(page.locator("#jobs")).to_contain_text("job 2")
    expect(page.locator("#events")).to_contain_text("<b>not html</b>")
    assert page.locator("#events b").count() == 0, "agent text stays text"
    expect(page.locator("#connection")).to_have_text("live")
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.reload()
    expect(page.locator("#login")).to_be_visible()
    assert errors == [], errors
    page.close()
