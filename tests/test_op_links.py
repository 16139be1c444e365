"""No op reaches through a link it did not make, for any path it touches, on a real Debian root.

Each op of the library runs once on a snapshot of the tree while ops/rootfs.py records every
path it reads or writes. Then, for each component of each of those paths (a directory on the way or
the file itself), a fresh snapshot gets a link in that place, owned by an unprivileged user as a
hostile local user's would be: to the original moved aside, or to a file outside the root that holds a
secret. The op must refuse (UnsafePath), the link's target must be byte-identical afterwards, and no
byte of the secret may show in the plan, the output or the error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.errors import UnsafePath
from ops import firewall, monitoring, rootfs
from ops.base import execute
from ops.steps import step_from
from ops.target import Target
from rastos.errors import RastosError
from tests.op_tree import op_root, op_tree_base  # noqa: F401  (fixtures)
from tests.test_op_library import CASES, KEY, Case, apply

pytestmark = [pytest.mark.root, pytest.mark.network]

HOSTILE_UID = 65534  # nobody: a link root did not make
SECRET = "rastos-test-secret-9f3c2a"

# Paths an op only consults, where a link makes it go on without the file instead of refusing: the
# ssh op's lockout check skips an account whose keys sit behind a link (it counts no key there), so a
# user cannot block the hardening of the whole host by planting one in their own home.
KEYS = "/.ssh/authorized_keys"
# And where the op only looks whether its unit's enablement link is there (systemctl made it, and
# left alone it means "enabled"), never through it.
CONSULTED_ONLY = {("firewall", firewall.ENABLED_LINK), ("monitoring", monitoring.ENABLED_LINK)}
# The update op on a scratch root binds the host's resolver where the root's own /etc/resolv.conf link
# leads (systemd-resolved's stub, in the sandbox's /run): a link root did not make gets no resolver,
# and apt, inside the sandbox, sees whatever the root holds.
CONSULTED_ONLY |= {("update", "/etc/resolv.conf")}


def consulted_only(op: str, component: str, paths: list[str]) -> bool:
    if (op, component) in CONSULTED_ONLY:
        return True
    leads_to = [path for path in paths if path == component or path.startswith(component + "/")]
    return op == "ssh" and all(path.endswith(KEYS) for path in leads_to)


def touched_by(target: Target, case: Case) -> list[str]:
    seen: list[str] = []
    token = rootfs.touched.set(seen)
    try:
        assert apply(target, case.op, case.params) == []
    finally:
        rootfs.touched.reset(token)
    return seen


def components(paths: list[str]) -> list[str]:
    """Every directory on the way to each path, and the path itself ("/" aside)."""
    found: set[str] = set()
    for path in paths:
        parts = path.strip("/").split("/")
        found.update("/" + "/".join(parts[:end]) for end in range(1, len(parts) + 1))
    # The scratch directories an op makes for a program's check have a new random name each time.
    return sorted(path for path in found if "/.rastos-" not in path)


def digest(path: Path) -> str:
    """Names, modes, owners, sizes and times under `path` (content too for files): any write shows."""
    hashed = hashlib.sha256()
    if not path.exists():
        return "missing"
    entries = [path] if not path.is_dir() else [Path(d, n) for d, ds, fs in os.walk(path) for n in ds + fs]
    for entry in sorted(entries):
        status = entry.lstat()
        hashed.update(f"{entry} {status.st_mode:o} {status.st_uid} {status.st_size} {status.st_mtime_ns}\n".encode())
        if entry.is_file() and not entry.is_symlink() and status.st_size < 1 << 20:
            hashed.update(entry.read_bytes())
    return hashed.hexdigest()


@contextlib.contextmanager
def snapshot_of(base: Path, name: str) -> Iterator[Path]:
    copy = base.parent / name
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", base, copy], check=True)
    try:
        yield copy
    finally:
        subprocess.run(["btrfs", "-q", "subvolume", "delete", copy], check=False, capture_output=True)


@dataclass
class Planted:
    link: str
    points_to: Path


def plant(root: Path, component: str, outside: Path, last: bool) -> Planted | None:
    """A link owned by nobody in place of `component`: to the original (moved aside) when there is
    one, else to a secret outside the root. A file there gets the secret appended in its copy; a link
    there (the distribution's, root's) is made again as nobody's. None where the directory above is
    missing: nobody can plant a link there (the op makes it, a link swapped in later is refused by the
    kernel's O_NOFOLLOW, not by a check this test could reach)."""
    place = root / component.lstrip("/")
    if not place.parent.is_dir() or place.parent.is_symlink():
        return None
    secret = outside / f"target-{hashlib.sha256(component.encode()).hexdigest()[:12]}"
    if place.is_symlink():
        secret = place.readlink()  # the distribution's own: the same link again, nobody's
        place.unlink()
        place.symlink_to(secret)
        os.lchown(place, HOSTILE_UID, HOSTILE_UID)
        inside = root / str(secret).lstrip("/") if secret.is_absolute() else place.parent / secret
        return Planted(component, inside)
    elif place.is_file():
        secret.write_bytes(place.read_bytes() + f"\n{SECRET}\n".encode())
        secret.chmod(0o600)
        place.unlink()
    elif place.is_dir():
        secret = place.with_name(place.name + ".moved-by-test")
        place.rename(secret)
    elif last:
        secret.write_text(f"{SECRET}\n")
        secret.chmod(0o600)
    else:
        secret.mkdir()
        (secret / "marker").write_text(f"{SECRET}\n")
    place.symlink_to(secret)
    os.lchown(place, HOSTILE_UID, HOSTILE_UID)
    return Planted(component, secret)


def attempt(target: Target, case: Case) -> tuple[str, str]:
    """What the op did: refused (UnsafePath), failed otherwise, or applied; and all it showed."""
    shown: list[str] = []
    try:
        step = step_from(target, case.op, case.params, "")
        plan = step.op.plan(target, step.params)
        shown.append(json.dumps(plan.as_json()))
        execute(plan, target, shown.append)
        shown += step.op.verify(target, step.params)
    except UnsafePath as error:
        return "refused", "\n".join([*shown, str(error)])
    except (RastosError, OSError, LookupError) as error:
        return "failed", "\n".join([*shown, f"{type(error).__name__}: {error}"])
    return "applied", "\n".join(shown)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.op)
