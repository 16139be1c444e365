"""The hub's web server (aiohttp): the REST API, the UI, and its two WebSockets (hub/sockets.py).

What every request goes through first (errors, headers, origin, credentials, bodies) is in
hub/edge.py; who may call each route (ROUTES, below, says what each needs), in hub/access.py; what an
agent may send, in hub/protocol.py; how the listening socket stays fair, in hub/guard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from hub import access, api, edge, runs_api, updates_api
from hub.access import STORE, Route, caller
from hub.bus import Bus
from hub.credentials import CREDENTIALS, CredentialWatch
from hub.edge import respond
from hub.errors import HubError, NotFound, Unauthorized, Unprocessable
from hub.fleet import Fleet
from hub.images import ImageFiles
from hub.roles import ADMIN, AGENT, OPERATOR, PUBLIC, VIEWER
from hub.sockets import FLEET, SOCKETS, agent_socket, ui_stream
from hub.store import Store
from hub.updates_api import IMAGES
from ops.errors import ExpectedError
from ops.steps import checked_steps

log = logging.getLogger("rastos-hub")

STATIC = Path(__file__).resolve().parent / "static"
MAX_REQUEST_BYTES = 1 << 20
DEFAULT_EVENTS_PAGE = 100
MAX_EVENTS_PAGE = 1000
MAX_EVENT_ID = 2**63 - 1
ACTOR = r"[^\x00-\x1f\x7f\ud800-\udfff]{1,64}"  # an admin's name (any), agent or hub
DEFAULT_DATA_DIR = Path("/var/lib/rastos-hub")
DEFAULT_MAX_IMAGE_BYTES = 16 << 30
TICK = 1.0  # seconds between rollout checks (health timeouts)


@dataclass(frozen=True)
class Settings:
    database: str  # a SQLAlchemy URL
    sync_interval: float = 5.0  # seconds between `sync` beacons
    data_dir: Path = DEFAULT_DATA_DIR  # images/ holds the kept bundles
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # the largest bundle an upload may carry
    trusted_keys: Path | None = None  # *.pub keys a bundle must be signed by; None: not checked here

    def image_files(self) -> ImageFiles:
        return ImageFiles(self.data_dir / "images", self.max_image_bytes, self.trusted_keys)


SETTINGS = web.AppKey("settings", Settings)


def make_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[edge.errors_as_json, edge.same_origin, access.authorize], client_max_size=MAX_REQUEST_BYTES
    )
    app[SETTINGS] = settings
    app[IMAGES] = settings.image_files()
    app[SOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(_fleet_context)
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(edge.security_headers)
    access.register_static(app, "/static", STATIC)
    access.register(app, ROUTES)
    return app


def openapi_document() -> dict[str, Any]:
    """The REST API's document, each operation with the access its route is registered with."""
    return api.openapi_document({(route.method, route.path): route.access for route in ROUTES})


async def _fleet_context(app: web.Application) -> Any:
    store = Store(app[SETTINGS].database)
    # PostgreSQL may be shared by several hub processes (hub/holders.py lets them): they keep in step over
    # the bus. SQLite is this process's alone.
    bus = Bus(app[SETTINGS].database) if store.engine.dialect.name == "postgresql" else None
    if bus is not None:
        await bus.start()
    fleet = Fleet(store, app[IMAGES], bus)
    await fleet.load()
    app[IMAGES].clean({image["sha256"] for image in fleet.rollouts.images.values()})
    app[FLEET] = fleet
    app[STORE] = store
    app[CREDENTIALS] = watch = CredentialWatch(store)
    await watch.check()  # learns the revision, and when the first grace or session ends
    beacon = asyncio.create_task(_beacons(fleet, app[SETTINGS].sync_interval))
    ticks = asyncio.create_task(_ticks(fleet))
    polls = asyncio.create_task(watch.run())
    follows = asyncio.create_task(fleet.follow()) if bus is not None else None
    yield
    beacon.cancel()
    ticks.cancel()
    polls.cancel()
    if follows is not None:
        follows.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await polls  # a read of the revision it was making ends before the store closes
    await watch.stop()
    if bus is not None:
        await bus.close()
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


