"""A real Debian root for op tests: a cached mmdebstrap tree, one btrfs snapshot of it per test.

The tree has the programs the ops drive (OpenSSH, nftables, sudo, zsh, systemd's files), built once
with mmdebstrap from Debian's registry and kept as a tarball under the cache directory, keyed by its
recipe. A session unpacks it into a subvolume on a btrfs loop file; each test gets a writable snapshot
(instant, and thrown away), so no test sees another's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CACHE_DIR, require_root
from tests.daemon_fixtures import ENTRY, ScratchRoot

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "openssh-server", "nftables", "sudo", "zsh", "systemd", "systemd-sysv", "systemd-resolved", "iproute2",
    "ca-certificates", "openssl", "prometheus-node-exporter", "apt-utils",
)  # fmt: skip


def recipe_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": sorted(PACKAGES), "variant": "minbase", "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def tree_tarball() -> Path:
    """The cached tree, made first if missing. xdist workers each ask for it at the start of their
    session: one makes it while the others wait on the lock, rather than all writing the same partial."""
    tarball = CACHE_DIR / "op-tree" / f"{recipe_key()}.tar"
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with (tarball.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        partial = tarball.with_suffix(".partial.tar")
        subprocess.run(
            ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--format=tar",
             "--quiet", SUITE, partial, MIRROR],
            check=True,
        )  # fmt: skip
        partial.rename(tarball)
    return tarball


@pytest.fixture(scope="session")
def op_tree_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_root()
    tarball = tree_tarball()
    directory = tmp_path_factory.mktemp("op-tree")
    image, top = directory / "btrfs.img", directory / "top"
    top.mkdir()
    subprocess.run(["truncate", "-s", "3G", image], check=True)
    subprocess.run(["mkfs.btrfs", "-q", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, top], check=True)
    try:
        subprocess.run(["btrfs", "-q", "subvolume", "create", top / "base"], check=True)
        subprocess.run(["tar", "-xf", tarball, "-C", top / "base"], check=True)
        yield top / "base"
    finally:
        subprocess.run(["umount", "--lazy", top], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture
def op_root(op_tree_base: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A writable snapshot of the tree for one test."""
    snapshot = op_tree_base.parent / f"test-{abs(hash(request.node.nodeid))}"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", op_tree_base, snapshot], check=True)
    try:
        yield snapshot
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["btrfs", "-q", "subvolume", "delete", snapshot], check=True, capture_output=True)


def tree_digest(root: Path) -> str:
    """Every path, its mode, owner and content: equal digests mean the tree is byte-identical."""
    digest = hashlib.sha256()
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(subdirs + files):
            path = Path(directory, name)
            status = path.lstat()
            digest.update(f"{path.relative_to(root)} {status.st_mode:o} {status.st_uid}:{status.st_gid}\n".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def op_scratch_root(base: Path, name: str) -> Iterator[ScratchRoot]:
    """The tree laid out as rastosd's tests expect it (@ the root, @snapshots beside it, an ESP), for a
    real daemon acting on a real Debian root."""
    top = base.parent / name
    top.mkdir()
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", base, top / "@"], check=True)
    subprocess.run(["btrfs", "-q", "subvolume", "create", top / "@snapshots"], check=True)
    esp = top / "esp"
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "loader" / "entries" / "rastos-0.conf").write_text(ENTRY)
    (esp / "loader" / "loader.conf").write_text("timeout 0\n")
    try:
        yield ScratchRoot(top, esp)
    finally:
        for snapshot in sorted((top / "@snapshots").glob("*/snapshot")) + sorted((top / "@snapshots").glob("*/*")):
            subprocess.run(["btrfs", "-q", "subvolume", "delete", snapshot], check=False, capture_output=True)
        for volume in ("@", "@snapshots"):
            subprocess.run(["btrfs", "-q", "subvolume", "delete", top / volume], check=False, capture_output=True)
