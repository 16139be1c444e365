"""Several `rastos-hub serve` processes on one PostgreSQL database (hub/bus.py): an agent connects to
any of them, and what is started, cancelled or asked on one reaches agents and UIs on the others.

The agents are simulated, speaking the real protocol, and as idempotent as rastosd: a command id is run
once however often it comes (a repeat is answered with its state)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rastos.bundle import generate_key
from tests.hub_fixtures import Hub, UiClient, make_bundle, postgresql_server, shared_hubs, upload

RETRY = 0.2  # seconds between an agent's attempts to connect


class Agent:
    """One host's agent: connects to the first hub of its list that answers, and again when it goes."""

    def __init__(self, name: str, token: str, hubs: list[Hub]) -> None:
        self.name = name
        self.token = token
        self.hubs = hubs
        self.executed: Counter[str] = Counter()  # command id -> times run (never more than once)
        self.finished: dict[str, str] = {}  # command id -> its final state
        self.received: Counter[str] = Counter()  # command id -> times the hub sent it (welcomes too)
        self.cancels: list[str] = []
        self.actions: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.hold = False  # leave commands running until release()
        self.connected_to: Hub | None = None
        self.connects = 0
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.create_task(self._run(session))

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            for hub in self.hubs:
                if hub.process is None:
                    continue
                with contextlib.suppress(aiohttp.ClientError, ConnectionError, OSError):
                    headers = {"Authorization": f"Bearer {self.token}"}
                    async with session.ws_connect(hub.agent_url, headers=headers, heartbeat=2) as socket:
                        self._socket, self.connected_to = socket, hub
                        self.connects += 1
                        await self._serve(socket)
                self._socket = self.connected_to = None
            await asyncio.sleep(RETRY)

    async def _serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            frame = message.json()
            if frame["type"] == "welcome":
                await socket.send_json({"type": "facts", "facts": {"hostname": self.name}})
                for command in frame["commands"]:
                    await self._command(socket, command["id"])
            elif frame["type"] == "command":
                await self._command(socket, frame["command"]["id"])
            elif frame["type"] == "cancel":
                self.cancels.append(frame["command"])
                await self._finish(socket, frame["command"], "cancelled")
            elif frame["type"] == "update":  # staged, and booted healthy at once: what the hub judges by
                self.updates.append(frame["update"])
                for state in ("staging", "staged"):
                    await socket.send_json({"type": "update_status", "update": frame["update"]["id"], "state": state,
                                            "version": frame["update"]["version"], "detail": None})  # fmt: skip
                boot = {"kind": "deployment", "health": "good", "image_version": frame["update"]["version"]}
                await socket.send_json({"type": "facts", "facts": {"hostname": self.name, "boot_state": boot}})
            elif frame["type"] == "action":
                self.actions.append(frame["action"])
                answer = {"action": frame["action"]["id"], "state": "done", "snapshot": 7, "entry": None,
                          "reboot_needed": False, "error": None}  # fmt: skip
                await socket.send_json({"type": "action_status", **answer})

    async def _command(self, socket: aiohttp.ClientWebSocketResponse, command: str) -> None:
        self.received[command] += 1
        if command not in self.executed:
            self.executed[command] += 1
        if command in self.finished:  # a repeat after its end: the agent says how it ended
            await self._status(socket, command, self.finished[command])
        elif self.hold:
            await self._status(socket, command, "running")
        else:
            await self._finish(socket, command, "done")

    async def _finish(self, socket: aiohttp.ClientWebSocketResponse, command: str, state: str) -> None:
        self.finished.setdefault(command, state)
        await self._status(socket, command, self.finished[command])

    async def _status(self, socket: aiohttp.ClientWebSocketResponse, command: str, state: str) -> None:
        job = list(self.executed).index(command) + 1
        await socket.send_json({"type": "command_status", "command": command, "state": state, "job": job,
                                "result": {"steps": []} if state == "done" else None})  # fmt: skip

    async def release(self) -> None:
        """Let the held commands finish, over whichever connection is up now."""
        self.hold = False
        while self._socket is None:
            await asyncio.sleep(0.05)
        for command in self.executed:
            if command not in self.finished:
                await self._finish(self._socket, command, "done")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One PostgreSQL server for the module; each test gets a database of its own on it."""
    with postgresql_server() as url:
        yield url


@pytest.fixture
def hubs(cluster: str, tmp_path: Path) -> Iterator[tuple[Hub, Hub]]:
    with shared_hubs(cluster, tmp_path) as pair:
        yield pair


def run_of(state: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The run as a UI's state shows it; a placeholder until it is there."""
    shown: dict[str, Any] = state["runs"].get(run["id"], {"state": None, "commands": [{"state": None}]})
    return shown


def add_agent(hub: Hub, name: str, hubs: list[Hub]) -> Agent:
    return Agent(name, hub.api("POST", "/api/v1/hosts", {"name": name})["token"], hubs)


