"""The fleet hub appliance (profile key `hub_server.enable`): rastos-hub and its units on a local
PostgreSQL, in an image of its own. Every other image gets none of it: no hub code, unit or package.

The hub's dependencies are Debian's, as the daemon's are (no pip inside an image); `postgresql` is the
suite's own server. The database and its role are made at the first boot, by rastos-hub-postgresql.service
(the cluster only runs then), and reached over /run/postgresql with peer authentication: no password.
"""

from __future__ import annotations

from pathlib import Path

from imagebuilder.chroot import chroot_run
from imagebuilder.files import write_file

HUB_PACKAGES = (
    "python3-aiohttp",
    "python3-sqlalchemy",
    "python3-aiosqlite",
    "python3-alembic",
    "python3-asyncpg",
    "python3-psycopg",
    "python3-jsonschema",
    "postgresql",
)
HUB_USER = "rastos-hub"
HUB_ENV = "etc/rastos-hub/hub.env"
# The role and the database are the hub's user's name: PostgreSQL's peer authentication maps the
# connecting user to the role of that name.
DATABASE_URL = f"postgresql://{HUB_USER}@/{HUB_USER}?host=/run/postgresql"
DEFAULT_LISTEN = "127.0.0.1:8470"


def hub_env() -> str:
    return (
        '# rastos-hub.service and rastos-hub-backup.service (docs/hub.md, "The hub appliance").\n'
        "# Plain HTTP on loopback until the fleet is to be served; then, with the certs op's pair:\n"
        "#   RASTOS_HUB_OPTIONS=--listen 0.0.0.0:8470 --tls-cert /var/lib/rastos-hub/tls/hub.crt "
        "--tls-key /var/lib/rastos-hub/tls/hub.key\n"
        f"RASTOS_HUB_OPTIONS=--listen {DEFAULT_LISTEN}\n"
        f"RASTOS_HUB_DATABASE={DATABASE_URL}\n"
    )


def install_hub_server(root: Path) -> None:
    """The hub's user and its settings; the caller installs the `hub` package and units/hub/."""
    # The user exists from the build on: the certs op's hub_names and `runuser -u rastos-hub` need it
    # at the first boot, before anything has started the hub.
    chroot_run(root, ["systemd-sysusers", f"/usr/lib/sysusers.d/{HUB_USER}.conf"])
    write_file(root / HUB_ENV, hub_env(), mode=0o640)
    (root / HUB_ENV).parent.chmod(0o750)
    # Readable by the hub's user, as `runuser -u rastos-hub -- rastos-hub ...` reads it with `set -a`.
    chroot_run(root, ["chgrp", HUB_USER, f"/{Path(HUB_ENV).parent}", f"/{HUB_ENV}"])
