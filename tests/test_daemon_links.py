"""A user's link in their own home cannot make rastosd read or write for them as root: the real
daemon on a private bus, a real btrfs root, and the account's owner planting the link."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.daemon_fixtures import BUS_NAME, JOB, MANAGER, PLAIN_USER, ROOT_PATH, Rastosd, ensure_test_users
from tests.test_daemon_bus import apply

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx alice@laptop"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9Up alice@phone"
SECRET = "root-only-secret-7d1e"


def alice(daemon: Rastosd) -> tuple[Path, int]:
    path, state = apply(daemon, "user", {"name": "alice", "authorized_keys": [KEY]})
    assert state == "done", daemon.get(JOB, "Result", path)
    home = daemon.scratch.root / "home/alice"
    return home, home.stat().st_uid


def plant(link: Path, points_to: str, uid: int) -> None:
    link.symlink_to(points_to)
    os.lchown(link, uid, uid)


def test_an_unprivileged_plan_shows_no_byte_of_a_root_only_file_behind_a_link(rastosd: Rastosd) -> None:
    ensure_test_users()
    home, uid = alice(rastosd)
    secret = rastosd.scratch.root / "root/secret"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(f"{SECRET}\n")
    secret.chmod(0o600)
    keys = home / ".ssh/authorized_keys"
    keys.unlink()
    plant(keys, "../../../root/secret", uid)  # relative: inside the daemon's root, wherever that is
    params = json.dumps({"name": "alice", "authorized_keys": [OTHER_KEY]})
    answer = rastosd.busctl("call", BUS_NAME, ROOT_PATH, MANAGER, "Plan", "ss", "user", params, user=PLAIN_USER,
                            check=False)  # fmt: skip
    assert answer.returncode != 0, answer.stdout
    assert SECRET not in answer.stdout + answer.stderr
    assert "/home/alice/.ssh/authorized_keys: is a symbolic link, which rastosd does not follow" in answer.stderr
    named = rastosd.gdbus(MANAGER, "Plan", "user", params, user=PLAIN_USER)  # gdbus shows the error's name
    assert SECRET not in named.stdout + named.stderr
    assert "GDBus.Error:org.rastos.Daemon1.Error.UnsafePath: /home/alice/.ssh/authorized_keys:" in named.stderr
    assert secret.read_text() == f"{SECRET}\n"


def test_apply_neither_writes_nor_removes_through_a_linked_ssh_directory(rastosd: Rastosd) -> None:
    home, uid = alice(rastosd)
    elsewhere = rastosd.scratch.root / "elsewhere"
    elsewhere.mkdir()
    (home / ".ssh/authorized_keys").unlink()
    (home / ".ssh").rmdir()
    plant(home / ".ssh", "../../elsewhere", uid)
    path, state = apply(rastosd, "user", {"name": "alice", "authorized_keys": [OTHER_KEY]})
    result = json.loads(rastosd.get(JOB, "Result", path))
    assert state == "failed", result
    assert "/home/alice/.ssh: is a symbolic link, which rastosd does not follow" in json.dumps(result)
    assert list(elsewhere.iterdir()) == [], "nothing was created behind the link"
    # A file root owns behind the link is not removed by an apply that wants no keys.
    (elsewhere / "authorized_keys").write_text(f"{SECRET}\n")
    path, state = apply(rastosd, "user", {"name": "alice", "authorized_keys": []})
    assert state == "failed", rastosd.get(JOB, "Result", path)
    assert (elsewhere / "authorized_keys").read_text() == f"{SECRET}\n"
