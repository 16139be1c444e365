"""The hub on its own: its API's contract, authentication, and what it does with bad input.

The hub runs as `rastos-hub serve` in its own process; agents here are plain WebSocket clients that
speak the real protocol (tests/test_hub_fleet.py runs real rastosd agents).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from hub.schema import metadata
from hub.store import database_url, migrate
from tests.hub_fixtures import Hub, UiClient, database_at, scratch_database
from tests.hub_fixtures import any_hub as any_hub
from tests.hub_fixtures import hub as hub


def test_openapi_document_lists_every_route_and_the_api_needs_an_admin(hub: Hub) -> None:
    status, document = hub.request("GET", "/api/v1/openapi.json", token="")
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/api/v1/hosts", "/api/v1/runs", "/api/v1/runs/{id}/cancel", "/api/v1/events", "/api/v1/stream"} <= set(
        document["paths"]
    )
    run_schema = document["paths"]["/api/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # A run names its steps, a workflow or a compliance scan, exactly one of them.
    assert run_schema["required"] == ["target"], run_schema
    assert run_schema["oneOf"] == [{"required": ["steps"]}, {"required": ["workflow"]}, {"required": ["compliance"]}]
    assert run_schema["properties"]["compliance"]["properties"]["action"] == {"enum": ["scan", "remediate"]}
    for method, path in (("GET", "/api/v1/hosts"), ("POST", "/api/v1/runs"), ("GET", "/api/v1/state")):
        status, answer = hub.request(method, path, {}, token="not-a-token")
        assert status == 401 and answer["error"].startswith("authorization:"), (path, answer)
    status, answer = hub.request("POST", "/api/v1/login", {"token": "wrong"}, token="")
    assert status == 401 and answer["error"].startswith("token:")


def test_bad_requests_are_refused_naming_the_field_and_store_nothing(any_hub: Hub) -> None:
    hub = any_hub
    hub.api("POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})
    good = {"target": {"hosts": ["web-1"]}, "steps": [{"op": "hostname", "params": {"hostname": "a"}}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"steps": good["steps"]}, "body: 'target' is a required property"),
        ({**good, "steps": []}, "steps: [] should be non-empty"),
        ({**good, "steps": [{"op": "Bad Op"}]}, "steps.0.op:"),
        ({**good, "steps": [{"op": "hostname", "extra": 1}]}, "steps.0:"),
        ({**good, "flags": 9}, "flags: 9 is greater than the maximum of 7"),
        ({**good, "parallelism": 0}, "parallelism: 0 is less than the minimum of 1"),
        ({**good, "target": {"hosts": ["web-1"], "all": True}}, "target:"),
        ({**good, "surprise": True}, "body: Additional properties are not allowed ('surprise' was unexpected)"),
    ]
    for body, expected in cases:
        status, answer = hub.request("POST", "/api/v1/runs", body)
        assert status == 400 and answer["error"].startswith(expected), (body, answer)
    status, answer = hub.request("POST", "/api/v1/runs", {**good, "target": {"hosts": ["db-9"]}})
    assert status == 404 and answer["error"] == "target.hosts: no host named 'db-9'"
    status, answer = hub.request("POST", "/api/v1/runs", raw=b"{not json")
    assert status == 400 and answer["error"].startswith("body: not valid JSON")
    status, _ = hub.request("POST", "/api/v1/runs", raw=b"[" + b"1," * (1 << 20) + b"1]")
    assert status == 413
    status, answer = hub.request("POST", "/api/v1/hosts", {"name": "web-1"})
    assert status == 409 and answer["error"] == "name: a host named 'web-1' exists already"
    status, answer = hub.request("POST", "/api/v1/hosts", {"name": "Web_1"})
    assert status == 400 and answer["error"].startswith("name: 'Web_1' does not match")
    assert hub.api("GET", "/api/v1/runs") == []
    assert [event["method"] for event in hub.api("GET", "/api/v1/events")] == ["AdminAdded", "HostAdded"]


def test_a_run_step_its_op_refuses_is_refused_before_anything_is_sent(hub: Hub) -> None:
    """The hub checks a run's steps with the op library rastosd uses: the same field, the same words."""
    hub.api("POST", "/api/v1/hosts", {"name": "web-1"})
    cases = [
        ([{"op": "hostname", "params": {"hostname": "Web_1"}}], "steps[0].params.hostname: 'Web_1' is not valid"),
        ([{"op": "motd", "params": {"text": "hi"}}, {"op": "user", "params": {"name": "a", "uid": "7"}}],
         "steps[1].params.uid: must be an integer, got a string"),
        ([{"op": "nosuch"}], "steps[0].op: no op named 'nosuch'"),
        ([{"op": "ssh", "params": {}}, {"op": "user", "params": {"name": "a"}}],
         "steps[0].op: ssh must come after user (step 2)"),
    ]  # fmt: skip
    for steps, expected in cases:
        status, answer = hub.request("POST", "/api/v1/runs", {"target": {"hosts": ["web-1"]}, "steps": steps})
        assert status == 422 and answer["error"].startswith(expected), (steps, answer)
    assert hub.api("GET", "/api/v1/runs") == []