def test_a_link_in_place_of_any_path_an_op_touches_is_refused(op_root: Path, tmp_path: Path, case: Case) -> None:  # noqa: F811
    target = Target(op_root)
    for op, params in case.before:
        assert apply(target, op, params) == []
    with snapshot_of(op_root, op_root.name + "-pristine") as pristine:
        paths = touched_by(target, case)
        assert paths, f"{case.op} touches files"
        finals = set(paths)
        problems = []
        for number, component in enumerate(components(paths)):
            outside = tmp_path / str(number)
            outside.mkdir()
            with snapshot_of(pristine, f"{op_root.name}-link-{number}") as hostile:
                planted = plant(hostile, component, outside, component in finals)
                if planted is None:
                    continue
                before = digest(planted.points_to)
                outcome, shown = attempt(Target(hostile), case)
                if SECRET in shown:
                    problems.append(f"{component}: the secret showed: {shown[:300]}")
                if digest(planted.points_to) != before:
                    problems.append(f"{component}: the link's target changed")
                if outcome != "refused" and not consulted_only(case.op, component, paths):
                    problems.append(f"{component}: {outcome}, not refused: {shown[-300:]}")
                elif outcome == "refused" and component not in shown:
                    problems.append(f"{component}: the refusal does not name it: {shown[-300:]}")
        assert not problems, "\n".join(problems)


def test_a_plan_shows_no_content_of_a_file_not_every_user_may_read(op_root: Path) -> None:  # noqa: F811
    """Plans and job results are readable by every user: keys and sudo rules show by name only."""
    target = Target(op_root)
    admin = {"name": "admin", "authorized_keys": [KEY], "sudo": True}
    assert apply(target, "user", admin) == []
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJb other@host"
    step = step_from(target, "user", {**admin, "authorized_keys": [other], "sudo_nopasswd": True}, "")
    shown = json.dumps(step.op.plan(target, step.params).as_json())
    assert "/home/admin/.ssh/authorized_keys" in shown and "/etc/sudoers.d/rastos-admin" in shown
    assert KEY.split()[1] not in shown and other.split()[1] not in shown and "ALL=" not in shown, shown
    assert shown.count("content not shown: the file is not readable by every user") == 2
    step = step_from(target, "motd", {"text": "welcome"}, "")
    assert "+welcome" in json.dumps(step.op.plan(target, step.params).as_json()), "a readable file shows its diff"