async def _ticks(fleet: Fleet) -> None:
    while True:
        await asyncio.sleep(TICK)
        try:
            await fleet.tick()
        except Exception:  # the database away, say: the next tick tries again
            log.exception("the rollouts' check failed")


# Pages, documents and sessions


async def _index(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def _openapi(_request: web.Request) -> web.StreamResponse:
    return respond(openapi_document())


async def _login(request: web.Request) -> web.StreamResponse:
    body = await edge.json_body(request, api.LOGIN)
    store = request.app[FLEET].store
    admin = await store.admin_for_token(body["token"])
    if admin is None:
        raise Unauthorized("token: not a valid admin token")
    edge.trusted(request)
    session, _expires = await store.add_session(admin.name, edge.SESSION_LIFETIME)
    response = web.Response(status=204)
    edge.set_session(request, response, session)
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    if (session := edge.session_id(request)) is not None:
        await request.app[FLEET].store.remove_session(session)
    response = web.Response(status=204)
    edge.clear_session(request, response)
    return response


# REST


async def _me(request: web.Request) -> web.StreamResponse:
    who = caller(request)
    return respond({"name": who.name, "role": who.role, "may": access.allowed(request.app, who.role)})


async def _state(request: web.Request) -> web.StreamResponse:
    return respond(request.app[FLEET].init_message())


async def _hosts(request: web.Request) -> web.StreamResponse:
    return respond(list(request.app[FLEET].hosts.values()))


async def _host(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    host = request.app[FLEET].hosts.get(name)
    if host is None:
        raise NotFound(f"name: no host named {name[:100]!r}")
    return respond(host)


async def _add_host(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    body = await edge.json_body(request, api.NEW_HOST)
    token = await request.app[FLEET].add_host(body["name"], body.get("groups", []), admin)
    return respond({"name": body["name"], "token": token}, status=201)


async def _remove_host(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    await request.app[FLEET].remove_host(request.match_info["name"], admin)
    return web.Response(status=204)


async def _rotate_host(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    body = await edge.json_body(request, api.ROTATION) if request.can_read_body else {}
    name, fleet = request.match_info["name"], request.app[FLEET]
    token, expires, logged = await fleet.store.rotate_host_token(name, int(body.get("grace_s", 0)), admin)
    fleet.publish_event(logged)
    await request.app[CREDENTIALS].check()  # without grace, the agent on the old token goes now
    return respond({"name": name, "token": token, "old_token_expires": expires})


async def _revoke_host(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    fleet = request.app[FLEET]
    fleet.publish_event(await fleet.store.revoke_host_token(request.match_info["name"], admin))
    await request.app[CREDENTIALS].check()
    return web.Response(status=204)


async def _host_action(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    body = api.check_host_action(await edge.json_body(request, api.HOST_ACTION_FIELDS))
    fleet, name = request.app[FLEET], request.match_info["name"]
    # JSON Schema counts 1.0 as an integer; the agent takes ids as integers only.
    snapshot = None if body.get("snapshot") is None else int(body["snapshot"])
    action = await fleet.host_action(name, admin, body["action"], snapshot, body.get("description"))
    return respond(action, status=202)


async def _runs(request: web.Request) -> web.StreamResponse:
    return respond(list(request.app[FLEET].runs.values()))


async def _run(request: web.Request) -> web.StreamResponse:
    run = request.app[FLEET].runs.get(request.match_info["id"])
    if run is None:
        raise NotFound(f"id: no run {request.match_info['id'][:100]!r}")
    return respond(run)


async def _start_run(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    body = api.check_new_run(await edge.json_body(request, api.NEW_RUN_FIELDS))
    compliance = None
    if "compliance" in body:  # no steps: each host builds its remediation from its own scan
        steps: list[dict[str, Any]] = []
        compliance = {"action": body["compliance"]["action"], "checks": list(body["compliance"].get("checks", []))}
    elif "workflow" in body:
        steps = runs_api.workflow_run_steps(body["workflow"])
    else:
        steps = [{"op": step["op"], "params": step.get("params", {})} for step in body["steps"]]
    try:  # the op library's own checks, as each host's rastosd will make them: refused before sending
        if steps:
            checked_steps(steps)
    except ExpectedError as error:
        raise Unprocessable(str(error)) from None
    # JSON Schema counts 1.0 as an integer; the columns (PostgreSQL's at least) take only ints.
    flags, parallelism = int(body.get("flags", 0)), int(body.get("parallelism", 10))
    run = await request.app[FLEET].start_run(admin, body["target"], steps, flags, parallelism, compliance)
    return respond(run, status=201)


async def _cancel_run(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    return respond(await request.app[FLEET].cancel_run(request.match_info["id"], admin))


async def _events(request: web.Request) -> web.StreamResponse:
    query = request.query
    limit = _integer(query, "limit", 1, MAX_EVENTS_PAGE) or DEFAULT_EVENTS_PAGE
    before = _integer(query, "before", 1, MAX_EVENT_ID)
    host, actor, method = query.get("host"), query.get("actor"), query.get("method")
    if host is not None and not re.fullmatch(api.NAME["pattern"], host):
        raise HubError(f"host: {host[:100]!r} is not a host name")
    if actor is not None and not re.fullmatch(ACTOR, actor):
        raise HubError(f"actor: {actor[:100]!r} is not an actor's name (1 to 64 characters, no control ones)")
    if method is not None and not re.fullmatch(api.EVENT_METHOD["pattern"], method):
        raise HubError(f"method: {method[:100]!r} is not an event's name")
    since, until = _seconds(query, "since"), _seconds(query, "until")
    found = await request.app[FLEET].store.events(
        limit, host=host, before=before, actor=actor, method=method, since=since, until=until
    )
    return respond(found)


def _seconds(query: Any, key: str) -> float | None:
    text = query.get(key)
    if text is None:
        return None
    try:
        value = float(text) if len(text) <= 40 else -1.0
    except ValueError:
        value = -1.0
    if not 0 <= value <= api.MAX_SECONDS:  # NaN too
        raise HubError(f"{key}: must be seconds since 1970 (as 1700000000 or 1700000000.5), got {text[:40]!r}")
    return value


def _integer(query: Any, key: str, low: int, high: int) -> int | None:
    text = query.get(key)
    if text is None:
        return None
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", text) or not low <= int(text) <= high:
        raise HubError(f"{key}: must be an integer between {low} and {high}, got {text[:40]!r}")
    return int(text)


ROUTES = (
    Route("GET", "/", _index, PUBLIC),
    Route("GET", "/api/v1/openapi.json", _openapi, PUBLIC),
    Route("POST", "/api/v1/login", _login, PUBLIC),
    Route("POST", "/api/v1/logout", _logout, VIEWER),
    Route("GET", "/api/v1/me", _me, VIEWER),
    Route("GET", "/api/v1/state", _state, VIEWER),
    Route("GET", "/api/v1/hosts", _hosts, VIEWER),
    Route("POST", "/api/v1/hosts", _add_host, ADMIN),
    Route("GET", "/api/v1/hosts/{name}", _host, VIEWER),
    Route("DELETE", "/api/v1/hosts/{name}", _remove_host, ADMIN),
    Route("POST", "/api/v1/hosts/{name}/rotate", _rotate_host, ADMIN),
    Route("POST", "/api/v1/hosts/{name}/revoke", _revoke_host, ADMIN),
    Route("POST", "/api/v1/hosts/{name}/actions", _host_action, OPERATOR),
    Route("GET", "/api/v1/runs", _runs, VIEWER),
    Route("POST", "/api/v1/runs", _start_run, OPERATOR),  # dry runs too: flags are the run's
    Route("GET", "/api/v1/runs/{id}", _run, VIEWER),
    Route("POST", "/api/v1/runs/{id}/cancel", _cancel_run, OPERATOR),
    Route("GET", "/api/v1/events", _events, VIEWER),
    *updates_api.ROUTES,
    *runs_api.ROUTES,
    Route("GET", "/api/v1/stream", ui_stream, VIEWER),  # its messages: sockets.UI_ACTIONS
    Route("GET", "/api/v1/agent", agent_socket, AGENT),
)
