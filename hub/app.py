"""The hub's web server (aiohttp): the REST API, the UI's state stream, the agents' socket, the UI.

Admins authenticate with a bearer token, or with the cookie the login route sets for the web UI.
An agent authenticates with its host's token and can only ever speak as that host: the host name
comes from the token, never from what the agent says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from hub import api
from hub.errors import HubError, NotFound, Unauthorized
from hub.fleet import AgentLink, Fleet
from hub.protocol import MAX_MESSAGE_BYTES, CommandStatus, ProtocolError, decode, parse_agent_message
from hub.store import Store

log = logging.getLogger("rastos-hub")

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "rastos_hub"
MAX_REQUEST_BYTES = 1 << 20
UI_MESSAGE_BYTES = 4096  # a UI only ever sends {"type": "get_state"}
HEARTBEAT = 20.0  # WebSocket pings: a peer that vanished is noticed within two of them


@dataclass(frozen=True)
class Settings:
    database: str  # a SQLAlchemy URL
    sync_interval: float = 5.0  # seconds between `sync` beacons


FLEET = web.AppKey("fleet", Fleet)
SETTINGS = web.AppKey("settings", Settings)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HubError as error:
        return web.json_response({"error": error.message}, status=error.status)


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_REQUEST_BYTES)
    app[SETTINGS] = settings
    app[SOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(_fleet_context)
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/v1/openapi.json", _openapi)
    app.router.add_post("/api/v1/login", _login)
    app.router.add_get("/api/v1/state", _state)
    app.router.add_get("/api/v1/hosts", _hosts)
    app.router.add_post("/api/v1/hosts", _add_host)
    app.router.add_get("/api/v1/hosts/{name}", _host)
    app.router.add_delete("/api/v1/hosts/{name}", _remove_host)
    app.router.add_get("/api/v1/runs", _runs)
    app.router.add_post("/api/v1/runs", _start_run)
    app.router.add_get("/api/v1/runs/{id}", _run)
    app.router.add_post("/api/v1/runs/{id}/cancel", _cancel_run)
    app.router.add_get("/api/v1/events", _events)
    app.router.add_get("/api/v1/stream", _ui_stream)
    app.router.add_get("/api/v1/agent", _agent_socket)
    return app


async def _fleet_context(app: web.Application) -> Any:
    store = Store(app[SETTINGS].database)
    fleet = Fleet(store)
    await fleet.load()
    app[FLEET] = fleet
    beacon = asyncio.create_task(_beacons(fleet, app[SETTINGS].sync_interval))
    yield
    beacon.cancel()
    await store.close()


async def _close_sockets(app: web.Application) -> None:
    """On stop, say goodbye (1001, going away) to every UI and agent: they reconnect to the next
    hub; without this, a stop would wait for every open socket to close by itself."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for socket in list(sockets):
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"the hub is stopping")


