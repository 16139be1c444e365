"""Routes for clients that start and follow runs (`rastos-hub run`, hub/run_cli.py, and the web UI's
run form): the op library's schemas, the workflows, and one run's progress as a WebSocket.

`GET /api/v1/ops` publishes each op's parameters as JSON Schema, the same schemas the hub checks a
run's steps with (and every host's rastosd, whose ListOps publishes them too): a client types and
checks what it sends by them before anything is sent.

`GET /api/v1/workflows` lists the workflows (ops/workflows) with each variable's JSON Schema, that of
the parameter it fills, so a form can be made for them; a run names one as `workflow: {name, variables}`
and the hub expands it (workflow_run_steps): the variables are checked here, in one place, and a
refusal names the variable, not the step it lands in.

`GET /api/v1/runs/{id}/stream` follows one run: `run` (the whole run, at once and whenever the hub
cannot say what changed), `command` for each change of one of its commands (state, job, result),
`output` {"host", "command", "step", "first", "lines"} with the lines its steps print while they run
(hub/live_output.py: `first` numbers the first line among all its step printed on that host, so a
jump is lines not kept or not sent), and `end` with the whole run once it has ended, after which the
hub closes the socket (1000). A host's lines come before the change that ends its command. The
UIs' stream carries the same changes, but with the whole fleet's state first and every change of
every host after it: too much to follow one run from a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator

from hub import strictjson
from hub.access import GENERATION, Route, caller
from hub.credentials import CREDENTIALS
from hub.edge import respond
from hub.errors import NotFound, Unprocessable
from hub.fleet import INIT_NEEDED, Fleet
from hub.live_output import OUTPUT_READY, Watch
from hub.roles import VIEWER
from hub.sockets import FLEET, HEARTBEAT, SOCKETS
from ops import OPS
from ops.declared import REQUIRED, VARIABLE, Workflow, load_workflow, workflow_dirs
from ops.params import json_schema
from rastos.errors import RastosError

RUN_STREAM_MESSAGE_BYTES = 4096  # a follower sends nothing; pings and a close are all it may
log = logging.getLogger(__name__)


def published_ops() -> list[dict[str, Any]]:
    return [{"name": op.name, "description": op.description, "schema": json_schema(op.schema)}
            for op in sorted(OPS.values(), key=lambda op: op.name)]  # fmt: skip


async def _ops(request: web.Request) -> web.StreamResponse:
    return respond(published_ops())


# Workflows


def published_workflows() -> list[dict[str, Any]]:
    """Every workflow the hub can expand; one that does not load (a broken site file) is left out and
    logged, so one bad file does not hide the others."""
    names = sorted({path.stem for d in workflow_dirs() if d.is_dir() for path in d.glob("*.toml")})
    published = []
    for name in names:
        try:
            workflow = load_workflow(name)
        except RastosError as error:
            log.warning("workflow %s left out: %s", name, error.message)
            continue
        published.append({"name": name, "description": workflow.description, "variables": _variables(workflow)})
    return published


def _variables(workflow: Workflow) -> list[dict[str, Any]]:
    variables = []
    for variable in workflow.variables.values():
        fills = _fills(workflow, variable.name)
        schema = dict(fills[0][1]) if fills else {}
        schema["description"] = variable.description
        schema.pop("default", None)  # the parameter's default is not the variable's
        if variable.default is not REQUIRED:
            schema["default"] = variable.default
        variables.append({"name": variable.name, "required": variable.default is REQUIRED,
                          "fills": [place for place, _ in fills], "schema": schema})  # fmt: skip
    return variables


def _fills(workflow: Workflow, variable: str) -> list[tuple[str, dict[str, Any]]]:
    """Each OP.PARAM the variable fills, with that parameter's JSON Schema."""
    found = []
    for step in workflow.steps:
        for key, value in step["params"].items():
            match = VARIABLE.match(value) if isinstance(value, str) else None
            if match and match.group(1) == variable and step["op"] in OPS:
                spec = json_schema(OPS[step["op"]].schema).get("properties", {}).get(key)
                found.append((f"{step['op']}.{key}", spec if isinstance(spec, dict) else {}))
    return found


def workflow_run_steps(chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's `workflow: {name, variables}` (its shape checked by api.NEW_RUN_FIELDS) as its steps; a 4xx naming
    the variable that is unknown, missing, or refused by a parameter it fills."""
    name, values = chosen["name"], chosen.get("variables", {})
    try:
        workflow = load_workflow(name)
    except RastosError as error:
        raise NotFound(f"workflow.name: {error.message}") from None
    for variable, value in values.items():
        where = f"workflow.variables.{variable}"
        if variable not in workflow.variables:
            known = ", ".join(workflow.variables) or "none"
            raise Unprocessable(f"{where}: workflow {name} has no such variable (its variables: {known})")
        for place, spec in _fills(workflow, variable):
            if refused := next(iter(Draft202012Validator(spec).iter_errors(value)), None):
                raise Unprocessable(f"{where}: {refused.message[:300]} (it fills {place})")
    for variable in workflow.variables.values():
        if variable.default is REQUIRED and variable.name not in values:
            raise Unprocessable(f"workflow.variables.{variable.name}: required ({variable.description})")
    try:
        return workflow.steps_for(values)
    except RastosError as error:  # a step the variables do not explain: the workflow's own fault
        raise Unprocessable(f"workflow: {error.message}") from None


async def _workflows(request: web.Request) -> web.StreamResponse:
    return respond(published_workflows())


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
    watch = fleet.live.watch(run_id, queue)
    try:
        run = fleet.runs.get(run_id)
        if run is None:  # forgotten between the check and now: fifty newer runs ended meanwhile
            await socket.close(message=b"the hub no longer keeps this run")
            return
        sent.changed(run)
        await socket.send_str(strictjson.dumps({"type": "run", "run": run}))
        await _send_output(fleet, watch, socket)
        while run["state"] == "running":
            message = await queue.get()
            if message is OUTPUT_READY:
                await _send_output(fleet, watch, socket)
                continue
            if message is INIT_NEEDED:  # too far behind to know what changed: the whole run again
                run = fleet.runs.get(run_id, run)
                sent.changed(run)
                await socket.send_str(strictjson.dumps({"type": "run", "run": run}))
                await _send_output(fleet, watch, socket)
                continue
            change = message.get("change", {})
            if change.get("kind") != "run" or change["run"]["id"] != run_id:
                continue
            run = change["run"]
            await _send_output(fleet, watch, socket)  # a host's last lines before its end
            for command in sent.changed(run):
                await socket.send_str(strictjson.dumps({"type": "command", "command": command}))
        await socket.send_str(strictjson.dumps({"type": "end", "run": run}))
        await socket.close()
    except (ConnectionError, RuntimeError):
        return  # the follower went away, or its socket is closing
    finally:
        fleet.live.unwatch(watch)


async def _send_output(fleet: Fleet, watch: Watch, socket: web.WebSocketResponse) -> None:
    for message in fleet.live.pull(watch):
        await socket.send_str(strictjson.dumps(message))


ROUTES = (
    Route("GET", "/api/v1/ops", _ops, VIEWER),
    Route("GET", "/api/v1/workflows", _workflows, VIEWER),
    Route("GET", "/api/v1/runs/{id}/stream", _run_stream, VIEWER),
)
