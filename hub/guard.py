"""The hub's listening socket, kept fair: no crowd of idle or slow strangers can use up its files.

Every connection counts against the open-file limit (raised to its hard limit at start, where that is
allowed). A connection is a stranger until a request on it carries valid credentials (hub/edge.py
calls `trust`). Strangers get HANDSHAKE_TIMEOUT seconds in all, and at most MAX_STRANGERS are kept:
a new one past that closes the oldest, so a crowd that connects and waits cannot keep a client that
then connects from being served. Near the open-file limit even a trusted client's new connection is
refused rather than let the hub run out of files. Each of these states is logged once when it starts
and once when it ends, not per connection.

With TLS, a connection is admitted (and counted) before its handshake, which is then made on it: a
crowd that opens connections and never finishes a handshake is a crowd of strangers like any other,
closed in HANDSHAKE_TIMEOUT. SIGHUP reads the certificate and key again (a renewed certificate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import ssl
from collections import OrderedDict
from typing import Any

from aiohttp import web
from yarl import URL

from hub.edge import TRUST
from hub.tls import TlsFiles
from rastos.errors import RastosError
from rastos.sdnotify import notify, watchdog

log = logging.getLogger("rastos-hub.guard")

HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may go without valid credentials
MAX_STRANGERS = 256
BACKLOG = 128  # asyncio accepts up to this many connections at once, before the guard sees any
LISTEN_QUEUE = 4096  # connections the kernel holds until they are accepted (capped by net.core.somaxconn)
RESERVED_FILES = 64 + BACKLOG  # below the open-file limit: one burst of accepts, the database, logs, files
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection of a trusted client
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message when accept() fails


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one, where allowed; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, error)
    return soft


class ConnectionGuard:
    def __init__(self, max_connections: int, max_strangers: int = MAX_STRANGERS,
                 timeout: float = HANDSHAKE_TIMEOUT) -> None:  # fmt: skip
        self.max_connections = max_connections
        self.max_strangers = min(max_strangers, max(1, max_connections // 2))
        self.timeout = timeout
        self.open: set[asyncio.BaseTransport] = set()
        self.strangers: OrderedDict[asyncio.BaseTransport, float] = OrderedDict()  # deadlines, oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._crowded = 0  # connections closed or refused in the current crowded spell
        self._plain: dict[asyncio.BaseTransport, asyncio.BaseTransport] = {}  # a TLS transport -> its TCP one
        self._last_accept_error = -1e9

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """A new connection: True to serve it, False to close it at once."""
        loop = asyncio.get_running_loop()
        self._reap(loop.time())
        if len(self.open) >= self.max_connections and not self.strangers:
            self._crowd(f"{len(self.open)} connections, the most the open-file limit allows; refusing new ones")
            return False
        if len(self.open) >= self.max_connections or len(self.strangers) >= self.max_strangers:
            self._crowd(f"{len(self.strangers)} connections without credentials; closing the oldest as new ones come")
            self._close(next(iter(self.strangers)))
        elif self._crowded and len(self.strangers) < self.max_strangers // 2:
            log.info("connections back to normal; %d were closed or refused meanwhile", self._crowded)
            self._crowded = 0
        self.open.add(transport)
        self.strangers[transport] = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._on_timer)
        return True

    def trust(self, request: web.Request) -> None:
        if request.transport is not None:
            self.strangers.pop(self._plain.get(request.transport, request.transport), None)

    def secured(self, transport: asyncio.BaseTransport, secure: asyncio.BaseTransport) -> None:
        """`transport`'s handshake is done: requests arrive on `secure`, its TLS transport."""
        self._plain[secure] = transport

    def forget(self, transport: asyncio.BaseTransport, secure: asyncio.BaseTransport | None = None) -> None:
        self.open.discard(transport)
        self.strangers.pop(transport, None)
        if secure is not None:
            self._plain.pop(secure, None)

    def _crowd(self, what: str) -> None:
        if not self._crowded:
            log.warning("the hub is crowded: %s", what)
        self._crowded += 1

    def _close(self, transport: asyncio.BaseTransport) -> None:
        self.forget(transport)
        transport.close()

    def _reap(self, now: float) -> None:
        while self.strangers:
            transport, deadline = next(iter(self.strangers.items()))
            if deadline > now:
                return
            self._close(transport)

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._reap(loop.time())
        self._timer = None
        if self.strangers:
            first = next(iter(self.strangers.values()))
            self._timer = loop.call_later(max(0.1, first - loop.time()), self._on_timer)

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio reports each failed accept(); out of files, that is many a second: once a minute here."""
        if context.get("message") != ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        if loop.time() - self._last_accept_error >= 60:
            self._last_accept_error = loop.time()
            log.error("cannot accept connections: %s (logged once a minute while it lasts)", context.get("exception"))


class _Guarded(asyncio.Protocol):
    """The aiohttp protocol of one connection, admitted (or not) by the guard and forgotten at its end;
    with TLS, the handshake is made after the guard has admitted the connection, and what arrives
    before aiohttp has the connection is held for it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol, tls: ssl.SSLContext | None) -> None:
        self.guard = guard
        self.inner = inner
        self.tls = tls
        self.transport: asyncio.BaseTransport | None = None  # the TCP connection, as the guard knows it
        self.secure: asyncio.BaseTransport | None = None  # its TLS transport, once the handshake is done
        self.ready = False  # aiohttp has the connection
        self._early: list[bytes] = []
        self._early_eof = False
        self._handshake: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport
        if self.tls is None:
            self._hand_over(transport)
            return
        transport.pause_reading()  # type: ignore[attr-defined]  # start_tls reads the ClientHello itself
        self._handshake = asyncio.ensure_future(self._start_tls(transport, self.tls))

    async def _start_tls(self, transport: asyncio.BaseTransport, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                transport,  # type: ignore[arg-type]
                self, tls, server_side=True, ssl_handshake_timeout=self.guard.timeout,
            )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            log.debug("a TLS handshake failed: %s", error)  # a stranger's; the guard's business is done
            self.guard.forget(transport)
            transport.close()
            return
        if secure is None:  # closed meanwhile
            self.guard.forget(transport)
            return
        self.secure = secure
        self.guard.secured(transport, secure)
        self._hand_over(secure)

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        self.ready = True
        self.inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.inner.data_received(data)
        if self._early_eof:
            self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.forget(self.transport, self.secure)
        if self.ready:
            self.inner.connection_lost(exc)
        elif self._handshake is not None:
            self._handshake.cancel()

    def data_received(self, data: bytes) -> None:
        if self.ready:
            self.inner.data_received(data)
        elif self.transport is not None:  # decrypted before aiohttp was given the connection
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self.ready:
            return self.inner.eof_received()
        self._early_eof = self.transport is not None
        return None

    def pause_writing(self) -> None:
        if self.ready:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection passed through the guard."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port, self._guard, self._tls = host, port, guard, tls

    @property
    def name(self) -> str:
        return str(URL.build(scheme="https" if self._tls else "http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guarded(self._guard, server(), self._tls), self._host, self._port, backlog=self._backlog,
            reuse_address=True,
        )  # fmt: skip
        # asyncio gives the kernel's queue the length of its own bursts of accepts; a longer queue lets
        # a crowd of connections wait there to be accepted instead of having their SYNs dropped (each
        # drop costs the client a second or more).
        for listening in self._server.sockets:
            with socket.socket(fileno=os.dup(listening.fileno())) as same:
                same.listen(LISTEN_QUEUE)


async def serve(app: web.Application, host: str, port: int, tls: TlsFiles | None = None) -> None:
    """Serve `app` until SIGTERM or SIGINT, then close every connection and stop; over TLS with
    `tls`, whose files SIGHUP reads again."""
    context = tls.context() if tls is not None else None
    limit = raise_open_file_limit()
    guard = ConnectionGuard(max(limit - RESERVED_FILES, 16))
    app[TRUST] = guard.trust
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(guard.exception_handler)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if tls is not None and context is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, tls, context)
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, guard, context)
        await site.start()
        log.info("serving on %s (open-file limit %d, at most %d connections)", site.name, limit, guard.max_connections)
        # Ready for systemd (Type=notify) once the port takes connections; pinged from this loop, so a
        # hub whose loop hangs, holding the fleet's dispatch lock perhaps, is killed and its lock freed.
        notify(f"READY=1\nSTATUS=serving on {site.name}")
        pings = asyncio.create_task(watchdog())
        await stop.wait()
        notify("STOPPING=1")
        pings.cancel()
    finally:
        await runner.cleanup()


def _reload(tls: TlsFiles, context: ssl.SSLContext) -> None:
    """SIGHUP: the certificate and key again, for the handshakes from now on; a pair that cannot be
    used is logged and the one before kept."""
    try:
        tls.load(context)
    except RastosError as error:
        log.error("SIGHUP: keeping the certificate in use: %s", error)
        return
    log.info("SIGHUP: read %s and %s again", tls.cert, tls.key)
