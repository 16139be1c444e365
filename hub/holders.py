"""Who holds a hub's database: `serve` for its whole life, `db restore` while it replaces the contents.
A restore must never write under a hub that serves from the same database.

SQLite takes one hub process: `serve` holds an exclusive flock on DB.lock beside the file. The kernel
drops a flock when its process ends, however it ends, so no stale PID is ever guessed about; the file
holds the holder's PID only so that the message can name it. `db restore` takes the same lock, so it
is refused while a hub serves, and a hub cannot start in the middle of a restore.

PostgreSQL takes several hubs: each holds a shared advisory lock on a session of its own, and
`db restore` asks for the same lock exclusively. The holders are named from pg_stat_activity, where
each hub's session says its PID and host name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from hub.store import with_driver
from rastos.errors import RastosError

ADVISORY_KEY = 0x72617374  # b"rast": fits 32 bits, so pg_locks shows it as classid 0, objid KEY
SQLITE_PREFIX = "sqlite:///"
SERVE_HINT = (
    "stop it first; to serve one fleet from several hub processes, use PostgreSQL (--database postgresql://...)"
)
STOP_HINT = "stop the hub (systemctl stop rastos-hub), then restore"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (as hub.store.database_url makes them); None for PostgreSQL."""
    return Path(url.removeprefix(SQLITE_PREFIX)) if url.startswith(SQLITE_PREFIX) else None


def lock_file(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def serving(url: str) -> Iterator[None]:
    """Held by `rastos-hub serve` from before it migrates the database until it exits."""
    database = sqlite_file(url)
    if database is not None:

        def refuse(holder: str) -> RastosError:
            return RastosError(f"database: {database} is in use by another rastos-hub process ({holder}); "
                               "SQLite takes one hub process", hint=SERVE_HINT)  # fmt: skip

        with _flock(database, refuse):
            yield
        return
    with _advisory(url, "serve", shared=True) as held:
        if not held.taken:
            raise RastosError(
                f"database: a `rastos-hub db restore` holds it ({held.holders}); a hub starts once it has finished",
                hint="wait for the restore, then start the hub again",
            )
        yield


@contextlib.contextmanager
def restoring(url: str, force: bool) -> Iterator[None]:
    """Held by `rastos-hub db restore` while it replaces the database. On SQLite a live hub always
    refuses it, --force or not: its open connections would go on writing into the restored file."""
    database = sqlite_file(url)
    if database is not None:

        def refuse(holder: str) -> RastosError:
            return RastosError(f"database: {database} is in use by a rastos-hub process ({holder}); a restore "
                               "never writes under a live SQLite hub, --force or not", hint=STOP_HINT)  # fmt: skip

        with _flock(database, refuse):
            yield
        return
    with _advisory(url, "restore", shared=False) as held:
        if not held.taken and not force:
            raise RastosError(
                f"database: rastos-hub processes use it ({held.holders})",
                hint=f"{STOP_HINT}; or --force, and restart every hub on it after the restore",
            )
        yield


@contextlib.contextmanager
def _flock(database: Path, refuse: Callable[[str], RastosError]) -> Iterator[None]:
    path = lock_file(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise RastosError(f"database: cannot open its lock file {path}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse(_holder(descriptor)) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # the lock ends with it


def _holder(descriptor: int) -> str:
    """The PID the holder wrote (it may not have yet, in the instant after it took the lock)."""
    written = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return f"PID {written}" if written.isdigit() else "its PID unknown"


class _Advisory:
    def __init__(self, taken: bool, holders: str) -> None:
        self.taken = taken
        self.holders = holders


@contextlib.contextmanager
def _advisory(url: str, role: str, shared: bool) -> Iterator[_Advisory]:
    # The session that holds the lock: its name says which process it is, for the message of whoever
    # is refused. Autocommit: a session holds an advisory lock outside any transaction, and an open
    # transaction would hold back vacuum for the hub's whole life.
    name = f"rastos-hub {role} {os.getpid()}@{socket.gethostname()}"[:63]
    engine = create_engine(with_driver(url, asynchronous=False), poolclass=NullPool,
                           connect_args={"application_name": name})  # fmt: skip
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            take = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
            taken = bool(db.execute(text(f"SELECT {take}(:key)"), {"key": ADVISORY_KEY}).scalar_one())
            yield _Advisory(taken, "" if taken else _holders(db))
    finally:
        engine.dispose()


def _holders(db: Connection) -> str:
    query = text(
        "SELECT a.application_name, host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = :key AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1"
    )
    rows = db.execute(query, {"key": ADVISORY_KEY})
    found = [name + (f" from {address}" if address else "") for name, address in rows]
    return ", ".join(found) or "they ended meanwhile"
