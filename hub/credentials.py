"""Connections end with their credentials: a WebSocket opened with a token that is then revoked,
rotated without grace, or past its grace, or by an admin since removed, or with a session since ended,
is closed, and its next connect is refused (401). An admin's stream is closed too when their role
changes, so their page connects again and shows what the new role allows.

A WebSocket is authenticated once, when it opens. Each is registered here with the hash of what it
authenticated with; every change that can end a credential moves a revision in the database (hub/store.py),
whichever process made it (`rastos-hub host revoke` beside the hub, or the REST API), and the hub polls
that revision every POLL seconds. When it moved, or when a grace period or session ends, every
registered connection is checked against what may authenticate now. A change made through this hub's
own REST API is checked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

from hub.store import LiveCredentials, Store, token_hash

log = logging.getLogger("rastos-hub.credentials")

POLL = 1.0  # seconds between reads of the revision: a change made beside the hub takes effect this soon
CLOSE_REASON = b"credentials: no longer valid (revoked, rotated or removed)"
ROLE_CHANGED = b"credentials: the admin's role changed; connect again to work with the new one"
POLICY_VIOLATION = 1008


class Kind(StrEnum):
    host = "host"  # an agent's host token
    admin = "admin"  # an admin's token
    session = "session"  # a web UI session's id


@dataclass(frozen=True)
class Credential:
    kind: Kind
    digest: str  # sha256 of the token or session id, as the database keeps it
    host: str = ""  # for a host token: whose
    role: str = ""  # for an admin's token or session: the admin's role when it authenticated

    @classmethod
    def of(cls, kind: Kind, secret: str, host: str = "", role: str = "") -> Credential:
        return cls(kind, token_hash(secret), host, role)

    def ended(self, live: LiveCredentials) -> bytes | None:
        """Why a connection it opened must close now, or None while it is good."""
        if self.kind is Kind.host:
            return None if self.digest in live.hosts.get(self.host, ()) else CLOSE_REASON
        roles = live.admins if self.kind is Kind.admin else live.sessions
        if self.digest not in roles:
            return CLOSE_REASON
        # A page shows what its admin's role allows: with another role, it connects again and learns it.
        return None if roles[self.digest] == self.role else ROLE_CHANGED


class CredentialWatch:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sockets: dict[web.WebSocketResponse, Credential] = {}
        self.generation = 0  # checks completed: a socket authenticated before the last one is checked again
        self._revision: int | None = None
        self._deadline = float("inf")  # the soonest grace or session end at the last check
        self._stale = False
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()

    def add(self, socket: web.WebSocketResponse, credential: Credential, generation: int) -> None:
        """Watch `socket`, authenticated by `credential` in a lookup begun at `generation`: if a check
        completed meanwhile, it may have missed this socket, so the next poll checks again."""
        self.sockets[socket] = credential
        if generation != self.generation:
            self._stale = True

    def discard(self, socket: web.WebSocketResponse) -> None:
        self.sockets.pop(socket, None)

    async def poll(self) -> None:
        revision = await self.store.credentials_revision()
        if revision != self._revision or self._stale or time.time() >= self._deadline:
            await self.check(revision)

    async def check(self, revision: int | None = None) -> int:
        """Close every watched socket whose credential ended; returns how many."""
        async with self._lock:
            self._stale = False
            if revision is None:
                revision = await self.store.credentials_revision()
            live = await self.store.live_credentials()
            self._revision, self._deadline = revision, live.next_expiry
            ended = [(socket, credential, reason) for socket, credential in self.sockets.items()
                     if (reason := credential.ended(live)) is not None]  # fmt: skip
            for socket, credential, reason in ended:
                del self.sockets[socket]
                log.info("closing a connection of %s: %s", credential.host or credential.kind, reason.decode())
                # In the background: a peer slow to answer the close must not hold up the next check.
                task = asyncio.ensure_future(_close(socket, reason))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            self.generation += 1
            return len(ended)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.poll()
            except Exception:  # the database away, say: the next poll tries again
                log.exception("the check of connections' credentials failed")

    async def stop(self) -> None:
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _close(socket: web.WebSocketResponse, reason: bytes) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # gone already: nothing to close
        await socket.close(code=POLICY_VIOLATION, message=reason)


CREDENTIALS = web.AppKey("credentials", CredentialWatch)
