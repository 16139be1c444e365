"""The real polkitd on a test's private bus, with rastOS's shipped actions and rules.

polkitd finds the system bus by DBUS_SYSTEM_BUS_ADDRESS and reads its actions and rules only from
/usr/share/polkit-1 and /etc/polkit-1: it runs in a mount namespace of its own where those two are a
scratch directory's, holding units/org.rastos.Daemon1.policy, units/60-rastos.rules and the test's
site rules, and nothing of the host's. Started as root, it becomes its own user (polkitd) at once, as
on a host; the bus it joins carries polkit's own bus policy beside rastosd's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_fixtures import CHECKOUT, USERS_LOCK, PrivateBus, logged_process

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
ACTIONS = CHECKOUT / "units" / "org.rastos.Daemon1.policy"
RULES = CHECKOUT / "units" / "60-rastos.rules"
# The shipped rule's group: [access] admin_group's default, which the rule cannot read.
SHIPPED_ADMIN_GROUP = "rastos"
GROUP_MEMBER = "rastos-test-member"
# In the namespace: polkit's two directories become the scratch ones, then polkitd runs; the values
# are arguments, never pasted into the script.
IN_NAMESPACE = 'mount --bind -- "$1" /usr/share/polkit-1 && mount --bind -- "$2" /etc/polkit-1 && shift 2 && exec "$@"'


def require_polkitd() -> None:
    if not POLKITD.exists() or not POLKIT_BUS_POLICY.exists():
        pytest.skip(f"needs polkitd ({POLKITD}, Debian's polkitd package: ./setup-host installs it)")


def ensure_group_member() -> None:
    """A user in the group the shipped rule names (the host's own group "rastos", made if missing).
    Under the lock ensure_test_users takes, for the same reason: xdist workers starting together."""
    with USERS_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["getent", "group", SHIPPED_ADMIN_GROUP], capture_output=True, check=False).returncode:
            subprocess.run(["groupadd", "--system", SHIPPED_ADMIN_GROUP], check=True)
        if subprocess.run(["id", GROUP_MEMBER], capture_output=True, check=False).returncode:
            subprocess.run(["useradd", "--system", "--no-create-home", "--groups", SHIPPED_ADMIN_GROUP, GROUP_MEMBER],
                           check=True)  # fmt: skip
    groups = subprocess.run(["id", "-nG", GROUP_MEMBER], capture_output=True, text=True, check=True).stdout.split()
    assert SHIPPED_ADMIN_GROUP in groups, groups


@contextlib.contextmanager
def polkitd(bus: PrivateBus, site_rules: str = "") -> Iterator[Path]:
    """polkitd serving `bus`, with `site_rules` as /etc/polkit-1/rules.d/10-site.rules (a site's own,
    which come before the shipped rule); yields its log."""
    directory = Path(tempfile.mkdtemp(prefix="rastos-polkit-", dir="/run"))  # polkitd's user reads it
    try:
        share, etc = directory / "share", directory / "etc"
        for folder in (share / "actions", share / "rules.d", etc / "rules.d"):
            folder.mkdir(parents=True)
        shutil.copy(ACTIONS, share / "actions")
        shutil.copy(RULES, share / "rules.d")
        if site_rules:
            (etc / "rules.d" / "10-site.rules").write_text(site_rules)
        for path in (directory, *directory.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        log = directory / "polkitd.log"
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_NAMESPACE, "sh", str(share),
                str(etc), str(POLKITD)]  # fmt: skip
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
        with logged_process(argv, log, "Acquired the name org.freedesktop.PolicyKit1", "polkitd owning its name", 20,
                            env):  # fmt: skip
            yield log
    finally:
        shutil.rmtree(directory)
