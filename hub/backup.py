"""`rastos-hub db backup` and `db restore`: the whole database in one file, and back.

SQLite: the sqlite3 online backup API, a consistent copy made beside a hub that serves (it reads under
one read transaction; WAL lets the hub write meanwhile), kept as one self-contained file. PostgreSQL:
pg_dump's custom format, restored with pg_restore; the URL's password never goes on a command line
(other users see those in /proc), but into a passfile of mode 600 made for the call.

A backup holds the token hashes: it is written mode 600, to a temporary file in the target's folder,
flushed and renamed into place, so a crash leaves the old file or the new one and never half of one.
A restore checks the file is a hub backup of the database's kind and of a schema this hub knows before
it touches anything; then it replaces the contents in one transaction and migrates them up to this
hub's schema, as `serve` would at start.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import secrets
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from hub import holders
from hub.files import sync_directory
from hub.schema import metadata
from hub.store import MIGRATIONS, migrate, with_driver
from rastos.errors import RastosError
from rastos.process import run

log = logging.getLogger("rastos-hub.backup")

SQLITE_MAGIC = b"SQLite format 3\0"
PGDUMP_MAGIC = b"PGDMP"
# What `db backup DIRECTORY` names its files, and the only files `--keep` ever removes.
BACKUP_NAME = re.compile(r"rastos-hub-\d{8}T\d{6}Z\.(sqlite|pgdump)")
VERSION_TABLE = "alembic_version"
HUB_TABLES = frozenset({VERSION_TABLE, "hosts", "admins", "events"})  # in every revision since the first


@dataclass(frozen=True)
class Restored:
    backup_revision: str  # the schema revision the backup was made at
    revision: str  # the one the database is at now, after migrating


def backup(url: str, target: Path, keep: int | None = None) -> Path:
    """Write a backup of the database to `target` (a file, or a directory it gets a dated name in);
    with `keep`, the directory keeps only the newest `keep` backups of that name. Returns the file."""
    database = holders.sqlite_file(url)
    if target.is_dir():
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = target / f"rastos-hub-{stamp}.{'sqlite' if database else 'pgdump'}"
        if target.exists():
            raise RastosError(f"FILE: {target} exists already (one backup a second)")
    elif keep is not None:
        raise RastosError(f"--keep: needs FILE to be a directory, where backups are named by date; {target} is not one")
    if keep is not None and keep < 1:
        raise RastosError(f"--keep: must be at least 1, got {keep}")
    with _atomic(target) as temporary:
        if database is not None:
            _sqlite_backup(database, temporary)
        else:
            with _libpq(url) as (uri, env):
                run(["pg_dump", "--format=custom", f"--file={temporary}", f"--dbname={uri}"], capture=True, env=env)
    if keep is not None:
        prune(target.parent, keep)
    return target


def prune(directory: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` backups that `db backup DIRECTORY` named; returns the removed.
    Their names sort by date, and no other file is ever touched."""
    made = sorted(path for path in directory.iterdir() if BACKUP_NAME.fullmatch(path.name) and path.is_file())
    removed = made[:-keep]
    for path in removed:
        path.unlink()
        log.info("removed the older backup %s", path)
    return removed


def restore(url: str, source: Path, force: bool = False) -> Restored:
    database = holders.sqlite_file(url)
    revision = _checked_revision(source, sqlite=database is not None)
    with holders.restoring(url, force):
        if database is not None:
            _sqlite_restore(source, database)
        else:
            _check_database_revision(url)
            _postgresql_restore(url, source)
        return Restored(revision, migrate(url))


