"""A client of a running hub's REST API and run stream (aiohttp's), for `rastos-hub run`.

Where the hub is and how it is trusted: `--hub URL` (or RASTOS_HUB_URL), `--ca FILE` for a TLS hub whose
certificate the system's store does not vouch for. The admin token comes from RASTOS_HUB_TOKEN or
`--token-file FILE`, never from the command line, where any user's `ps` would show it; it goes only
in the Authorization header to that URL: redirects are not followed (a redirect would carry it elsewhere),
and no message, error or log line here holds it.

Every failure becomes one RastosError that says what happened and what to do: the hub cannot be
reached, its certificate is not trusted, the token is refused (the hub's own words, which name the role
needed where it has roles), or the hub's `{"error": "FIELD: reason"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from hub.tls import is_loopback
from rastos.errors import RastosError

log = logging.getLogger("rastos-hub.client")

DEFAULT_HUB = "http://127.0.0.1:8470"  # `rastos-hub serve`'s default --listen
TOKEN_ENV = "RASTOS_HUB_TOKEN"
URL_ENV = "RASTOS_HUB_URL"
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0  # seconds an answer may take; a stream is kept alive by pings meanwhile
STREAM_HEARTBEAT = 20.0  # seconds between pings on a run's stream: a vanished hub is noticed in two
RECONNECTS = 30  # a stream cut before its run ended is opened again this often, a second apart
TOKEN_HINT = (
    "an admin token: `rastos-hub admin add NAME` on the hub prints one; give it as RASTOS_HUB_TOKEN or --token-file"
)


class UsageError(RastosError):
    """Bad arguments, found before anything was sent: exit status 2, as argparse's own."""

    exit_status = 2


@dataclass(frozen=True)
class HubAddress:
    url: str  # http(s)://HOST:PORT[/PREFIX], without a trailing slash
    token: str = field(repr=False)  # never shown, whatever prints this
    ca: Path | None = None

    def tls(self) -> ssl.SSLContext | bool:
        if self.ca is None:
            return True  # the system's trust store
        try:
            return ssl.create_default_context(cafile=str(self.ca))
        except OSError as error:
            raise UsageError(f"--ca: cannot read {self.ca}: {error.strerror}") from None
        except ssl.SSLError:
            raise UsageError(f"--ca: {self.ca} holds no PEM certificate") from None


def address_from(url: str | None, token_file: Path | None, ca: Path | None) -> HubAddress:
    return HubAddress(hub_url(url), admin_token(token_file), ca)


def hub_url(given: str | None) -> str:
    from_env = given is None and bool(os.environ.get(URL_ENV))
    where = URL_ENV if from_env else "--hub"
    url = (given or os.environ.get(URL_ENV) or DEFAULT_HUB).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{where}: {url!r} is not an http:// or https:// URL of the hub")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(f"{where}: {url!r}: the hub's base URL only (no user, query or fragment)")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        log.warning("%s is plain HTTP off loopback: the token crosses the network in the clear", url)
    return url


def admin_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except OSError as error:
            raise UsageError(f"--token-file: cannot read {token_file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--token-file: {token_file} is not text") from None
        token, where = (lines[0].strip() if lines else ""), f"--token-file: {token_file}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
        if not token:
            raise UsageError(f"no admin token: set {TOKEN_ENV} or give --token-file FILE", hint=TOKEN_HINT)
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise UsageError(f"{where}: not a token (one line of printable ASCII)", hint=TOKEN_HINT)
    return token


