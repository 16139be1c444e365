"""What every request to the hub goes through before a route sees it, and how a route learns who is
asking: JSON errors, security headers, the same-origin rule, credentials and request bodies.

- Every answer is JSON, errors included (`{"error": "FIELD: reason"}`), never a traceback; a fault
  of the hub's own is logged here and answered 500 without details.
- Every answer carries a Content-Security-Policy and the usual headers: the UI loads only its own
  files, is never framed, and its API answers are never sniffed into something else.
- A request that changes something, and a WebSocket, from a foreign Origin is refused (403): a
  browser always says where a request comes from, and only the hub's own pages may act with its
  session cookie. (Requests without an Origin come from programs with a bearer token.)
- Admins authenticate with `Authorization: Bearer TOKEN` (the scheme in any case) or with the session
  cookie `POST /api/v1/login` sets: a random id the database knows by its hash, never the token.
  Which routes need whom, and the check itself, are in hub/access.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from hub import api, strictjson
from hub.credentials import Credential, Kind
from hub.errors import Forbidden, HubError, Unauthorized, UnsupportedMediaType
from hub.roles import Admin
from hub.store import Store

log = logging.getLogger("rastos-hub")

COOKIE = "rastos_hub"
SESSION_LIFETIME = 12 * 3600.0  # seconds: a UI session ends then, used or not
MAX_CREDENTIAL_CHARS = 200
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TRUST: web.AppKey[Callable[[web.Request], None]] = web.AppKey("trust")  # see hub/guard.py


def respond(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(document, status=status, headers=headers, dumps=strictjson.dumps)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HubError as error:
        return respond(error.document(), status=error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allowed = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return respond({"error": _http_error(request, error)}, status=error.status, headers=allowed)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return respond({"error": "hub: an internal error; the hub's log has the details"}, status=500)


def _http_error(request: web.Request, error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPNotFound):
        return f"path: nothing at {request.path!r}"
    if isinstance(error, web.HTTPMethodNotAllowed):
        return f"method: {request.method} is not allowed here; allowed: {', '.join(sorted(error.allowed_methods))}"
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return f"body: larger than the {request.client_max_size} bytes a request may carry"
    return f"request: {error.reason}"


@web.middleware
async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get(hdrs.ORIGIN)
    upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    if origin is not None and (request.method not in SAFE_METHODS or upgrade):
        own = f"{request.scheme}://{request.host}".lower()
        if origin.lower() != own:
            raise Forbidden(f"origin: {origin[:100]!r} is not this hub's ({own})")
    return await handler(request)


async def security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if response.content_type == "application/json":
        response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


# Credentials


def _credential(value: str, where: str) -> str:
    """A token or session id as the hub issues them: short printable ASCII. Anything else (odd bytes
    in a header arrive as surrogates) is refused here, before it is hashed or looked up."""
    if not 1 <= len(value) <= MAX_CREDENTIAL_CHARS or not value.isascii() or not value.isprintable():
        raise Unauthorized(f"{where}: not a valid token")
    return value


def bearer(request: web.Request) -> str | None:
    """The bearer token of the Authorization header, if there is one; Unauthorized if it is malformed."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("authorization: only the Bearer scheme is understood")
    return _credential(credentials.strip(), "authorization")


def session_id(request: web.Request) -> str | None:
    value = request.cookies.get(COOKIE)
    if value is None:
        return None
    try:
        return _credential(value, "cookie")
    except Unauthorized:
        return None  # a mangled cookie is no session: the answer is the same 401 as without one


async def admin_credential(request: web.Request, store: Store) -> tuple[Admin, Credential]:
    """The admin making the request and what they authenticated with (a WebSocket is closed when
    that ends: hub/credentials.py)."""
    token = bearer(request)
    if token is not None:
        kind, secret, admin = Kind.admin, token, await store.admin_for_token(token)
    elif (session := session_id(request)) is not None:
        kind, secret, admin = Kind.session, session, await store.admin_for_session(session)
    else:
        kind, secret, admin = Kind.admin, "", None
    if admin is None:
        raise Unauthorized("authorization: no valid admin token", hint="rastos-hub admin add NAME prints one")
    trusted(request)
    return admin, Credential.of(kind, secret, role=admin.role)


def trusted(request: web.Request) -> None:
    """The connection carried valid credentials: the connection guard (hub/guard.py) lets it stay."""
    if (trust := request.app.get(TRUST)) is not None:
        trust(request)


def set_session(request: web.Request, response: web.StreamResponse, session: str) -> None:
    response.set_cookie(COOKIE, session, max_age=int(SESSION_LIFETIME), path="/", httponly=True,
                        samesite="Strict", secure=request.secure)  # fmt: skip


def clear_session(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=request.secure)


# Bodies


async def json_body(request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
    """The request's JSON body if it has the JSON content type, is strict JSON (hub/strictjson.py)
    and matches `schema`; otherwise a 4xx naming the field."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"content-type: {request.content_type!r}; the body must be application/json")
    document = strictjson.loads(await request.read(), "body")
    return api.validate(schema, document)