def test_runs_cancels_and_actions_reach_agents_on_another_hub_and_every_ui_sees_them(
    hubs: tuple[Hub, Hub], tmp_path: Path
) -> None:
    a, b = hubs
    one, two = add_agent(a, "one", [a]), add_agent(b, "two", [b])  # added on one hub, connected to either

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session, UiClient(a) as ui_a, UiClient(b) as ui_b:
            one.start(session)
            two.start(session)
            for ui in (ui_a, ui_b):
                await ui.until(lambda s: s["hosts"]["one"]["online"] and s["hosts"]["two"]["online"], "both online")
            # A run started on hub a, one command at a time: two's goes out only once one's is done on
            # a, and is sent by whichever hub decides, to two on hub b.
            steps = [{"op": "motd", "params": {"text": "x"}}]
            body = {"target": {"all": True}, "steps": steps, "parallelism": 1}
            run = await asyncio.to_thread(a.api, "POST", "/api/v1/runs", body)
            for ui in (ui_a, ui_b):
                await ui.until(lambda s: run_of(s, run)["state"] == "complete", "the run complete")
            commands = {c["host"]: c["id"] for c in run["commands"]}
            assert one.executed == Counter({commands["one"]: 1}) and two.executed == Counter({commands["two"]: 1})
            # Cancelled through hub a while its command runs on two, connected to hub b.
            two.hold = True
            held = await asyncio.to_thread(b.api, "POST", "/api/v1/runs", {**body, "target": {"hosts": ["two"]}})
            await ui_a.until(lambda s: run_of(s, held)["commands"][0]["state"] == "running", "two running it")
            await asyncio.to_thread(a.api, "POST", f"/api/v1/runs/{held['id']}/cancel")
            for ui in (ui_a, ui_b):
                await ui.until(lambda s: run_of(s, held)["state"] == "cancelled", "the run cancelled")
            assert two.cancels == [held["commands"][0]["id"]], "the cancel went to two, through hub b"
            # A host action asked of hub a, for two on hub b; its answer reaches a's UI.
            asked = {"action": "snapshot", "description": "before"}
            action = await asyncio.to_thread(a.api, "POST", "/api/v1/hosts/two/actions", asked)
            await ui_a.until(
                lambda s: any(x["id"] == action["id"] and x["state"] == "done" for x in s["hosts"]["two"]["actions"]),
                "the action done",
            )
            assert [(x["id"], x["kind"]) for x in two.actions] == [(action["id"], "snapshot")]
            await ui_a.assert_converged()
            await ui_b.assert_converged()
            for ui in (ui_a, ui_b):
                assert ui.gaps == 0, "every delta came, in order"
            one_state, other = ui_a.state, ui_b.state
            for key in ("hosts", "runs", "rollouts", "images"):
                assert one_state[key] == other[key], f"both hubs show the same {key}"
            # A third hub, started now, learns where the agents are: its runs reach them at once.
            c = Hub(tmp_path / "c", database_url=a.database_url, admin_token=a.admin_token)
            c.directory.mkdir()
            await asyncio.to_thread(c.start)
            try:
                async with UiClient(c) as ui_c:
                    await ui_c.until(lambda s: s["hosts"]["one"]["online"] and s["hosts"]["two"]["online"], "online")
                    two.hold = False
                    third = await asyncio.to_thread(c.api, "POST", "/api/v1/runs", body)
                    await ui_c.until(lambda s: run_of(s, third)["state"] == "complete", "c's run complete")
            finally:
                assert await asyncio.to_thread(c.stop) == 0
            assert len(one.executed) == 2 and len(two.executed) == 3, "one command each run (two's cancelled too)"
            await one.stop()
            await two.stop()

    asyncio.run(scenario())


