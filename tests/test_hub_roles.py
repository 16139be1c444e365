"""Roles on a real hub: every route the app registers, called over HTTP by an admin of each role and by
nobody. The cases come from the app's own table of routes (hub/access.py), so a route added tomorrow
is called here too: an allowed caller is never refused (401 or 403), a refused one gets exactly 403
naming the role needed and theirs, and a refused call that would change something changes nothing.

Refused calls aim at real things (a host, a running run, a spare image, a running and a paused
rollout), so a missing check would show as a change; allowed calls that change something get fresh
things of their own, made first by the admin.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hub.access import ACCESS, Caller
from hub.app import Settings, make_app, openapi_document
from hub.credentials import Credential, Kind
from hub.errors import RoleRefused
from hub.roles import RANKS, Access, Role
from hub.sockets import ui_action
from hub.store import database_url, migrate
from rastos.bundle import generate_key
from tests.hub_fixtures import Hub, _serving, make_bundle, the_close, upload

NAMES = {Role.viewer: "vera", Role.operator: "otto", Role.admin: "alice"}
MOTD = [{"op": "motd", "params": {"text": "x"}}]
TABLE: dict[tuple[str, str], Access] = make_app(Settings("sqlite:///unused"))[ACCESS]
OPERATIONS = sorted(TABLE)


@dataclass
class World:
    """One hub for every case, with something of each kind to aim at."""

    hub: Hub
    directory: Path
    tokens: dict[Role, str]
    run: str  # running: web-1 is offline, so its command waits
    image: str  # in the running rollout
    spare_image: str  # in no rollout: removable
    rollout: str  # running, on web-1
    paused: str  # paused, on web-2
    bundles: int = 0

    def as_admin(self, method: str, path: str, body: object = None) -> Any:
        return self.hub.api(method, path, body)

    def fresh_host(self) -> str:
        name = f"h-{uuid.uuid4().hex[:12]}"
        self.as_admin("POST", "/api/v1/hosts", {"name": name})
        return name

    def fresh_rollout(self) -> str:
        body = {"image": self.image, "target": {"hosts": [self.fresh_host()]}}
        return str(self.as_admin("POST", "/api/v1/rollouts", body)["id"])

    def new_bundle(self) -> bytes:
        self.bundles += 1
        return make_bundle(self.directory, self.directory / "key", f"3.{self.bundles}").read_bytes()

    def fresh_image(self) -> str:
        status, image = upload(self.hub, self.new_bundle())
        assert status == 201, image
        return str(image["id"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = Path(tmp_path_factory.mktemp("roles"))
    generate_key(directory / "key")
    for hub in _serving(Hub(directory / "hub")):
        tokens = {Role.admin: hub.admin_token}
        for role in (Role.viewer, Role.operator):
            added = hub.call("admin", "add", NAMES[role], "--role", role)
            assert added.returncode == 0, added.stderr
            tokens[role] = added.stdout.strip().splitlines()[-1]
        for name in ("web-1", "web-2", "db-1"):
            hub.api("POST", "/api/v1/hosts", {"name": name, "groups": ["fleet"]})
        run = hub.api("POST", "/api/v1/runs", {"target": {"hosts": ["web-1"]}, "steps": MOTD})
        images = []
        for version in ("2.0", "2.1"):
            status, image = upload(hub, make_bundle(directory, directory / "key", version).read_bytes())
            assert status == 201, image
            images.append(image["id"])
        rollout = hub.api("POST", "/api/v1/rollouts", {"image": images[0], "target": {"hosts": ["web-1"]}})
        paused = hub.api("POST", "/api/v1/rollouts", {"image": images[0], "target": {"hosts": ["web-2"]}})
        hub.api("POST", f"/api/v1/rollouts/{paused['id']}/pause")
        yield World(hub, directory, tokens, run["id"], images[0], images[1], rollout["id"], paused["id"])


@dataclass
class Call:
    path: str
    body: object = None
    raw: bytes | None = None
    content_type: str = "application/json"
    ok: int | None = None  # what an allowed caller is answered; None: anything but 401, 403 and 5xx


def call(hub: Hub, method: str, request: Call, token: str | None) -> tuple[int, Any]:
    data = request.raw if request.raw is not None else None if request.body is None else json.dumps(request.body)
    sent = urllib.request.Request(f"{hub.url}{request.path}", method=method,
                                  data=data.encode() if isinstance(data, str) else data)  # fmt: skip
    sent.add_header("Content-Type", request.content_type)
    if token is not None:
        sent.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(sent, timeout=30, context=hub.client_tls) as response:
            return response.status, _document(response.read(), response.headers.get_content_type())
    except urllib.error.HTTPError as error:
        return error.code, _document(error.read(), error.headers.get_content_type())


def _document(body: bytes, content_type: str) -> Any:
    return json.loads(body) if content_type == "application/json" and body else body


# How to call each route: `allowed` says whether the caller's role lets it through. A route not here is
# called with "nothing" for each path parameter and an empty JSON body, which is enough to be refused.
Example = Callable[[World, bool], Call]
EXAMPLES: dict[tuple[str, str], Example] = {
    ("GET", "/"): lambda w, a: Call("/", ok=200),
    ("GET", "/static"): lambda w, a: Call("/static/hub.js", ok=200),
    ("GET", "/api/v1/openapi.json"): lambda w, a: Call("/api/v1/openapi.json", ok=200),
    ("POST", "/api/v1/login"): lambda w, a: Call("/api/v1/login", {"token": w.tokens[Role.viewer]}, ok=204),
    ("POST", "/api/v1/logout"): lambda w, a: Call("/api/v1/logout", ok=204),
    ("GET", "/api/v1/me"): lambda w, a: Call("/api/v1/me", ok=200),
    ("GET", "/api/v1/state"): lambda w, a: Call("/api/v1/state", ok=200),
    ("GET", "/api/v1/hosts"): lambda w, a: Call("/api/v1/hosts", ok=200),
    ("GET", "/api/v1/hosts/{name}"): lambda w, a: Call("/api/v1/hosts/web-1", ok=200),
    ("POST", "/api/v1/hosts"): lambda w, a: Call("/api/v1/hosts", {"name": f"n-{uuid.uuid4().hex[:12]}"}, ok=201),
    ("DELETE", "/api/v1/hosts/{name}"): lambda w, a: Call(f"/api/v1/hosts/{w.fresh_host() if a else 'web-1'}", ok=204),
    ("POST", "/api/v1/hosts/{name}/rotate"): lambda w, a: Call(
        f"/api/v1/hosts/{w.fresh_host() if a else 'web-1'}/rotate", {"grace_s": 0}, ok=200
    ),
    ("POST", "/api/v1/hosts/{name}/revoke"): lambda w, a: Call(
        f"/api/v1/hosts/{w.fresh_host() if a else 'web-1'}/revoke", ok=204
    ),
    # web-1 has no agent: an action allowed is refused as offline, never queued.
    ("POST", "/api/v1/hosts/{name}/actions"): lambda w, a: Call(
        "/api/v1/hosts/web-1/actions", {"action": "snapshot", "description": "x"}, ok=409
    ),
    ("GET", "/api/v1/runs"): lambda w, a: Call("/api/v1/runs", ok=200),
    ("GET", "/api/v1/runs/{id}"): lambda w, a: Call(f"/api/v1/runs/{w.run}", ok=200),
    ("POST", "/api/v1/runs"): lambda w, a: Call(
        "/api/v1/runs", {"target": {"hosts": ["web-1"]}, "steps": MOTD, "flags": 1}, ok=201
    ),
    ("POST", "/api/v1/runs/{id}/cancel"): lambda w, a: Call(
        f"/api/v1/runs/{_fresh_run(w) if a else w.run}/cancel", ok=200
    ),
    ("GET", "/api/v1/events"): lambda w, a: Call("/api/v1/events?limit=5", ok=200),
    ("GET", "/api/v1/images"): lambda w, a: Call("/api/v1/images", ok=200),
    ("GET", "/api/v1/images/{id}"): lambda w, a: Call(f"/api/v1/images/{w.image}", ok=200),
    ("GET", "/api/v1/images/{id}/bundle"): lambda w, a: Call(f"/api/v1/images/{w.image}/bundle", ok=200),
    ("POST", "/api/v1/images"): lambda w, a: Call(
        "/api/v1/images", raw=w.new_bundle(), content_type="application/octet-stream", ok=201
    ),
    ("DELETE", "/api/v1/images/{id}"): lambda w, a: Call(
        f"/api/v1/images/{w.fresh_image() if a else w.spare_image}", ok=204
    ),
    ("GET", "/api/v1/rollouts"): lambda w, a: Call("/api/v1/rollouts", ok=200),
    ("GET", "/api/v1/rollouts/{id}"): lambda w, a: Call(f"/api/v1/rollouts/{w.rollout}", ok=200),
    ("POST", "/api/v1/rollouts"): lambda w, a: Call(
        "/api/v1/rollouts", {"image": w.image, "target": {"hosts": [w.fresh_host() if a else "db-1"]}}, ok=201
    ),
    ("POST", "/api/v1/rollouts/{id}/pause"): lambda w, a: Call(
        f"/api/v1/rollouts/{w.fresh_rollout() if a else w.rollout}/pause", ok=200
    ),
    ("POST", "/api/v1/rollouts/{id}/resume"): lambda w, a: Call(
        f"/api/v1/rollouts/{_paused_rollout(w) if a else w.paused}/resume", ok=200
    ),
    ("POST", "/api/v1/rollouts/{id}/abort"): lambda w, a: Call(
        f"/api/v1/rollouts/{w.fresh_rollout() if a else w.rollout}/abort", ok=200
    ),
    # Plain HTTP, not a WebSocket upgrade: past the role check, the socket's handshake refuses it
    # (400). test_the_stream_takes_every_role_and_its_actions_are_checked opens it for real.
    ("GET", "/api/v1/stream"): lambda w, a: Call("/api/v1/stream", ok=400),
    ("GET", "/api/v1/agent"): lambda w, a: Call("/api/v1/agent"),
}  # fmt: skip


def _fresh_run(world: World) -> str:
    body = {"target": {"hosts": [world.fresh_host()]}, "steps": MOTD}
    return str(world.as_admin("POST", "/api/v1/runs", body)["id"])


def _paused_rollout(world: World) -> str:
    rollout = world.fresh_rollout()
    world.as_admin("POST", f"/api/v1/rollouts/{rollout}/pause")
    return rollout


def example(operation: tuple[str, str], world: World, allowed: bool) -> Call:
    if operation in EXAMPLES:
        return EXAMPLES[operation](world, allowed)
    return Call(re.sub(r"\{[^}]+\}", "nothing", operation[1]), {})


def snapshot(world: World) -> tuple[Any, ...]:
    """What a call could change: the fleet state and its version, the event log, and the image files."""
    state = world.as_admin("GET", "/api/v1/state")
    events = world.as_admin("GET", "/api/v1/events?limit=1000")
    files = sorted(path.name for path in (world.hub.directory / "images").iterdir())
    return state["version"], state["state"], events, files


@pytest.mark.parametrize("role", [None, *RANKS], ids=lambda role: role or "nobody")
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: f"{operation[0]} {operation[1]}")
def test_every_route_lets_in_exactly_the_roles_it_is_registered_for(
    world: World, operation: tuple[str, str], role: Role | None
) -> None:
    access = TABLE[operation]
    needed = access.role
    if needed is None and not access.hosts:
        expected = "allowed"  # public
    elif needed is None or role is None:
        expected = "unauthenticated"  # the agent socket takes host tokens only
    else:
        expected = "allowed" if role.allows(needed) else "refused"
    request = example(operation, world, expected == "allowed")
    token = None if role is None else world.tokens[role]
    before = snapshot(world) if expected != "allowed" else None
    status, answer = call(world.hub, operation[0], request, token)
    where = f"{operation[0]} {request.path} as {role or 'nobody'}"
    if expected == "allowed":
        assert status not in (401, 403) and status < 500, (where, status, answer)
        assert request.ok is None or status == request.ok, (where, status, answer)
    elif expected == "unauthenticated":
        assert status == 401 and answer["error"].startswith("authorization:"), (where, status, answer)
    else:
        assert role is not None and needed is not None
        assert status == 403, (where, status, answer)
        assert answer == {
            "error": f"role: {operation[0]} {operation[1]} needs the role {needed}; {NAMES[role]} has the role {role}",
            "needed_role": needed.value,
            "role": role.value,
        }, where
    if before is not None:
        assert snapshot(world) == before, f"{where}: refused, yet something changed"


def test_every_route_the_router_serves_is_in_the_access_table() -> None:
    """A route added with app.router.add_* directly, past hub/access.py, would have no role: the
    middleware refuses to serve it (500), and this test names it first."""
    app = make_app(Settings("sqlite:///unused"))
    served = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        served.add(("GET" if route.method == "HEAD" else route.method, resource.canonical))
    table = app[ACCESS]
    assert served == set(table)


def test_the_openapi_document_says_the_role_of_every_operation_the_table_has() -> None:
    document = openapi_document()
    said = {
        (method.upper(), path): (operation["x-rastos-role"], operation["description"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    }
    not_in_the_api = {("GET", "/"), ("GET", "/static"), ("GET", "/api/v1/openapi.json")}
    assert set(said) == set(TABLE) - not_in_the_api
    for operation, (label, description) in said.items():
        assert label == TABLE[operation].label, operation
        assert description.endswith(TABLE[operation].sentence), operation
    assert said[("POST", "/api/v1/runs")][0] == "operator"
    assert said[("DELETE", "/api/v1/images/{id}")][1].endswith("Needs the role admin: an admin whose role is admin.")
    assert (
        said[("GET", "/api/v1/state")][1] == "Needs the role viewer: an admin whose role is viewer, operator or admin."
    )


@pytest.mark.parametrize("role", RANKS)
def test_me_says_the_callers_role_and_what_it_may_do(world: World, role: Role) -> None:
    status, me = call(world.hub, "GET", Call("/api/v1/me"), world.tokens[role])
    assert status == 200 and me["name"] == NAMES[role] and me["role"] == role
    may = set(me["may"])
    expected = {f"{m} {p}" for (m, p), access in TABLE.items() if access.role is not None and role.allows(access.role)}
    assert may == expected
    assert ("POST /api/v1/runs" in may) == (role != Role.viewer)
    assert ("POST /api/v1/hosts" in may) == (role == Role.admin)
    assert "GET /api/v1/state" in may


@pytest.mark.parametrize("role", RANKS)
def test_the_stream_takes_every_role_and_its_actions_are_checked(world: World, role: Role) -> None:
    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {world.tokens[role]}"}
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{world.hub.url}/api/v1/stream", headers=headers) as socket,
        ):
            first = await socket.receive_json(timeout=10)
            assert first["type"] == "init" and "web-1" in first["state"]["hosts"]
            await socket.send_json({"type": "get_state"})
            while (message := await socket.receive_json(timeout=10))["type"] != "init":
                assert message["type"] in ("delta", "sync"), message
            await socket.send_json({"type": "start_run"})  # no such action: the stream is closed
            # The hub's periodic sync (or a delta) may be on its way already: the close comes after it.
            closed = await the_close(socket, 10, passing=("delta", "sync"))
            assert closed.type == aiohttp.WSMsgType.CLOSE and closed.extra == 'only {"type": "get_state"} is understood'

    asyncio.run(scenario())


def test_a_stream_action_above_the_callers_role_is_refused_naming_both() -> None:
    """Every action a UI's stream takes is checked in sockets.ui_action against a table of roles, as
    routes are; today's only action (get_state) is a viewer's, so a table with one above it shows the
    refusal."""
    actions = {"get_state": Role.viewer, "steer": Role.operator}
    viewer, operator = (Caller(name, role, Credential.of(Kind.admin, name, role=role))
                        for name, role in (("vera", Role.viewer), ("otto", Role.operator)))  # fmt: skip
    with pytest.raises(RoleRefused) as refused:
        ui_action('{"type": "steer"}', viewer, actions)
    assert refused.value.document() == {
        "error": "role: the stream's steer needs the role operator; vera has the role viewer",
        "needed_role": "operator",
        "role": "viewer",
    }
    assert ui_action('{"type": "get_state"}', viewer, actions) == "get_state"
    assert ui_action('{"type": "steer"}', operator, actions) == "steer"
    for other in ('{"type": "steer", "run": 1}', '{"type": "nothing"}', '["steer"]', "steer"):
        assert ui_action(other, operator, actions) is None, other


def test_a_route_registered_past_the_table_is_never_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The middleware fails closed: a route it has no access rule for answers 500, its handler unrun."""
    url = database_url(str(tmp_path / "hub.db"))
    migrate(url)
    app = make_app(Settings(url, data_dir=tmp_path))
    served: list[str] = []

    async def rogue(request: web.Request) -> web.StreamResponse:
        served.append(request.path)
        return web.Response(text="served")

    app.router.add_get("/api/v1/rogue", rogue)

    async def scenario() -> tuple[int, Any]:
        async with (
            TestServer(app) as server,
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/api/v1/rogue")) as response,
        ):
            return response.status, await response.json()

    status, answer = asyncio.run(scenario())
    assert (status, served) == (500, []), answer
    assert answer == {"error": "hub: an internal error; the hub's log has the details"}
    assert "GET /api/v1/rogue was registered without an access rule" in caplog.text
