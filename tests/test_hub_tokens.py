"""Tokens over their life: a host's rotated (the old one kept for a grace period, then refused) and
revoked, an admin's rotated and an admin removed. A connection ends with its credentials: an agent
or UI connected with a token that stops working is disconnected, within a second of a change made
from the command line beside the hub and at once for one made through the REST API.

The hub is the real `rastos-hub serve`; agents and UIs are real WebSocket clients, and the last test
runs a real rastosd that takes its new token from its token file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.credentials import CLOSE_REASON
from hub.roles import Admin, Role
from hub.store import Store, database_url, token_hash
from tests.daemon_fixtures import require_root
from tests.hub_fixtures import Hub, the_close
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_fleet import fleet as fleet

CLOSED_BY_POLL = 3.0  # seconds: the hub polls the database every second for changes made beside it


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 120))


async def connect(hub: Hub, path: str, session: aiohttp.ClientSession, token: str) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(f"{hub.url}{path}", headers={"Authorization": f"Bearer {token}"})


async def agent(hub: Hub, session: aiohttp.ClientSession, token: str) -> aiohttp.ClientWebSocketResponse:
    socket = await connect(hub, "/api/v1/agent", session, token)
    assert (await socket.receive_json(timeout=10))["type"] == "welcome"
    return socket


async def refused(hub: Hub, session: aiohttp.ClientSession, path: str, token: str) -> int:
    """The status a WebSocket with this token is refused with (AssertionError if it is let in)."""
    try:
        socket = await connect(hub, path, session, token)
    except aiohttp.WSServerHandshakeError as error:
        return error.status
    await socket.close()
    raise AssertionError(f"{path}: a token that stopped working was let in")


async def closed_within(socket: aiohttp.ClientWebSocketResponse, seconds: float) -> float:
    """Wait for the hub to close `socket` for its credentials; returns how long it took. (The close
    frame says why; the socket's close code may say 1006 if the hub hung up before the reply.)"""
    started = time.monotonic()
    message = await the_close(socket, seconds)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    assert (message.data, message.extra) == (1008, CLOSE_REASON.decode()), message
    return time.monotonic() - started


async def still_open(socket: aiohttp.ClientWebSocketResponse, hub: Hub) -> None:
    """The agent's socket still carries messages both ways: events are acknowledged."""
    event = {"id": int(time.time() * 1000), "time": 1.0, "uid": 0, "method": "Ping", "job": None, "detail": {}}
    await socket.send_json({"type": "events", "events": [event]})
    answer = await socket.receive_json(timeout=10)
    assert answer == {"type": "ack", "last_event": event["id"]}, answer


def host_events(hub: Hub, name: str) -> list[tuple[str, str, dict[str, Any]]]:
    stored = hub.api("GET", f"/api/v1/events?host={name}&limit=50")
    return [(e["actor"], e["method"], e["detail"]) for e in stored if e["actor"] != "agent"]


def test_a_rotated_host_token_works_through_its_grace_then_stops_and_its_agent_is_disconnected(hub: Hub) -> None:
    old = hub.api("POST", "/api/v1/hosts", {"name": "web-1"})["token"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            before = await agent(hub, session, old)
            rotated = await asyncio.to_thread(hub.call, "host", "rotate", "web-1", "--grace", "2")
            assert rotated.returncode == 0, rotated.stderr
            assert "the old token works until" in rotated.stdout and "(2 s)" in rotated.stdout, rotated.stdout
            new = rotated.stdout.strip().splitlines()[-1]
            assert new != old and len(new) == 43
            listed = await asyncio.to_thread(hub.call, "host", "list")
            assert "token=rotated (the old one works until" in listed.stdout, listed.stdout
            # Within the grace: both tokens work (a host token's REST route answers 404, not 401, for
            # an image it was not sent), and the connection made before the rotation goes on.
            for token in (old, new):
                assert (await asyncio.to_thread(hub.request, "GET", "/api/v1/images/x/bundle", token=token))[0] == 404
            await still_open(before, hub)
            # At its end: the old token's connection is closed, and the old token refused.
            took = await closed_within(before, 2 + CLOSED_BY_POLL)
            assert took <= 2 + CLOSED_BY_POLL
            assert await refused(hub, session, "/api/v1/agent", old) == 401
            assert (await asyncio.to_thread(hub.request, "GET", "/api/v1/images/x/bundle", token=old))[0] == 401
            current = await agent(hub, session, new)
            await still_open(current, hub)
            await current.close()

    run(scenario())
    assert "token=valid" in hub.call("host", "list").stdout
    assert ("cli", "HostTokenRotated", {"grace_s": 2}) in host_events(hub, "web-1")


def test_a_revoked_host_is_disconnected_at_once_and_refused_until_given_a_new_token(hub: Hub) -> None:
    tokens = {name: hub.api("POST", "/api/v1/hosts", {"name": name})["token"] for name in ("web-1", "web-2", "db-1")}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            sockets = {name: await agent(hub, session, token) for name, token in tokens.items()}
            # Through the REST API: at once.
            status, _ = await asyncio.to_thread(hub.request, "POST", "/api/v1/hosts/web-1/revoke")
            assert status == 204
            assert await closed_within(sockets["web-1"], 1.0) < 1.0
            assert await refused(hub, session, "/api/v1/agent", tokens["web-1"]) == 401
            # From the command line beside the hub: at its next poll.
            revoked = await asyncio.to_thread(hub.call, "host", "revoke", "web-2")
            assert revoked.returncode == 0 and "token revoked" in revoked.stdout, revoked.stderr
            assert await closed_within(sockets["web-2"], CLOSED_BY_POLL) < CLOSED_BY_POLL
            assert await refused(hub, session, "/api/v1/agent", tokens["web-2"]) == 401
            await still_open(sockets["db-1"], hub)  # no other host is touched
            # A revoked host's token is not given a grace by a rotation: only the new one works.
            status, answer = await asyncio.to_thread(hub.request, "POST", "/api/v1/hosts/web-1/rotate",
                                                     {"grace_s": 600})  # fmt: skip
            assert status == 200 and answer["old_token_expires"] is None and answer["name"] == "web-1", answer
            assert await refused(hub, session, "/api/v1/agent", tokens["web-1"]) == 401
            again = await agent(hub, session, answer["token"])
            await still_open(again, hub)
            await again.close()
            await sockets["db-1"].close()

    run(scenario())
    listed = hub.call("host", "list").stdout
    assert "web-2\t" in listed and "token=revoked" in listed.split("web-2\t")[1].splitlines()[0], listed
    assert hub.state()["hosts"]["web-2"]["online"] is False, "a revoked host is offline, and still listed"
    assert [(actor, method) for actor, method, _ in host_events(hub, "web-1")] == [
        ("alice", "HostAdded"), ("alice", "HostTokenRevoked"), ("alice", "HostTokenRotated")
    ]  # fmt: skip


def test_a_rotation_without_grace_ends_the_old_token_now_and_bad_requests_name_the_field(hub: Hub) -> None:
    old = hub.api("POST", "/api/v1/hosts", {"name": "web-1"})["token"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            before = await agent(hub, session, old)
            status, answer = await asyncio.to_thread(hub.request, "POST", "/api/v1/hosts/web-1/rotate", None)
            assert status == 200 and answer["old_token_expires"] is None, answer
            assert await closed_within(before, 1.0) < 1.0
            assert await refused(hub, session, "/api/v1/agent", old) == 401

    run(scenario())
    cases = [
        ("/api/v1/hosts/web-1/rotate", {"grace_s": 2592001}, 400, "grace_s: 2592001 is greater than the maximum"),
        ("/api/v1/hosts/web-1/rotate", {"grace_s": -1}, 400, "grace_s: -1 is less than the minimum of 0"),
        ("/api/v1/hosts/web-1/rotate", {"grace": 5}, 400, "body: Additional properties are not allowed"),
        ("/api/v1/hosts/db-9/rotate", {}, 404, "name: no host named 'db-9'"),
        ("/api/v1/hosts/db-9/revoke", None, 404, "name: no host named 'db-9'"),
    ]
    for path, body, expected_status, expected in cases:
        status, answer = hub.request("POST", path, body)
        assert status == expected_status and answer["error"].startswith(expected), (path, body, answer)
    for args, expected in (
        (["host", "rotate", "web-1", "--grace", "-1"], "rastos-hub: --grace: must be between 0 and 2592000 seconds"),
        (["host", "rotate", "db-9"], "rastos-hub: name: no host named 'db-9'"),
        (["host", "revoke", "db-9"], "rastos-hub: name: no host named 'db-9'"),
        (["admin", "rotate", "bob"], "rastos-hub: name: no admin named 'bob'"),
        (["admin", "remove", "bob"], "rastos-hub: name: no admin named 'bob'"),
    ):
        result = hub.call(*args)
        assert result.returncode == 1 and result.stderr.startswith(expected), (args, result.stderr)


def test_a_rotated_or_removed_admins_token_sessions_and_streams_stop_working(hub: Hub) -> None:
    added = hub.call("admin", "add", "bob")
    assert added.returncode == 0, added.stderr
    bob = added.stdout.strip().splitlines()[-1]

    async def login(session: aiohttp.ClientSession, token: str) -> str:
        async with session.post(f"{hub.url}/api/v1/login", json={"token": token}) as response:
            assert response.status == 204
            return response.cookies["rastos_hub"].value

    async def stream(session: aiohttp.ClientSession, token: str = "", cookie: str = "") -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {"Cookie": f"rastos_hub={cookie}"}
        socket = await session.ws_connect(f"{hub.url}/api/v1/stream", headers=headers)
        assert (await socket.receive_json(timeout=10))["type"] == "init"
        return socket

    async def status_of(session: aiohttp.ClientSession, token: str = "", cookie: str = "") -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {"Cookie": f"rastos_hub={cookie}"}
        async with session.get(f"{hub.url}/api/v1/hosts", headers=headers) as response:
            return response.status

    async def scenario() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            cookie = await login(session, bob)
            by_token, by_cookie = await stream(session, token=bob), await stream(session, cookie=cookie)
            alices = await stream(session, token=hub.admin_token)
            rotated = await asyncio.to_thread(hub.call, "admin", "rotate", "bob")
            assert rotated.returncode == 0, rotated.stderr
            new = rotated.stdout.strip().splitlines()[-1]
            # The old token, and the session it opened, stop; so do the streams they opened.
            for socket in (by_token, by_cookie):
                assert await closed_within(socket, CLOSED_BY_POLL) < CLOSED_BY_POLL
            assert await status_of(session, token=bob) == 401 and await status_of(session, cookie=cookie) == 401
            assert await refused(hub, session, "/api/v1/stream", bob) == 401
            assert await status_of(session, token=new) == 200
            # A logout ends its session's stream too.
            cookie = await login(session, new)
            by_cookie = await stream(session, cookie=cookie)
            async with session.post(f"{hub.url}/api/v1/logout", headers={"Cookie": f"rastos_hub={cookie}"}) as answer:
                assert answer.status == 204
            assert await closed_within(by_cookie, CLOSED_BY_POLL) < CLOSED_BY_POLL
            # Removed: the newest token stops, and its stream is closed.
            by_token = await stream(session, token=new)
            removed = await asyncio.to_thread(hub.call, "admin", "remove", "bob")
            assert removed.returncode == 0 and "admin bob removed" in removed.stdout, removed.stderr
            assert await closed_within(by_token, CLOSED_BY_POLL) < CLOSED_BY_POLL
            assert await status_of(session, token=new) == 401
            # Another admin's stream never noticed.
            await alices.send_json({"type": "get_state"})
            assert (await alices.receive_json(timeout=10))["type"] in ("init", "sync", "delta")
            await alices.close()

    run(scenario())
    assert [line.split("\t")[0] for line in hub.call("admin", "list").stdout.splitlines()] == ["alice"]
    logged = [(e["actor"], e["method"], e["detail"]) for e in hub.api("GET", "/api/v1/events?limit=20")]
    assert ("cli", "AdminTokenRotated", {"admin": "bob"}) in logged and (
        "cli",
        "AdminRemoved",
        {"admin": "bob"},
    ) in logged


def test_tokens_made_before_the_lifecycle_migration_keep_working(tmp_path: Path) -> None:
    """Migration 0005 only adds columns: a host's and an admin's token from before it still work."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from hub.store import MIGRATIONS, migrate

    url = database_url(str(tmp_path / "hub.db"))
    engine = create_engine(url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(text("INSERT INTO hosts (name, token_hash, groups, created) VALUES ('old', :h, '[]', 1)"),
                           {"h": token_hash("host-token")})  # fmt: skip
        connection.execute(text("INSERT INTO admins (name, token_hash, created) VALUES ('ada', :h, 1)"),
                           {"h": token_hash("admin-token")})  # fmt: skip
    engine.dispose()
    assert migrate(url) == "0008"

    async def lookups() -> tuple[str | None, Admin | None, str | None]:
        store = Store(url)
        try:
            found = (await store.host_for_token("host-token"), await store.admin_for_token("admin-token"),
                     await store.host_for_token("admin-token"))  # fmt: skip
        finally:
            await store.close()
        return found

    assert asyncio.run(lookups()) == ("old", Admin("ada", Role.admin), None)


@pytest.mark.root
def test_a_real_agent_takes_its_rotated_token_from_its_token_file(hub: Hub, fleet: Fleet) -> None:
    """The daemon reads its token file again before each connect: an operator rotates with a grace,
    writes the new token where the daemon reads it, and the agent is back within a second or two of
    the grace's end, on the new token."""
    require_root()
    daemon = fleet.add("web-1")
    hub.wait_state(online("web-1"), "the agent online")
    answer = hub.api("POST", "/api/v1/hosts/web-1/rotate", {"grace_s": 2})
    (fleet.directory / "web-1" / "token").write_text(answer["token"] + "\n")
    deadline = time.monotonic() + 20
    while daemon.log_text().count("connected to the hub at") < 2:  # closed at the grace's end, then back
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        time.sleep(0.1)
    assert time.time() >= answer["old_token_expires"], "the old token's link lasted through its grace"
    hub.wait_state(online("web-1"), "the agent online on its new token")
    log = daemon.log_text()
    assert "the hub closed the connection (1008: credentials: no longer valid" in log, log[-3000:]
    assert "holds a new token: connecting with it" in log and "refused this host" not in log, log[-3000:]
    assert answer["token"] not in log, "the token is never logged"


def test_enrols_replacement_of_a_token_ends_the_one_before_and_its_undo_puts_back_all_it_was(tmp_path: Path) -> None:
    """`host enrol --rotate` replaces a host's token, a revoked host's too, and puts the one before
    back, revoked or in its grace as it was, if the host never took the new one; both move the
    credentials revision, so a connection on a token that ended is closed."""
    from hub.store import migrate

    url = database_url(str(tmp_path / "hub.db"))
    migrate(url)

    async def scenario() -> None:
        store = Store(url)
        try:
            first, _ = await store.add_host("web-1", [], "alice")
            second, _, _ = await store.rotate_host_token("web-1", 600, "alice")  # first in its grace
            revision = await store.credentials_revision()
            third, before = await store.replace_host_token("web-1", "cli")
            assert await store.credentials_revision() == revision + 1
            assert [await store.host_for_token(t) for t in (first, second, third)] == [None, None, "web-1"]
            await store.restore_host_token("web-1", before, "cli")
            assert await store.credentials_revision() == revision + 2
            assert [await store.host_for_token(t) for t in (first, second, third)] == ["web-1", "web-1", None]
            await store.revoke_host_token("web-1", "alice")
            fourth, before = await store.replace_host_token("web-1", "cli")
            assert await store.host_for_token(fourth) == "web-1", "a revoked host's replacement token works"
            await store.restore_host_token("web-1", before, "cli")
            assert [await store.host_for_token(t) for t in (second, fourth)] == [None, None], "revoked again"
        finally:
            await store.close()

    asyncio.run(scenario())
