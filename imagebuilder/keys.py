"""The key a build signs its update bundles with: the one `--signing-key` names, or else the build
host's own, made on first use. An image trusts the key it was built with (its public half goes into
/etc/rastos/update-keys.d/), so the next bundle signed by the same key is taken by hosts made from it.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from rastos.bundle import KEY_SUFFIX, SigningKey, generate_key
from rastos.errors import RastosError

log = logging.getLogger("rastos.build")

DEFAULT_KEY = Path("/var/lib/rastos-image/signing-key")


def signing_key(path: Path | None) -> SigningKey:
    if path is None:
        return host_key(DEFAULT_KEY)
    if not path.is_file():
        raise RastosError(
            f"--signing-key {path}: no such file",
            hint=f"make a key pair with: rastos-image key generate {path}",
        )
    return SigningKey.load(path)


def host_key(path: Path) -> SigningKey:
    """The key at `path`, made there first if there is none. Builds that start together make one key
    between them (under a lock), and a public half lost since is written again from the private one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            public, key_id = generate_key(path)
            log.warning(
                "made this build host's signing key %s (id %s): images built from now on trust it; copy %s to "
                "/etc/rastos/update-keys.d/ of hosts made before", path, key_id, public,
            )  # fmt: skip
        key = SigningKey.load(path)
        public_path = path.with_name(path.name + KEY_SUFFIX)
        if not public_path.exists():
            public_path.write_bytes(key.public_pem())
            public_path.chmod(0o644)
    return key