class HubClient:
    """One session with a hub; `async with HubClient(address) as hub: await hub.get("/api/v1/runs")`."""

    def __init__(self, address: HubAddress) -> None:
        self.address = address
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HubClient:
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        connector = aiohttp.TCPConnector(ssl=self.address.tls())
        headers = {"Authorization": f"Bearer {self.address.token}"}
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "used outside `async with`"
        return self._session

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def post(self, path: str, body: object = None) -> Any:
        return await self.request("POST", path, body)

    async def request(self, method: str, path: str, body: object = None) -> Any:
        url = self.address.url + path
        log.debug("%s %s", method, url)
        try:
            async with self.session.request(method, url, json=body, allow_redirects=False) as answer:
                text = await answer.text()
                if answer.status >= 300:
                    raise self._refusal(answer.status, answer.headers.get("Location"), text, path)
                return json.loads(text) if text else None
        except aiohttp.ClientError as error:
            raise self._unreachable(error) from None
        except TimeoutError:
            raise RastosError(f"hub: {self.address.url} did not answer within {READ_TIMEOUT:.0f} s") from None
        except json.JSONDecodeError:
            raise RastosError(f"hub: {url} answered with something other than JSON: is it a rastOS hub?") from None

    async def follow(self, run_id: str) -> AsyncIterator[dict[str, Any]]:
        """The messages of the run's stream (hub/runs_api.py), from a `run` to its `end`. A stream cut
        before the end (the hub restarted, the network dropped) is opened again: it starts with the
        whole run, so nothing is lost, only said again."""
        url = self.address.url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/stream"
        for attempt in range(RECONNECTS + 1):
            try:
                async for message in self._stream(url, run_id):
                    yield message
                    if message["type"] == "end":
                        return
            except _Fatal:
                raise
            except RastosError:
                if attempt == RECONNECTS:
                    raise
            log.info("the run's stream was cut: opening it again (%d of %d)", attempt + 1, RECONNECTS)
            await asyncio.sleep(1.0)
        raise RastosError(f"hub: the stream of run {run_id} was cut {RECONNECTS + 1} times before it ended")

    async def _stream(self, url: str, run_id: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self.session.ws_connect(url, heartbeat=STREAM_HEARTBEAT, max_msg_size=0) as socket:
                async for frame in socket:
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        break
                    yield json.loads(frame.data)
        except aiohttp.WSServerHandshakeError as error:
            # aiohttp keeps no body of a refused handshake: the hub's word for its status is said here.
            text = json.dumps({"error": f"id: no run {run_id!r}"}) if error.status == 404 else ""
            raise self._refusal(error.status, None, text, f"/api/v1/runs/{run_id}/stream", fatal=True) from None
        except aiohttp.ClientError as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: aiohttp.ClientError) -> RastosError:
        url = self.address.url
        if isinstance(error, aiohttp.ClientConnectorCertificateError):
            return RastosError(
                f"hub: {url}: its TLS certificate is not trusted: {error.certificate_error}",
                hint="give the certificate of the CA that issued it: --ca FILE",
            )
        if isinstance(error, aiohttp.ClientSSLError):
            return RastosError(f"hub: {url}: no TLS connection: {error}", hint="is it served with TLS, and https://?")
        if isinstance(error, aiohttp.ClientConnectorError):
            cause = error.os_error
            return RastosError(
                f"hub: cannot reach {url}: {os.strerror(cause.errno) if cause.errno else cause}",
                hint=f"is `rastos-hub serve` running there? --hub or {URL_ENV} says where it is",
            )
        return RastosError(f"hub: {url}: the connection failed: {error or type(error).__name__}")

    def _refusal(self, status: int, location: str | None, text: str, path: str, fatal: bool = False) -> RastosError:
        message = _error_text(text) or f"answered {status}"
        if 300 <= status < 400:
            return RastosError(
                f"hub: {self.address.url}{path} redirects to {location}",
                hint="give the hub's own URL as --hub: a redirect is not followed with the token",
            )
        if status == 401:
            return _Fatal(f"hub: the token was refused (401): {message}", hint=TOKEN_HINT)
        if status == 403:
            return _Fatal(f"hub: not allowed (403): {message}")
        if status >= 500:
            return RastosError(f"hub: an error of the hub's own ({status}): {message}")
        error = _Fatal(message) if fatal else RastosError(message)
        if status == 404 and message.startswith(("id:", "run:")):
            error.hint = "`rastos-hub run list` shows the runs the hub keeps"
        return error


class _Fatal(RastosError):
    """An answer that asking again would not change (a refused token, a run that is not there)."""


def _error_text(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError:
        return ""
    return str(document.get("error", "")) if isinstance(document, dict) else ""
