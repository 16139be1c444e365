"""Admins and their roles from the shell (`rastos-hub admin add --role`, `set-role`, `list`), the last
admin kept, a role change reaching the admin's open UI stream, and migration 0006 on a database of
admins made before roles (they become admins). The hub is the real `rastos-hub serve`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import text

from hub.credentials import ROLE_CHANGED
from hub.roles import Admin, Role
from hub.store import Store, migrate, token_hash
from tests.hub_fixtures import Hub, database_at, the_close
from tests.hub_fixtures import hub as hub

CLOSED_BY_POLL = 3.0  # seconds: the hub polls the database every second for changes made beside it


def added(hub: Hub, *args: str) -> str:
    """The token `rastos-hub admin add ARGS` printed."""
    result = hub.call("admin", "add", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def listed(hub: Hub) -> dict[str, str]:
    result = hub.call("admin", "list")
    assert result.returncode == 0, result.stderr
    return {name: role for name, role, _added in (line.split("\t") for line in result.stdout.splitlines())}


def refused(hub: Hub, *args: str) -> str:
    result = hub.call(*args)
    assert result.returncode != 0, (args, result.stdout)
    return result.stderr


def test_admin_add_takes_a_role_and_admin_list_shows_each(hub: Hub) -> None:
    viewer = added(hub, "vera", "--role", "viewer")
    result = hub.call("admin", "add", "otto", "--role", "operator")
    assert result.returncode == 0 and "admin otto added with the role operator" in result.stdout, result.stderr
    operator = result.stdout.strip().splitlines()[-1]
    # Without --role: an admin, as the command always made (docs/hub.md says why).
    ada = added(hub, "ada")
    assert listed(hub) == {"ada": "role=admin", "alice": "role=admin", "otto": "role=operator", "vera": "role=viewer"}
    run = {"target": {"all": True}, "steps": [{"op": "motd", "params": {"text": "x"}}]}
    for number, (token, may_run, may_add) in enumerate(((viewer, False, False), (operator, True, False),
                                                        (ada, True, True))):  # fmt: skip
        assert hub.request("GET", "/api/v1/state", token=token)[0] == 200
        assert (hub.request("POST", "/api/v1/runs", run, token=token)[0] != 403) == may_run
        assert (hub.request("POST", "/api/v1/hosts", {"name": f"web-{number}"}, token=token)[0] == 201) == may_add
    stderr = refused(hub, "admin", "add", "root", "--role", "root")
    assert "argument --role: invalid choice: 'root' (choose from" in stderr and "operator" in stderr, stderr
    assert "root" not in listed(hub)
    logged = [(e["actor"], e["method"], e["detail"]) for e in hub.api("GET", "/api/v1/events?limit=50")]
    assert ("cli", "AdminAdded", {"admin": "vera", "role": "viewer"}) in logged


def test_set_role_changes_what_an_admin_may_do_at_once(hub: Hub) -> None:
    vera = added(hub, "vera", "--role", "viewer")
    assert hub.request("POST", "/api/v1/hosts", {"name": "web-1"}, token=vera)[0] == 403
    result = hub.call("admin", "set-role", "vera", "admin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("admin vera: the role admin (was viewer)"), result.stdout
    assert listed(hub)["vera"] == "role=admin"
    assert hub.request("POST", "/api/v1/hosts", {"name": "web-1"}, token=vera)[0] == 201
    again = hub.call("admin", "set-role", "vera", "admin")
    assert again.returncode == 0 and again.stdout.strip() == "admin vera has the role admin already"
    assert hub.call("admin", "set-role", "vera", "viewer").returncode == 0
    status, answer = hub.request("DELETE", "/api/v1/hosts/web-1", token=vera)
    assert status == 403 and answer["role"] == "viewer", answer
    assert refused(hub, "admin", "set-role", "nobody", "viewer").startswith("rastos-hub: name: no admin named 'nobody'")
    stderr = refused(hub, "admin", "set-role", "vera", "owner")
    assert "argument role: invalid choice: 'owner'" in stderr, stderr
    logged = [(e["actor"], e["method"], e["detail"]) for e in hub.api("GET", "/api/v1/events?limit=50")]
    assert [d for a, m, d in logged if m == "AdminRoleSet"] == [
        {"admin": "vera", "role": "admin", "was": "viewer"},
        {"admin": "vera", "role": "viewer", "was": "admin"},
    ], "a change to the role it has already is no event"


def test_the_last_admin_can_be_neither_removed_nor_demoted(hub: Hub) -> None:
    added(hub, "vera", "--role", "viewer")
    for args, change in (
        (("admin", "remove", "alice"), "removing them"),
        (("admin", "set-role", "alice", "operator"), "making them operator"),
    ):
        stderr = refused(hub, *args)
        assert stderr == (
            f"rastos-hub: name: alice is the hub's last admin, and {change} would leave it without one\n"
            "hint: make another admin first: rastos-hub admin add NAME --role admin, or admin set-role NAME admin\n"
        ), stderr
    assert listed(hub) == {"alice": "role=admin", "vera": "role=viewer"}
    assert hub.request("POST", "/api/v1/hosts", {"name": "web-1"})[0] == 201, "alice still does everything"
    # A viewer is no admin to keep: removing one is not refused, nor is the demotion of one of two admins.
    assert hub.call("admin", "remove", "vera").returncode == 0
    added(hub, "ada")
    assert hub.call("admin", "set-role", "alice", "viewer").returncode == 0
    assert refused(hub, "admin", "remove", "ada").startswith("rastos-hub: name: ada is the hub's last admin")
    assert listed(hub) == {"ada": "role=admin", "alice": "role=viewer"}


def test_a_role_change_closes_the_admins_streams_and_the_next_one_has_the_new_role(hub: Hub) -> None:
    vera = added(hub, "vera", "--role", "viewer")
    headers = {"Authorization": f"Bearer {vera}"}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            stream = await session.ws_connect(f"{hub.url}/api/v1/stream", headers=headers)
            assert (await stream.receive_json(timeout=10))["type"] == "init"
            alices = await session.ws_connect(
                f"{hub.url}/api/v1/stream", headers={"Authorization": f"Bearer {hub.admin_token}"}
            )
            assert (await alices.receive_json(timeout=10))["type"] == "init"
            changed = await asyncio.to_thread(hub.call, "admin", "set-role", "vera", "operator")
            assert changed.returncode == 0, changed.stderr
            started = time.monotonic()
            message = await the_close(stream, CLOSED_BY_POLL)  # past deltas and beacons sent before it
            assert message.type == aiohttp.WSMsgType.CLOSE and message.extra == ROLE_CHANGED.decode(), message
            assert time.monotonic() - started < CLOSED_BY_POLL
            async with session.get(f"{hub.url}/api/v1/me", headers=headers) as answer:
                assert (await answer.json())["role"] == "operator"
            again = await session.ws_connect(f"{hub.url}/api/v1/stream", headers=headers)
            assert (await again.receive_json(timeout=10))["type"] == "init"
            await again.close()
            # Another admin's stream goes on.
            await alices.send_json({"type": "get_state"})
            while (await alices.receive_json(timeout=10))["type"] != "init":
                pass
            await alices.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0006_makes_every_admin_there_was_an_admin(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Admins, and the sessions they had, from before roles keep doing everything they did."""
    with database_at("0005", backend, tmp_path, request) as (url, engine):
        with engine.begin() as connection:
            for name in ("ada", "bo"):
                connection.execute(text("INSERT INTO admins (name, token_hash, created) VALUES (:n, :h, 1)"),
                                   {"n": name, "h": token_hash(f"{name}-token")})  # fmt: skip
            connection.execute(text("INSERT INTO sessions (id_hash, admin, created, expires) VALUES (:h, 'bo', 1, :e)"),
                               {"h": token_hash("bo-session"), "e": time.time() + 3600})  # fmt: skip
        assert migrate(url) == "0008"

        async def lookups() -> tuple[object, ...]:
            store = Store(url)
            try:
                return (await store.admin_for_token("ada-token"), await store.admin_for_session("bo-session"),
                        [(row["name"], row["role"]) for row in await store.admins()])  # fmt: skip
            finally:
                await store.close()

        assert asyncio.run(lookups()) == (
            Admin("ada", Role.admin),
            Admin("bo", Role.admin),
            [("ada", "admin"), ("bo", "admin")],
        )