def test_step_output_of_an_agent_on_one_hub_reaches_a_runs_followers_on_another(hubs: tuple[Hub, Hub]) -> None:
    """Lines a step prints go from the agent's hub to the others (through the bus) and to the run's
    followers there, live, once each, and a follower who comes late there is sent what was kept."""
    a, b = hubs
    two = add_agent(a, "two", [b])
    two.hold = True
    headers = {"Authorization": f"Bearer {a.admin_token}"}

    def stream(hub: Hub, run_id: str) -> str:
        return hub.url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/stream"

    async def next_output(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        while (message := await ws.receive_json(timeout=10))["type"] != "output":
            pass
        return dict(message)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session, UiClient(a) as ui_a:
            two.start(session)
            await ui_a.until(lambda s: s["hosts"]["two"]["online"], "two online, on hub b")
            body = {"target": {"hosts": ["two"]}, "steps": [{"op": "motd", "params": {"text": "x"}}]}
            run = await asyncio.to_thread(a.api, "POST", "/api/v1/runs", body)
            command = run["commands"][0]["id"]
            await ui_a.until(lambda s: run_of(s, run)["commands"][0]["state"] == "running", "two running it")
            async with session.ws_connect(stream(a, run["id"]), headers=headers) as on_a:
                assert (await on_a.receive_json(timeout=10))["type"] == "run"
                assert two._socket is not None and two.connected_to is b
                chunk = {"command": command, "step": 0, "first": 0, "lines": ["from hub b", "<b>two</b>"]}
                await two._socket.send_json({"type": "output", **chunk})
                assert await next_output(on_a) == {"type": "output", "host": "two", **chunk}
                await two._socket.send_json({"type": "output", **chunk, "lines": [*chunk["lines"], "third"]})
                assert (await next_output(on_a))["lines"] == ["third"], "a repeat's lines not said twice"
                async with session.ws_connect(stream(a, run["id"]), headers=headers) as late:
                    assert (await late.receive_json(timeout=10))["type"] == "run"
                    assert (await next_output(late))["lines"] == ["from hub b", "<b>two</b>", "third"]
            await two.release()
            await ui_a.until(lambda s: run_of(s, run)["state"] == "complete", "the run complete")
            await two.stop()

    asyncio.run(scenario())


def test_a_rollout_started_on_one_hub_updates_a_host_connected_to_another(
    hubs: tuple[Hub, Hub], tmp_path: Path
) -> None:
    a, b = hubs
    generate_key(tmp_path / "key")
    status, image = upload(a, make_bundle(tmp_path, tmp_path / "key", "2.0").read_bytes())
    assert status == 201, image
    one = add_agent(a, "one", [a])

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session, UiClient(a) as ui_a:
            one.start(session)
            await ui_a.until(lambda s: s["hosts"]["one"]["online"], "one online")
            body = {"image": image["id"], "target": {"all": True}, "canary": 1, "wave_percent": 100}
            rollout = await asyncio.to_thread(b.api, "POST", "/api/v1/rollouts", body)  # b: its image from a
            await ui_a.until(lambda s: s["rollouts"].get(rollout["id"], {}).get("state") == "complete", "complete")
            # Sent through hub a; maybe twice (a welcome's resend crossing the first send), always one update.
            (sent,) = {(update["id"], update["version"]) for update in one.updates}
            assert sent == (rollout["hosts"][0]["update_id"], "2.0")
            await ui_a.assert_converged()
            await one.stop()

    asyncio.run(scenario())
    (done,) = b.api("GET", "/api/v1/rollouts")
    assert done["state"] == "complete" and [h["state"] for h in done["hosts"]] == ["done"], "b saw it end too"


def test_a_hub_killed_mid_run_its_agents_move_to_another_and_each_command_runs_exactly_once(
    hubs: tuple[Hub, Hub],
) -> None:
    a, b = hubs
    one, two = add_agent(a, "one", [a, b]), add_agent(a, "two", [a, b])
    three = add_agent(a, "three", [a])  # knows hub a only: gone with it
    one.hold = True

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for agent in (one, two, three):
                agent.start(session)
            async with UiClient(b) as ui:
                await ui.until(lambda s: all(s["hosts"][n]["online"] for n in ("one", "two", "three")), "all online")
                assert one.connected_to is a and two.connected_to is a and three.connected_to is a
                steps = [{"op": "motd", "params": {"text": "x"}}]
                body = {"target": {"hosts": ["one", "two"]}, "steps": steps, "parallelism": 1}
                run = await asyncio.to_thread(a.api, "POST", "/api/v1/runs", body)
                by_host = {c["host"]: c["id"] for c in run["commands"]}
                await ui.until(lambda s: run_of(s, run)["commands"][0]["state"] == "running", "one running")
                assert await asyncio.to_thread(a.stop, signal.SIGKILL) == -signal.SIGKILL
                # Hub a is gone mid-run: b sees its agents offline, then back, connected to b.
                await ui.until(lambda s: one.connected_to is b and two.connected_to is b, "both on hub b")
                await one.release()
                await ui.until(lambda s: run_of(s, run)["state"] == "complete", "the run complete", timeout=30)
                # Three knows no other hub: b sees it offline once it sees hub a's session gone.
                await ui.until(lambda s: not s["hosts"]["three"]["online"], "three offline")
                assert ui.state["hosts"]["one"]["online"] and ui.state["hosts"]["two"]["online"]
                await ui.assert_converged()
            assert one.executed == Counter({by_host["one"]: 1}), "one's command ran once, though sent again"
            assert two.executed == Counter({by_host["two"]: 1}), "two's command ran once"
            assert one.received[by_host["one"]] >= 2, "b's welcome sent one's command again: its run is b's too"
            for agent in (one, two, three):
                await agent.stop()

    asyncio.run(scenario())
    (run,) = b.api("GET", "/api/v1/runs")
    assert [c["state"] for c in run["commands"]] == ["done", "done"], "the store says so too"
