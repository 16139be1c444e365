"""rastos-hub: serve the fleet, and manage its hosts, admins and database from the shell."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.roles import RANKS, Role
from rastos.errors import RastosError

if TYPE_CHECKING:
    from hub.tls import TlsFiles

DEFAULT_DATABASE = "/var/lib/rastos-hub/hub.db"
DEFAULT_DATA_DIR = "/var/lib/rastos-hub"
DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_MAX_IMAGE_BYTES = 16 << 30
# rastos-hub.service's EnvironmentFile: the admin's commands on the hub's machine default to the database
# the service serves, so `runuser -u rastos-hub -- rastos-hub host add web-1` adds the host there.
HUB_ENV = Path("/etc/rastos-hub/hub.env")


def default_database(env_file: Path = HUB_ENV) -> str:
    """RASTOS_HUB_DATABASE as the service's environment file sets it, else the SQLite file."""
    try:
        lines = env_file.read_text().splitlines()
    except OSError:  # none, or not ours to read: the service's own default
        return DEFAULT_DATABASE
    for line in lines:
        key, separator, value = line.strip().partition("=")
        if separator and key.strip() == "RASTOS_HUB_DATABASE":
            return value.strip().strip("'\"") or DEFAULT_DATABASE
    return DEFAULT_DATABASE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="rastos-hub: %(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # it narrates every migration check
    try:
        if getattr(args, "over_api", False):  # a client of a running hub (rastos-hub run): no database here
            over_api: int = args.action(args)
            return over_api
        from hub.holders import serving
        from hub.store import database_url, migrate

        url = database_url(args.database)
        if getattr(args, "as_it_is", False):  # db backup and restore: what they copy is never migrated first
            copied: int = args.action(args, url)
            return copied
        with contextlib.ExitStack() as held:
            if getattr(args, "serves", False):  # before migrating: a second hub must not migrate under the first
                held.enter_context(serving(url))
            revision = migrate(url)
            logging.getLogger("rastos-hub").debug("database at schema revision %s", revision)
            result: int = args.action(args, url)
            return result
    except RastosError as error:
        print(f"rastos-hub: {error}", file=sys.stderr)
        return int(getattr(error, "exit_status", 1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rastos-hub", description="rastOS fleet hub")
    parser.add_argument("--database", default=default_database(), help=f"SQLite file or postgresql:// URL "
                        f"(default: RASTOS_HUB_DATABASE in {HUB_ENV}, else {DEFAULT_DATABASE})")  # fmt: skip
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(DEFAULT_DATA_DIR),
        help=f"where the hub keeps its files: images/ holds the bundles (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--trusted-keys",
        type=Path,
        metavar="DIR",
        help="a directory of *.pub keys (rastos-image key generate): a bundle signed by none of "
        "them is refused; without it the hub records the signing key, and hosts check it",
    )
    parser.add_argument("--debug", action="store_true")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the hub (API, UI, agent socket)")
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT (default {DEFAULT_LISTEN}); plain HTTP only on loopback, unless --insecure-listen",
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve HTTPS and wss:// with this PEM certificate (and chain)"
    )
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="the PEM private key of --tls-cert")
    serve.add_argument(
        "--insecure-listen",
        action="store_true",
        help="serve plain HTTP on a --listen address that is not loopback (tokens cross the network in the "
        "clear: only behind a TLS proxy on a network of its own)",
    )
    serve.add_argument("--sync-interval", type=float, default=5.0, help="seconds between sync beacons to UIs")
    serve.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help=f"the largest bundle an upload may carry (default {DEFAULT_MAX_IMAGE_BYTES})",
    )
    serve.set_defaults(action=_serve, serves=True)

    host = commands.add_parser("host", help="hosts the hub accepts").add_subparsers(required=True, metavar="ACTION")
    add = host.add_parser("add", help="add a host and print its agent token (shown this once)")
    add.add_argument("name")
    add.add_argument("--group", action="append", default=[], help="a group it belongs to (repeatable)")
    add.set_defaults(action=_host_add)
    remove = host.add_parser("remove", help="remove a host; its token stops working")
    remove.add_argument("name")
    remove.set_defaults(action=_host_remove)
    rotate = host.add_parser(
        "rotate", help="give a host a new agent token and print it (shown this once); also after a revoke"
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--grace",
        type=int,
        default=0,
        metavar="SECONDS",
        help="the old token keeps working this long, while the new one reaches the host (default 0: it stops "
        "now, and the agent connected with it is disconnected)",
    )
    rotate.set_defaults(action=_host_rotate)
    revoke = host.add_parser(
        "revoke", help="end a host's token now: its agent is disconnected and refused until `host rotate`"
    )
    revoke.add_argument("name")
    revoke.set_defaults(action=_host_revoke)
    host.add_parser("list", help="list hosts").set_defaults(action=_host_list)
    enrol = host.add_parser(
        "enrol", help="make a running host one of the hub's over SSH: its token made here and installed there by "
        "rastosd, then wait until its agent is connected"
    )  # fmt: skip
    enrol.add_argument("destination", metavar="[USER@]HOST[:PORT]", help="as rastosctl -H takes it (ssh from PATH)")
    enrol.add_argument(
        "--hub-url",
        required=True,
        action="append",
        metavar="URL",
        help="the hub as the host reaches it: its http(s):// or ws(s):// base, or its agent socket; again for "
        "each hub of several on one database, which the host tries in that order",
    )
    enrol.add_argument("--group", action="append", default=[], help="a group it belongs to (repeatable)")
    enrol.add_argument("--name", help="the host's name on the hub (default: the first label of HOST)")
    enrol.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM certificate(s) a wss:// hub is verified with, "
        "installed on the host as hub-ca.pem beside daemon.toml (/etc/rastos/hub-ca.pem)",
    )
    enrol.add_argument(
        "--timeout",
        type=int,
        default=60,
        metavar="SECONDS",
        help="how long to wait for the agent to connect (default 60)",
    )
    enrol.add_argument(
        "--connect-timeout",
        type=int,
        default=20,
        metavar="SECONDS",
        help="give up on a host silent this long (default 20)",
    )
    enrol.add_argument(
        "--rotate",
        action="store_true",
        help="the hub has the host already: give it a new token, installed the same way",
    )
    enrol.set_defaults(action=_host_enrol)

    admin = commands.add_parser("admin", help="admins of the API and UI").add_subparsers(
        required=True, metavar="ACTION"
    )
    admin_add = admin.add_parser("add", help="add an admin and print their token (shown this once)")
    admin_add.add_argument("name")
    # Default admin: `admin add NAME` has always made an admin who may do everything, and the scripts
    # and docs that add one and then add hosts or upload images with its token go on working.
    admin_add.add_argument(
        "--role",
        choices=[role.value for role in RANKS],
        default="admin",
        help="viewer (reads), operator (and runs and rollouts) or admin (and hosts and images; the default)",
    )
    admin_add.set_defaults(action=_admin_add)
    set_role = admin.add_parser(
        "set-role", help="change an admin's role (their open UI pages reconnect with it); the last admin stays one"
    )
    set_role.add_argument("name")
    set_role.add_argument("role", choices=[role.value for role in RANKS])
    set_role.set_defaults(action=_admin_set_role)
    admin_rotate = admin.add_parser(
        "rotate", help="give an admin a new token and print it (shown this once); the old one and its sessions end"
    )
    admin_rotate.add_argument("name")
    admin_rotate.set_defaults(action=_admin_rotate)
    admin_remove = admin.add_parser("remove", help="remove an admin: their token and sessions stop working")
    admin_remove.add_argument("name")
    admin_remove.set_defaults(action=_admin_remove)
    admin.add_parser("list", help="list admins").set_defaults(action=_admin_list)

    image = commands.add_parser("image", help="update bundles the hub keeps and rolls out").add_subparsers(
        required=True, metavar="ACTION"
    )
    image_add = image.add_parser("add", help="check a bundle and keep it (the same bundle twice is one image)")
    image_add.add_argument("bundle", type=Path)
    image_add.set_defaults(action=_image_add)
    image.add_parser("list", help="list images").set_defaults(action=_image_list)
    image_remove = image.add_parser(
        "remove", help="remove an image and its file; refused while a rollout that has not ended uses it"
    )
    image_remove.add_argument("image", metavar="IMAGE", help="its id, or its version if no other image has it")
    image_remove.set_defaults(action=_image_remove)

    from hub import run_cli

    run_cli.add_commands(commands)

    db = commands.add_parser("db", help="the database").add_subparsers(required=True, metavar="ACTION")
    db.add_parser("upgrade", help="migrate to the newest schema (serve does it too)").set_defaults(
        action=lambda _args, _url: 0
    )
    db_backup = db.add_parser(
        "backup", help="copy the whole database to a file of mode 600 (it holds token hashes), also while the hub "
        "serves: SQLite's online backup, or pg_dump"
    )  # fmt: skip
    db_backup.add_argument(
        "file", type=Path, metavar="FILE", help="the backup; a directory: a new file in it, rastos-hub-TIME.sqlite "
        "(or .pgdump)"
    )  # fmt: skip
    db_backup.add_argument(
        "--keep", type=int, metavar="N", help="FILE is a directory: keep only the newest N backups named so in it"
    )
    db_backup.set_defaults(action=_db_backup, as_it_is=True)
    db_restore = db.add_parser(
        "restore", help="replace the whole database with a backup's contents, then migrate them to this hub's "
        "schema; refused while a hub serves from it"
    )  # fmt: skip
    db_restore.add_argument("file", type=Path, metavar="FILE", help="a file `db backup` wrote")
    db_restore.add_argument(
        "--force",
        action="store_true",
        help="PostgreSQL: restore while hubs serve from it (restart them after); SQLite refuses it all the same",
    )
    db_restore.set_defaults(action=_db_restore, as_it_is=True)
    return parser


