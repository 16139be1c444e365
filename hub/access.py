"""Who may call each route, checked in one place.

Every route is registered through `register` (or `register_static`) with the Access it needs
(hub/roles.py), and the `authorize` middleware checks it before any handler runs: it authenticates
the caller, refuses a role too low (403, naming the role needed and the caller's), and leaves who
asked on the request for the handler (`caller`, `agent`). A route the router knows but the table
does not (one added with `app.router.add_*` directly) is a fault of the hub's own: it is never
served, it fails with 500 and a line in the log (and tests/test_hub_roles.py fails first).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from aiohttp import web

from hub import edge
from hub.credentials import CREDENTIALS, Credential, Kind
from hub.edge import Handler
from hub.errors import RoleRefused, Unauthorized
from hub.roles import PUBLIC, Access, Role
from hub.store import Store


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as the router writes it: /api/v1/hosts/{name}
    handler: Handler
    access: Access


@dataclass(frozen=True)
class Caller:
    """The admin a request is from, and what they authenticated with."""

    name: str
    role: Role
    credential: Credential


@dataclass(frozen=True)
class Agent:
    """The host a request is from, by its own agent token."""

    host: str
    credential: Credential


Operation = tuple[str, str]  # (method, path): ("POST", "/api/v1/runs")
ACCESS: web.AppKey[dict[Operation, Access]] = web.AppKey("access")
STORE = web.AppKey("store", Store)

T = TypeVar("T")


def _request_key(name: str, kind: type[T]) -> web.RequestKey[T]:
    """A typed key of a request's own values. web.RequestKey came with aiohttp 3.12; before it (Debian
    trixie's 3.11, which the hub appliance runs on) a request is keyed by the name alone."""
    maker = getattr(web, "RequestKey", None)
    return maker(name, kind) if maker is not None else cast("web.RequestKey[T]", name)


CALLER = _request_key("caller", Caller)
AGENT_CALLER = _request_key("agent", Agent)
# The credential watch's generation before the caller was looked up (see CredentialWatch.add).
GENERATION = _request_key("generation", int)


def register(app: web.Application, routes: Iterable[Route]) -> None:
    table = app.setdefault(ACCESS, {})
    for route in routes:
        _record(table, (route.method, route.path), route.access)
        app.router.add_route(route.method, route.path, route.handler)
        if route.method == "GET":  # a HEAD is a GET without its body: the same access
            app.router.add_route("HEAD", route.path, route.handler)


def register_static(app: web.Application, prefix: str, directory: Path) -> None:
    """Files for anyone (the UI's script and styles: the login page needs them)."""
    _record(app.setdefault(ACCESS, {}), ("GET", prefix), PUBLIC)
    app.router.add_static(f"{prefix}/", directory)


def _record(table: dict[Operation, Access], operation: Operation, access: Access) -> None:
    if operation in table:
        raise ValueError(f"{operation[0]} {operation[1]} is registered twice")
    table[operation] = access


def operation(request: web.Request) -> Operation | None:
    """The route the request matched, as its table knows it; None when it matched none (404, 405)."""
    if request.match_info.http_exception is not None:
        return None
    resource = request.match_info.route.resource
    assert resource is not None, "a matched route has its resource"
    return ("GET" if request.method == "HEAD" else request.method), resource.canonical


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    found = operation(request)
    if found is None:
        return await handler(request)  # the router's own 404 or 405
    access = request.app[ACCESS].get(found)
    if access is None:
        raise RuntimeError(f"{found[0]} {found[1]} was registered without an access rule (hub/access.py)")
    if access != PUBLIC:
        await _authenticate(request, access, f"{found[0]} {found[1]}")
    return await handler(request)


async def _authenticate(request: web.Request, access: Access, what: str) -> None:
    store = request.app[STORE]
    request[GENERATION] = request.app[CREDENTIALS].generation
    if access.hosts:
        token = edge.bearer(request)
        host = await store.host_for_token(token) if token is not None else None
        if host is not None and token is not None:
            edge.trusted(request)
            request[AGENT_CALLER] = Agent(host, Credential.of(Kind.host, token, host))
            return
        if access.role is None:
            raise Unauthorized("authorization: not a valid host token")
    assert access.role is not None
    try:
        admin, credential = await edge.admin_credential(request, store)
    except Unauthorized:
        if access.hosts:
            raise Unauthorized("authorization: no valid admin or host token") from None
        raise
    if not admin.role.allows(access.role):
        raise RoleRefused(what, access.role.value, admin.name, admin.role.value)
    request[CALLER] = Caller(admin.name, admin.role, credential)


def caller(request: web.Request) -> Caller:
    """The admin of a request to a route that needs a role (the middleware made sure of one)."""
    return request[CALLER]


def agent(request: web.Request) -> Agent | None:
    """The host of a request made with its own token, on a route that lets hosts in."""
    return request.get(AGENT_CALLER)


def allowed(app: web.Application, role: Role) -> list[str]:
    """Every operation a role may do, as `METHOD PATH` (what the UI shows or hides by)."""
    return sorted(f"{method} {path}" for (method, path), access in app[ACCESS].items()
                  if access.role is not None and role.allows(access.role))  # fmt: skip