async def _beacons(fleet: Fleet, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        fleet.beacon()


# Authentication


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None


async def _admin(request: web.Request) -> str:
    token = _bearer(request) or request.cookies.get(COOKIE)
    admin = await request.app[FLEET].store.admin_for_token(token) if token else None
    if admin is None:
        raise Unauthorized("authorization: no valid admin token", hint="rastos-hub admin add NAME prints one")
    return admin


async def _json_body(request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
    try:
        document = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HubError(f"body: not valid JSON: {error}") from None
    return api.validate(schema, document)


# Pages and documents


async def _index(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def _openapi(_request: web.Request) -> web.StreamResponse:
    return web.json_response(api.openapi_document())


async def _login(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request, api.LOGIN)
    if await request.app[FLEET].store.admin_for_token(body["token"]) is None:
        raise Unauthorized("token: not a valid admin token")
    response = web.Response(status=204)
    response.set_cookie(COOKIE, body["token"], httponly=True, samesite="Strict", secure=request.secure)
    return response


# REST


async def _state(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    return web.json_response(request.app[FLEET].init_message())


async def _hosts(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    return web.json_response(list(request.app[FLEET].hosts.values()))


async def _host(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    name = request.match_info["name"]
    host = request.app[FLEET].hosts.get(name)
    if host is None:
        raise NotFound(f"name: no host named {name!r}")
    return web.json_response(host)


async def _add_host(request: web.Request) -> web.StreamResponse:
    admin = await _admin(request)
    body = await _json_body(request, api.NEW_HOST)
    token = await request.app[FLEET].add_host(body["name"], body.get("groups", []), admin)
    return web.json_response({"name": body["name"], "token": token}, status=201)


async def _remove_host(request: web.Request) -> web.StreamResponse:
    admin = await _admin(request)
    await request.app[FLEET].remove_host(request.match_info["name"], admin)
    return web.Response(status=204)


async def _runs(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    return web.json_response(list(request.app[FLEET].runs.values()))


async def _run(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    run = request.app[FLEET].runs.get(request.match_info["id"])
    if run is None:
        raise NotFound(f"id: no run {request.match_info['id']!r}")
    return web.json_response(run)


async def _start_run(request: web.Request) -> web.StreamResponse:
    admin = await _admin(request)
    body = await _json_body(request, api.NEW_RUN)
    steps = [{"op": step["op"], "params": step.get("params", {})} for step in body["steps"]]
    run = await request.app[FLEET].start_run(admin, body["target"], steps, body.get("flags", 0),
                                             body.get("parallelism", 10))  # fmt: skip
    return web.json_response(run, status=201)


async def _cancel_run(request: web.Request) -> web.StreamResponse:
    admin = await _admin(request)
    return web.json_response(await request.app[FLEET].cancel_run(request.match_info["id"], admin))


async def _events(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    query = request.query
    try:
        limit = int(query.get("limit", "100"))
        before = int(query["before"]) if "before" in query else None
    except ValueError:
        raise HubError("limit, before: must be integers") from None
    if not 1 <= limit <= 1000:
        raise HubError(f"limit: must be between 1 and 1000, got {limit}")
    return web.json_response(await request.app[FLEET].store.events(limit, host=query.get("host"), before=before))


# The UI's state stream


async def _ui_stream(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    fleet = request.app[FLEET]
    socket = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=UI_MESSAGE_BYTES)
    await socket.prepare(request)
    request.app[SOCKETS].add(socket)
    queue = fleet.subscribe()
    # Everything a UI is sent goes through its queue, in order; an init is made when it is sent,
    # so the deltas queued before it are older than it and the UI skips them by version.
    queue.put_nowait({"type": "init_needed"})
    sender = asyncio.create_task(_forward(fleet, queue, socket))
    try:
        async for message in socket:
            if message.type == WSMsgType.TEXT and _is_get_state(message.data):
                queue.put_nowait({"type": "init_needed"})
            elif message.type == WSMsgType.TEXT:
                await socket.close(code=1008, message=b'only {"type": "get_state"} is understood')
    finally:
        fleet.unsubscribe(queue)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return socket


def _is_get_state(data: str) -> bool:
    try:
        return bool(json.loads(data) == {"type": "get_state"})
    except ValueError:
        return False


async def _forward(fleet: Fleet, queue: asyncio.Queue[dict[str, Any]], socket: web.WebSocketResponse) -> None:
    while True:
        message = await queue.get()
        if message["type"] == "init_needed":
            message = fleet.init_message()
        try:
            await socket.send_json(message)
        except ConnectionError:
            return


# The agents' socket


async def _agent_socket(request: web.Request) -> web.StreamResponse:
    fleet = request.app[FLEET]
    token = _bearer(request)
    host = await fleet.store.host_for_token(token) if token else None
    if host is None:
        raise Unauthorized("authorization: not a valid host token")
    socket = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE_BYTES)
    await socket.prepare(request)
    request.app[SOCKETS].add(socket)
    link = AgentLink(host, socket.send_json, socket.close)
    try:
        await socket.send_json(await fleet.agent_connected(link))
        await fleet.agent_ready(link)
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                break  # binary frames, oversized frames and errors all end the connection
            if not await _agent_message(fleet, host, socket, message.data):
                break
    finally:
        await fleet.agent_disconnected(link)
    return socket


async def _agent_message(fleet: Fleet, host: str, socket: web.WebSocketResponse, data: str) -> bool:
    """Handle one agent message; False (after telling the agent why) ends the connection."""
    try:
        kind, body = parse_agent_message(decode(data))
    except (ValueError, ProtocolError) as error:
        text = error.message if isinstance(error, ProtocolError) else f"message: not valid JSON: {error}"
        log.warning("agent %s sent a bad message: %s", host, text)
        await socket.send_json({"type": "error", "message": text})
        await socket.close(code=1008, message=text.encode()[:120])
        return False
    if host not in fleet.hosts:
        await socket.close(code=1008, message=b"this host was removed from the hub")
        return False
    if kind == "facts":
        assert isinstance(body, dict)
        await fleet.facts(host, body)
    elif kind == "events":
        assert isinstance(body, list)
        await socket.send_json({"type": "ack", "last_event": await fleet.agent_events(host, body)})
    else:
        assert isinstance(body, CommandStatus)
        await fleet.command_status(host, body)
    return True