# Backups


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """A new file beside `target`, mode 600, that becomes `target` (flushed to disk) if the block
    succeeds, and is gone if it does not."""
    if not target.parent.is_dir():
        raise RastosError(f"FILE: the folder {target.parent} does not exist")
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise RastosError(f"FILE: cannot write in {target.parent}: {error.strerror}") from None
    try:
        yield temporary
        temporary.chmod(0o600)  # pg_dump rewrites the file; the mode must not depend on it or on the umask
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        temporary.replace(target)
        sync_directory(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _sqlite_backup(database: Path, temporary: Path) -> None:
    if not database.is_file():
        raise RastosError(f"database: {database} does not exist")
    source = sqlite3.connect(database, timeout=30)
    try:
        copy = sqlite3.connect(temporary)
        try:
            source.backup(copy)  # every page in one step, under one read transaction: a consistent copy
            # One file that needs no -wal beside it, whatever mode the hub keeps its database in.
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    except sqlite3.Error as error:
        raise RastosError(f"database: cannot back up {database}: {error}") from None
    finally:
        source.close()


@contextlib.contextmanager
def _libpq(url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The URL as the PostgreSQL tools take it, without its password, and the environment that gives
    them the password: a passfile made for this call, in a folder only this user may read."""
    parsed = make_url(url)
    uri = parsed._replace(drivername="postgresql", password=None).render_as_string(hide_password=False)
    if parsed.password is None:
        yield uri, {}
        return
    with tempfile.TemporaryDirectory(prefix="rastos-hub-") as folder:
        passfile = Path(folder) / "pgpass"
        escaped = str(parsed.password).replace("\\", "\\\\").replace(":", "\\:")
        descriptor = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f"*:*:*:*:{escaped}\n")
        yield uri, {"PGPASSFILE": str(passfile), "PGPASSWORD": ""}


# Restores


def _known_revisions() -> tuple[ScriptDirectory, str]:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    assert head is not None
    return script, head


def _check_known(revision: str, what: str) -> None:
    script, head = _known_revisions()
    try:
        known = script.get_revision(revision) is not None
    except AlembicError:
        known = False
    if not known:
        raise RastosError(
            f"{what} is at schema revision {revision}, newer than this hub's {head} (or unknown to it)",
            hint="restore it with the rastos-hub version that made it, or a newer one",
        )


def _checked_revision(source: Path, sqlite: bool) -> str:
    """The schema revision of a backup, once it is known to be one of the database's kind and of a
    revision this hub can migrate from."""
    try:
        with source.open("rb") as file:
            head = file.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise RastosError(f"FILE: cannot read {source}: {error.strerror}") from None
    kind = "sqlite" if head == SQLITE_MAGIC else "pgdump" if head.startswith(PGDUMP_MAGIC) else None
    if kind is None:
        raise RastosError(f"FILE: {source} is not a rastos-hub backup (neither an SQLite database nor a pg_dump "
                          "archive of the custom format)")  # fmt: skip
    if kind != ("sqlite" if sqlite else "pgdump"):
        made, into = ("an SQLite", "PostgreSQL") if kind == "sqlite" else ("a PostgreSQL", "SQLite")
        raise RastosError(f"FILE: {source} is a backup of {made} hub, and --database is {into}",
                          hint=f"restore it into {made} database")  # fmt: skip
    revision = _sqlite_revision(source) if kind == "sqlite" else _pgdump_revision(source)
    _check_known(revision, f"FILE: {source}")
    return revision


def _sqlite_revision(source: Path) -> str:
    try:
        backup = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in backup.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if missing := HUB_TABLES - tables:
                raise RastosError(f"FILE: {source} is an SQLite database, but not a rastos-hub backup: it has "
                                  f"no table {', '.join(sorted(missing))}")  # fmt: skip
            if (check := backup.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise RastosError(f"FILE: {source} is damaged: {check}")
            rows = backup.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
        finally:
            backup.close()
    except sqlite3.Error as error:
        raise RastosError(f"FILE: {source} cannot be read as an SQLite database: {error}") from None
    return _one_revision(source, [str(row[0]) for row in rows])


def _pgdump_revision(source: Path) -> str:
    listing = run(["pg_restore", "--list", str(source)], capture=True).stdout
    tables = set(re.findall(r"^\d+; \d+ \d+ TABLE \S+ (\S+) ", listing, re.MULTILINE))
    if missing := HUB_TABLES - tables:
        raise RastosError(f"FILE: {source} is a pg_dump archive, but not of a rastos-hub database: it has no "
                          f"table {', '.join(sorted(missing))}")  # fmt: skip
    data = run(["pg_restore", "--data-only", f"--table={VERSION_TABLE}", "--file=-", str(source)], capture=True).stdout
    copied = rf"^COPY \S*{VERSION_TABLE} \(version_num\) FROM stdin;\n(.*?)^\\\.$"  # its rows, up to a line "\."
    found = re.search(copied, data, re.MULTILINE | re.DOTALL)
    return _one_revision(source, found[1].split() if found else [])


def _one_revision(source: Path, rows: list[str]) -> str:
    if len(rows) != 1:
        raise RastosError(f"FILE: {source} has {len(rows)} schema revisions in {VERSION_TABLE}, not one")
    return rows[0]


def _sqlite_restore(source: Path, database: Path) -> None:
    """Copy the backup into the database with the backup API, which writes it in one transaction of
    the database's: a failure leaves it as it was, and a `rastos-hub` command beside it (host add)
    waits for it rather than see half of it."""
    if database.exists() and database.resolve() == source.resolve():
        raise RastosError(f"FILE: {source} is the database itself")
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        backup = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            target = sqlite3.connect(database, timeout=30)
            try:
                backup.backup(target)
            finally:
                target.close()
        finally:
            backup.close()
    except sqlite3.Error as error:
        raise RastosError(f"database: cannot restore {database} from {source}: {error}") from None


def _check_database_revision(url: str) -> None:
    """A database a newer hub migrated may have tables this hub does not know of, which the restore
    would leave behind and the next migration trip over: refused before anything is changed."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(with_driver(url, asynchronous=False))
    try:
        with engine.connect() as db:
            current = MigrationContext.configure(db).get_current_revision()
    finally:
        engine.dispose()
    if current is not None:
        _check_known(current, "database: it")


def _postgresql_restore(url: str, source: Path) -> None:
    """The hub's tables dropped and the backup's made, in one transaction: pg_restore writes the script
    (with --clean, its own drops), psql runs it after dropping every table this hub knows of, so an
    older backup leaves none of a later revision's tables behind for its migration to trip over."""
    tables = sorted({VERSION_TABLE, *metadata.tables})
    with tempfile.TemporaryDirectory(prefix="rastos-hub-restore-") as folder, _libpq(url) as (uri, env):
        script = Path(folder) / "restore.sql"  # holds the token hashes too: the folder is this user's alone
        run(["pg_restore", "--clean", "--if-exists", "--no-owner", "--no-privileges", f"--file={script}",
             str(source)], capture=True)  # fmt: skip
        run(["psql", "--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1", f"--dbname={uri}",
             f"--command=DROP TABLE IF EXISTS {', '.join(tables)} CASCADE", f"--file={script}"],
            capture=True, env=env)  # fmt: skip
