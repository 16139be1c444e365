"""What a real rastosd does with commands a hub should never send: each one refused on its own, with a
status that names the field, and nothing run; a good command beside them still runs. The hub is played
over a real WebSocket, since a real hub validates its commands before it sends them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.daemon_fixtures import MANAGER, PrivateBus, Rastosd, ScratchRoot, until
from tests.hub_fixtures import free_port

pytestmark = pytest.mark.root

MOTD = [{"op": "motd", "params": {"text": "from the played hub"}}]

# (command, the field its refusal names); each command's id is its index.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"steps": MOTD, "flags": True}, "flags: must be an integer, got a boolean"),
    ({"steps": MOTD, "flags": "1"}, "flags: must be an integer, got a string"),
    ({"steps": MOTD, "flags": 1.0}, "flags: must be an integer, got a number"),
    ({"steps": MOTD, "flags": 64}, "flags: unknown bits 0x40"),
    ({"steps": MOTD, "flags": -1}, "flags: must not be negative, got -1"),
    ({"steps": "motd"}, "steps"),
    ({"steps": [{"op": "motd", "params": {"text": 7}}]}, "steps[0].params.text: must be a string"),
    ({"compliance": {"action": "scan"}, "flags": True}, "flags: must be an integer, got a boolean"),
    ({"compliance": {"action": "scan"}, "flags": 8}, "flags: unknown bits 0x8"),
    ({"compliance": {"action": "delete"}}, "compliance.action: must be scan or remediate"),
]


def test_hostile_hub_commands_are_refused_each_naming_its_field(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    bus, scratch, state_dir = daemon_env
    port, token = free_port(), "host-token"
    (tmp_path / "hub-token").write_text(token + "\n")
    config = tmp_path / "daemon.toml"
    config.write_text(f'[hub]\nurl = "ws://127.0.0.1:{port}/api/v1/agent"\ntoken_file = "{tmp_path / "hub-token"}"\n')
    commands = [{"id": f"c-{index}", **command} for index, (command, _) in enumerate(HOSTILE)]
    good = {"id": "good", "steps": MOTD, "flags": 1}  # a dry run: it runs, and changes nothing
    statuses: dict[str, list[dict[str, Any]]] = {}

    async def agent(request: web.Request) -> web.WebSocketResponse:
        assert request.headers["Authorization"] == f"Bearer {token}"
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"type": "welcome", "host": "host-1", "last_event": 0, "commands": []})
        for command in [*commands, good]:
            await socket.send_json({"type": "command", "command": command})
        async for message in socket:
            frame = json.loads(message.data)
            if frame["type"] == "command_status":
                statuses.setdefault(frame["command"], []).append(frame)
        return socket

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/agent", agent)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        daemon = Rastosd(bus, scratch, state_dir, config)
        try:
            await asyncio.to_thread(daemon.start)

            def good_ended() -> bool:
                return any(status["state"] in {"done", "failed"} for status in statuses.get("good", []))

            await asyncio.to_thread(until, good_ended, "the good command's end")
            await asyncio.to_thread(until, lambda: all(c["id"] in statuses for c in commands), "every refusal")
            jobs = await asyncio.to_thread(daemon.call, MANAGER, "ListJobs")
            assert len(jobs[0]) == 1, f"only the good command became a job: {jobs}"
        finally:
            if daemon.process is not None:
                assert await asyncio.to_thread(daemon.stop) == 0, daemon.log_text()
            await runner.cleanup()

    asyncio.run(scenario())
    assert statuses["good"][-1]["state"] == "done", statuses["good"]
    for command, (_, field) in zip(commands, HOSTILE, strict=True):
        (status,) = statuses[command["id"]]
        assert status["state"] == "rejected", (command, status)
        assert status["job"] is None
        assert field in status["result"]["error"], (command, status["result"])