async def agent(hub: Hub, token: str, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(hub.agent_url, headers={"Authorization": f"Bearer {token}"})


def test_agents_are_authenticated_by_their_own_token_and_bad_messages_are_refused(hub: Hub) -> None:
    one = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]
    two = hub.api("POST", "/api/v1/hosts", {"name": "two"})["token"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for token in ("", "wrong", hub.admin_token):
                try:
                    await agent(hub, token, session)
                    raise AssertionError("a bad token was let in")
                except aiohttp.WSServerHandshakeError as error:
                    assert error.status == 401
            good = await agent(hub, two, session)
            assert (await good.receive_json())["host"] == "two", "the token says who the agent is"
            for bad, expected in (
                ("not json", "message: not valid JSON"),
                ('{"type": "sudo"}', "type: unknown message type 'sudo'"),
                ('{"type": "events", "events": [{"id": "1"}]}', "events[0].id: must be an integer"),
                ('{"type": "facts", "facts": {"hostname": 5}}', "facts.hostname: must be a string"),
                ('{"type": "command_status", "command": "x", "state": "exploded"}', "message.state:"),
                (
                    '{"type": "events", "events": [{"id": 1, "time": NaN, "uid": 0, "method": "M", "detail": {}}]}',
                    "message: NaN is not allowed",
                ),
                (
                    '{"type": "events", "events": [{"id": 9223372036854775808, "time": 1, "uid": 0, "method": "M", '
                    '"detail": {}}]}',
                    "events[0].id: must be between 1 and 2**62",
                ),
            ):
                socket = await agent(hub, one, session)
                await socket.receive_json()  # welcome
                await socket.send_str(bad)
                answer = await socket.receive_json()
                assert answer["type"] == "error" and answer["message"].startswith(expected), answer
                assert (await socket.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            socket = await agent(hub, one, session)
            await socket.receive_json()
            await socket.send_str(json.dumps({"type": "facts", "facts": {"hostname": "x" * (2 << 20)}}))
            answer = await socket.receive_json()  # an oversized frame is refused like any other: with an error
            assert answer["type"] == "error" and answer["message"].startswith("message: larger than"), answer
            assert (await socket.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            # The other agent was not disturbed by any of it.
            await good.send_json({"type": "facts", "facts": {"hostname": "two.example"}})
            await good.send_json({"type": "events", "events": [{"id": 1, "time": 1.0, "uid": 0, "method": "M",
                                                                 "job": None, "detail": {}}]})  # fmt: skip
            assert await good.receive_json() == {"type": "ack", "last_event": 1}
            await good.close()

    asyncio.run(scenario())
    state = hub.state()
    assert state["hosts"]["two"]["facts"] == {"hostname": "two.example"}
    assert state["hosts"]["one"]["facts"] is None, "nothing a refused message carried was stored"
    assert [e["host"] for e in hub.api("GET", "/api/v1/events?limit=10") if e["actor"] == "agent"] == ["two"]


def test_a_resent_event_is_stored_once_and_events_keep_their_order(any_hub: Hub) -> None:
    hub = any_hub
    token = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]

    def events(*ids: int) -> dict[str, Any]:
        items: list[dict[str, Any]] = [
            {"id": n, "time": float(n), "uid": 0, "method": f"M{n}", "job": None, "detail": {}} for n in ids
        ]
        return {"type": "events", "events": items}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            socket = await agent(hub, token, session)
            assert (await socket.receive_json())["last_event"] == 0
            await socket.send_json(events(1, 2, 3))
            assert await socket.receive_json() == {"type": "ack", "last_event": 3}
            await socket.close()
            # The acknowledgement was lost, say: the agent sends from its old cursor again.
            socket = await agent(hub, token, session)
            assert (await socket.receive_json())["last_event"] == 3, "the welcome carries the hub's cursor"
            await socket.send_json(events(2, 3, 4))
            assert await socket.receive_json() == {"type": "ack", "last_event": 4}
            await socket.send_json(events(6, 5))
            assert (await socket.receive_json())["message"].startswith("events[1].id: events must come in increasing")
            await socket.close()

    asyncio.run(scenario())
    stored = [e["method"] for e in hub.api("GET", "/api/v1/events?host=one")]
    assert stored == ["HostAdded", "M1", "M2", "M3", "M4"]

    # Removed and added again (a new token): the daemon starts over from its first event, which the
    # hub stores again; the old ones stay in the log.
    hub.api("DELETE", "/api/v1/hosts/one")
    token = hub.api("POST", "/api/v1/hosts", {"name": "one"})["token"]

    async def again() -> None:
        async with aiohttp.ClientSession() as session:
            socket = await agent(hub, token, session)
            assert (await socket.receive_json())["last_event"] == 0
            await socket.send_json(events(1, 2))
            assert await socket.receive_json() == {"type": "ack", "last_event": 2}
            await socket.close()

    asyncio.run(again())
    stored = [e["method"] for e in hub.api("GET", "/api/v1/events?host=one&limit=20")]
    assert stored == ["HostAdded", "M1", "M2", "M3", "M4", "HostRemoved", "HostAdded", "M1", "M2"]


def test_the_ui_stream_starts_with_init_then_follows_deltas_and_beacons(any_hub: Hub) -> None:
    hub = any_hub

    async def scenario() -> None:
        async with UiClient(hub) as ui:
            assert ui.state["hosts"] == {} and ui.inits == 1
            await asyncio.to_thread(hub.api, "POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})
            await ui.until(lambda s: "web-1" in s["hosts"], "the new host")
            assert ui.state["hosts"]["web-1"]["health"] == "offline"
            beacons = 0
            while beacons < 2:
                beacons += (await ui.receive())["type"] == "sync"
            assert ui.gaps == 0
            await ui.assert_converged()
            # A lost delta (the last one: no later delta shows the gap) is caught by the next beacon.
            ui.drop_deltas = 1
            await asyncio.to_thread(hub.api, "DELETE", "/api/v1/hosts/web-1")
            await ui.until(lambda s: not s["hosts"], "the host removed", timeout=30)
            assert ui.gaps == 1 and ui.inits == 2, "the beacon showed the gap and a fresh init filled it"
        # A UI that connects later is current at once, from its init alone.
        async with UiClient(hub) as late:
            await late.assert_converged()
            assert [e["method"] for e in late.state["events"]][-2:] == ["HostAdded", "HostRemoved"]

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migrations_make_exactly_the_schema_the_code_uses(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = database_url(scratch_database(backend, tmp_path, request))
    assert migrate(url) == "0008"
    assert migrate(url) == "0008", "a second upgrade changes nothing"
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0004_gives_rollouts_made_before_it_their_history_from_the_event_log(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    with database_at("0003", backend, tmp_path, request) as (url, engine):
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO rollouts (id, created, admin, image, profile, version, target, canary, "
                     "wave_percent, health_timeout_s, state, wave, waves) VALUES (:id, 1, 'alice', 'i', 'minimal', "
                     "'2.0', :target, 1, 25, 900, 'aborted', 1, 2)"),
                [{"id": rollout, "target": json.dumps({"all": True})} for rollout in ("r1", "r2")],
            )  # fmt: skip
            logged = [("alice", "RolloutStarted", {"rollout": "r1", "waves": 2}),
                      ("hub", "RolloutWave", {"rollout": "r1", "wave": 1}),
                      ("hub", "RolloutHalted", {"rollout": "r1", "reason": "web-1: fell back"}),
                      ("bob", "RolloutResumed", {"rollout": "r1"}),
                      ("alice", "RolloutStarted", {"rollout": "r2"}),
                      ("bob", "RolloutAborted", {"rollout": "r1"})]  # fmt: skip
            for number, (actor, method, detail) in enumerate(logged, 1):
                connection.execute(
                    text("INSERT INTO events (time, actor, method, detail) VALUES (:time, :actor, :method, :detail)"),
                    {"time": number, "actor": actor, "method": method, "detail": json.dumps(detail)},
                )
        assert migrate(url) == "0008"
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, history FROM rollouts ORDER BY id")).all()
    histories = {row[0]: row[1] if isinstance(row[1], list) else json.loads(row[1]) for row in rows}
    assert histories == {
        "r1": [{"time": 1, "state": "running", "by": "alice", "reason": None},
               {"time": 3, "state": "halted", "by": "hub", "reason": "web-1: fell back"},
               {"time": 4, "state": "running", "by": "bob", "reason": None},
               {"time": 6, "state": "aborted", "by": "bob", "reason": None}],
        "r2": [{"time": 5, "state": "running", "by": "alice", "reason": None}],
    }  # fmt: skip


def test_removing_a_host_takes_its_commands_out_of_runs_so_none_waits_for_it(hub: Hub) -> None:
    for name in ("a", "b"):
        hub.api("POST", "/api/v1/hosts", {"name": name})
    steps = [{"op": "motd", "params": {"text": "x"}}]
    run = hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "steps": steps})
    assert [c["state"] for c in run["commands"]] == ["pending", "pending"], "offline hosts: their commands wait"
    hub.api("DELETE", "/api/v1/hosts/b")
    after = hub.api("GET", f"/api/v1/runs/{run['id']}")
    assert after["state"] == "running" and [c["host"] for c in after["commands"]] == ["a"]
    hub.api("DELETE", "/api/v1/hosts/a")
    assert hub.api("GET", f"/api/v1/runs/{run['id']}")["state"] == "cancelled", "a run left with no host ends"
    status, answer = hub.request("DELETE", "/api/v1/hosts/a")
    assert status == 404 and answer["error"] == "name: no host named 'a'"