def _db_backup(args: argparse.Namespace, url: str) -> int:
    from hub.backup import backup

    written = backup(url, args.file, args.keep)
    print(f"backup written to {written}")
    return 0


def _db_restore(args: argparse.Namespace, url: str) -> int:
    from hub.backup import restore

    restored = restore(url, args.file, args.force)
    moved = "" if restored.revision == restored.backup_revision else f", migrated to {restored.revision}"
    print(f"database restored from {args.file} (schema revision {restored.backup_revision}{moved})")
    return 0


def _serve(args: argparse.Namespace, url: str) -> int:
    from hub.app import Settings, make_app
    from hub.guard import serve
    from hub.tls import check_listen

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise RastosError(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if args.sync_interval <= 0:
        raise RastosError("--sync-interval: must be positive")
    if args.max_image_bytes <= 0:
        raise RastosError("--max-image-bytes: must be positive")
    tls = _tls_files(args)
    check_listen(host.strip("[]"), tls is not None, args.insecure_listen)
    settings = Settings(url, args.sync_interval, args.data_dir, args.max_image_bytes, _trusted_keys(args))
    app = make_app(settings)
    asyncio.run(serve(app, host.strip("[]"), int(port), tls))
    return 0


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    from hub.tls import TlsFiles

    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        given, missing = ("--tls-cert", "--tls-key") if args.tls_key is None else ("--tls-key", "--tls-cert")
        raise RastosError(f"{missing}: needed with {given}")
    return TlsFiles(args.tls_cert, args.tls_key)


def _trusted_keys(args: argparse.Namespace) -> Path | None:
    directory: Path | None = args.trusted_keys
    if directory is not None and not directory.is_dir():
        raise RastosError(f"--trusted-keys: {directory} is not a directory")
    return directory


def _image_files(args: argparse.Namespace) -> Any:
    from hub.images import ImageFiles

    # A bundle given from the shell is the admin's own file: no upload's size limit applies.
    return ImageFiles(args.data_dir / "images", sys.maxsize, _trusted_keys(args))


def _with_store(url: str, work: Callable[[Any], Awaitable[Any]]) -> Any:
    from hub.store import Store

    async def session() -> Any:
        store = Store(url)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(session())


def _host_add(args: argparse.Namespace, url: str) -> int:
    from hub.api import NEW_HOST, validate

    validate(NEW_HOST, {"name": args.name, "groups": list(dict.fromkeys(args.group))})
    token, _ = _with_store(url, lambda store: store.add_host(args.name, list(dict.fromkeys(args.group)), "cli"))
    print(f"host {args.name} added; its agent token (shown only now):\n{token}")
    return 0


def _host_remove(args: argparse.Namespace, url: str) -> int:
    _with_store(url, lambda store: store.remove_host(args.name, "cli"))
    print(f"host {args.name} removed")
    return 0


def _host_enrol(args: argparse.Namespace, url: str) -> int:
    from hub.enrol import Enrol, plan_from

    plan = plan_from(args)
    _with_store(url, lambda store: Enrol(store, plan, lambda line: print(line, flush=True))())
    return 0


def _host_rotate(args: argparse.Namespace, url: str) -> int:
    from hub.api import MAX_GRACE

    if not 0 <= args.grace <= MAX_GRACE:
        raise RastosError(f"--grace: must be between 0 and {MAX_GRACE} seconds, got {args.grace}")
    token, expires, _ = _with_store(url, lambda store: store.rotate_host_token(args.name, args.grace, "cli"))
    if expires is None:
        old = "the old token stopped working; the agent connected with it is disconnected within a second"
    else:
        old = f"the old token works until {_when(expires)} ({args.grace} s)"
    print(f"host {args.name}: {old}; its new agent token (shown only now):\n{token}")
    return 0


def _host_revoke(args: argparse.Namespace, url: str) -> int:
    _with_store(url, lambda store: store.revoke_host_token(args.name, "cli"))
    print(f"host {args.name}: token revoked; its agent is disconnected within a second "
          f"(`rastos-hub host rotate {args.name}` gives it a new token)")  # fmt: skip
    return 0


def _host_list(_args: argparse.Namespace, url: str) -> int:
    for host in _with_store(url, lambda store: store.hosts()):
        facts = host["facts"] or {}
        print(f"{host['name']}\tgroups={','.join(host['groups']) or '-'}\thostname={facts.get('hostname', '-')}"
              f"\ttoken={_token_state(host)}")  # fmt: skip
    return 0


def _token_state(host: dict[str, Any]) -> str:
    if host["token_revoked"] is not None:
        return f"revoked {_when(host['token_revoked'])}"
    if host["old_token_expires"] is not None and host["old_token_expires"] > time.time():
        return f"rotated (the old one works until {_when(host['old_token_expires'])})"
    return "valid"


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _admin_add(args: argparse.Namespace, url: str) -> int:
    from hub.api import NEW_HOST, validate

    validate(NEW_HOST, {"name": args.name})  # admins are named like hosts
    token = _with_store(url, lambda store: store.add_admin(args.name, Role(args.role), "cli"))
    print(f"admin {args.name} added with the role {args.role}; their token (shown only now):\n{token}")
    return 0


def _admin_set_role(args: argparse.Namespace, url: str) -> int:
    before = _with_store(url, lambda store: store.set_admin_role(args.name, Role(args.role), "cli"))
    if before == args.role:
        print(f"admin {args.name} has the role {args.role} already")
    else:
        print(f"admin {args.name}: the role {args.role} (was {before}); their open UI pages reconnect with it")
    return 0


def _admin_rotate(args: argparse.Namespace, url: str) -> int:
    token = _with_store(url, lambda store: store.rotate_admin_token(args.name, "cli"))
    print(f"admin {args.name}: the old token and its sessions stopped working; the new token (shown only now):"
          f"\n{token}")  # fmt: skip
    return 0


def _admin_remove(args: argparse.Namespace, url: str) -> int:
    _with_store(url, lambda store: store.remove_admin(args.name, "cli"))
    print(f"admin {args.name} removed; their token and sessions stopped working")
    return 0


def _admin_list(_args: argparse.Namespace, url: str) -> int:
    for admin in _with_store(url, lambda store: store.admins()):
        print(f"{admin['name']}\trole={admin['role']}\tadded {_when(admin['created'])}")
    return 0


def _image_add(args: argparse.Namespace, url: str) -> int:
    from hub.rollout_store import RolloutStore
    from hub.rollouts import keep_image

    files = _image_files(args)
    checked = files.copy_in(args.bundle)
    try:
        image, logged = _with_store(url, lambda store: keep_image(files, RolloutStore(store), checked, "cli"))
    finally:
        files.discard(checked)
    print(f"image {image['id']}: {_image_line(image)}{'' if logged else ' (there already)'}")
    return 0


def _image_list(args: argparse.Namespace, url: str) -> int:
    from hub.rollout_store import RolloutStore
    from hub.rollouts import image_view

    for row in _with_store(url, lambda store: RolloutStore(store).images()):
        image = image_view(row)
        print(f"{image['id']}\t{_image_line(image)}")
    return 0


def _image_remove(args: argparse.Namespace, url: str) -> int:
    from hub.rollout_store import RolloutStore

    async def remove(store: Any) -> tuple[str, str]:
        images = RolloutStore(store)
        image_id = await images.find_image(args.image)
        sha256, _ = await images.remove_image(image_id, "cli", field="image")
        return image_id, sha256

    image_id, sha256 = _with_store(url, remove)
    _image_files(args).remove(sha256)  # only once the row is gone: RolloutStore.remove_image says why
    print(f"image {image_id} removed, and its bundle")
    return 0


def _image_line(image: dict[str, Any]) -> str:
    kind = f"delta from {image['parent']}" if image["delta"] else "full"
    key = f"key {image['key_id']}" + (" (checked)" if image["signature_checked"] else "")
    return f"{image['profile']} {image['version']} ({kind}), {image['size']} bytes, sha256 {image['sha256']}, {key}"
