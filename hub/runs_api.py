"""Routes for clients that start and follow runs (`rastos-hub run`, hub/run_cli.py): the op library's
schemas, and one run's progress as a WebSocket.

`GET /api/v1/ops` publishes each op's parameters as JSON Schema, the same schemas the hub checks a
run's steps with (and every host's rastosd, whose ListOps publishes them too): a client types and
checks what it sends by them before anything is sent.

`GET /api/v1/runs/{id}/stream` follows one run: `run` (the whole run, at once and whenever the hub
cannot say what changed), `command` for each change of one of its commands (state, job, result),
and `end` with the whole run once it has ended, after which the hub closes the socket (1000). The
UIs' stream carries the same changes, but with the whole fleet's state first and every change of
every host after it: too much to follow one run from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from hub import strictjson
from hub.access import GENERATION, Route, caller
from hub.credentials import CREDENTIALS
from hub.edge import respond
from hub.errors import NotFound
from hub.fleet import INIT_NEEDED, Fleet
from hub.roles import VIEWER
from hub.sockets import FLEET, HEARTBEAT, SOCKETS
from ops import OPS
from ops.params import json_schema

RUN_STREAM_MESSAGE_BYTES = 4096  # a follower sends nothing; pings and a close are all it may


def published_ops() -> list[dict[str, Any]]:
    return [{"name": op.name, "description": op.description, "schema": json_schema(op.schema)}
            for op in sorted(OPS.values(), key=lambda op: op.name)]  # fmt: skip


async def _ops(request: web.Request) -> web.StreamResponse:
    return respond(published_ops())


async def _run_stream(request: web.Request) -> web.StreamResponse:
    fleet, watch = request.app[FLEET], request.app[CREDENTIALS]
    run_id = request.match_info["id"]
    if run_id not in fleet.runs:  # answered as JSON before the upgrade, like any other 404
        raise NotFound(f"id: no run {run_id[:100]!r}")
    socket = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=RUN_STREAM_MESSAGE_BYTES)
    await socket.prepare(request)
    watch.add(socket, caller(request).credential, request[GENERATION])
    request.app[SOCKETS].add(socket)
    queue = fleet.subscribe()
    sender = asyncio.create_task(_forward(fleet, run_id, queue, socket))
    try:
        async for _message in socket:
            pass  # the follower has nothing to say; reading notices its close
    finally:
        fleet.unsubscribe(queue)
        watch.discard(socket)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return socket


class _Sent:
    """What a follower has been sent of each command, so only commands that changed go out again."""

    def __init__(self) -> None:
        self.commands: dict[str, tuple[str, Any, Any, Any]] = {}

    def changed(self, run: dict[str, Any]) -> list[dict[str, Any]]:
        fresh = []
        for command in run["commands"]:
            # A result is replaced, never changed in place: the same object is the same result.
            seen = (command["state"], command["job_id"], command["finished"], command["result"])
            last = self.commands.get(command["id"])
            if last is None or last[:3] != seen[:3] or last[3] is not seen[3]:
                self.commands[command["id"]] = seen
                fresh.append(command)
        return fresh


async def _forward(
    fleet: Fleet, run_id: str, queue: asyncio.Queue[dict[str, Any]], socket: web.WebSocketResponse
) -> None:
    sent = _Sent()
    try:
        run = fleet.runs.get(run_id)
        if run is None:  # forgotten between the check and now: fifty newer runs ended meanwhile
            await socket.close(message=b"the hub no longer keeps this run")
            return
        sent.changed(run)
        await socket.send_str(strictjson.dumps({"type": "run", "run": run}))
        while run["state"] == "running":
            message = await queue.get()
            if message is INIT_NEEDED:  # too far behind to know what changed: the whole run again
                run = fleet.runs.get(run_id, run)
                sent.changed(run)
                await socket.send_str(strictjson.dumps({"type": "run", "run": run}))
                continue
            change = message.get("change", {})
            if change.get("kind") != "run" or change["run"]["id"] != run_id:
                continue
            run = change["run"]
            for command in sent.changed(run):
                await socket.send_str(strictjson.dumps({"type": "command", "command": command}))
        await socket.send_str(strictjson.dumps({"type": "end", "run": run}))
        await socket.close()
    except (ConnectionError, RuntimeError):
        return  # the follower went away, or its socket is closing


ROUTES = (
    Route("GET", "/api/v1/ops", _ops, VIEWER),
    Route("GET", "/api/v1/runs/{id}/stream", _run_stream, VIEWER),
)
