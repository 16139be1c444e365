"""The hub's listening socket, kept fair: no crowd of idle or slow strangers can use up its files.

Every connection counts against the open-file limit (raised to its hard limit at start, where that is
allowed). A connection is a stranger until a request on it carries valid credentials (hub/edge.py
calls `trust`). Strangers get HANDSHAKE_TIMEOUT seconds in all, and at most MAX_STRANGERS are kept:
a new one past that closes the oldest, so a crowd that connects and waits cannot keep a client that
then connects from being served. Near the open-file limit even a trusted client's new connection is
refused rather than let the hub run out of files. Each of these states is logged once when it starts
and once when it ends, not per connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
from collections import OrderedDict
from typing import Any

from aiohttp import web
from yarl import URL

from hub.edge import TRUST

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
            self.strangers.pop(request.transport, None)

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self.open.discard(transport)
        self.strangers.pop(transport, None)

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
    """The aiohttp protocol of one connection, admitted (or not) by the guard and forgotten at its end."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.forget(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.transport is not None else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection passed through the guard."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guarded(self._guard, server()), self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        # asyncio gives the kernel's queue the length of its own bursts of accepts; a longer queue lets
        # a crowd of connections wait there to be accepted instead of having their SYNs dropped (each
        # drop costs the client a second or more).
        for listening in self._server.sockets:
            with socket.socket(fileno=os.dup(listening.fileno())) as same:
                same.listen(LISTEN_QUEUE)


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve `app` until SIGTERM or SIGINT, then close every connection and stop."""
    limit = raise_open_file_limit()
    guard = ConnectionGuard(max(limit - RESERVED_FILES, 16))
    app[TRUST] = guard.trust
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(guard.exception_handler)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, guard)
        await site.start()
        log.info("serving on %s (open-file limit %d, at most %d connections)", site.name, limit, guard.max_connections)
        await stop.wait()
    finally:
        await runner.cleanup()
