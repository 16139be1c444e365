"""A shadow of a target: a throwaway copy-on-write view of its root, for dry runs of pipelines.

A dry run must plan each step against the state the earlier steps would leave, not against the host as
it is now (a `user` step planned after a step that creates its group; an `ssh` step after the one that
writes the key it needs). Ansible's check mode plans every task against the unchanged host and pyinfra
reads its facts up front; both show a plan that apply would not follow. Here the dry run applies the
steps for real, to an overlayfs whose lower layer is the target's root and whose upper layer is a tmpfs
that is thrown away: the files, and commands such as useradd, see each earlier step's changes, and the
target is never written. Runtime actions (a reload, /proc/sys) are planned and not carried out.

Filesystems mounted below the root (a /home subvolume, the ESP) get an overlay of their own at the same
place, so the shadow shows the same tree the ops see. Pseudo-filesystems are left out: ops read the
kernel's state by absolute path, never through the target.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ops.target import Target
from rastos.process import run

log = logging.getLogger("rastosd.shadow")

# Filesystems that hold files ops change; everything else under the root (proc, sysfs, tmpfs, ...)
# is runtime state that ops never reach through the target.
FILE_FILESYSTEMS = frozenset({"btrfs", "ext4", "ext3", "ext2", "xfs", "vfat", "f2fs", "overlay"})


def submounts(root: Path) -> list[Path]:
    """Mount points strictly below `root` that hold files, parents before children."""
    resolved = root.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        mount_point = Path(_unescape(fields[4]))
        fstype = fields[fields.index("-") + 1]
        if fstype in FILE_FILESYSTEMS and mount_point != resolved and mount_point.is_relative_to(resolved):
            found.append(mount_point)
    return sorted(set(found), key=lambda path: len(path.parts))


@contextlib.contextmanager
def shadow(target: Target) -> Iterator[Target]:
    """The target's shadow, unmounted and gone when the block ends (also when a step raised)."""
    scratch = Path(tempfile.mkdtemp(prefix="rastos-shadow-", dir="/run" if Path("/run").is_dir() else None))
    try:
        run(["mount", "-t", "tmpfs", "-o", "mode=0700", "rastos-shadow", scratch])
        try:
            merged = scratch / "merged"
            merged.mkdir()
            layers = [(target.root.resolve(), merged)]
            layers += [(mount, merged / mount.relative_to(target.root.resolve())) for mount in submounts(target.root)]
            for index, (lower, mount_point) in enumerate(layers):
                upper, work = scratch / f"upper{index}", scratch / f"work{index}"
                upper.mkdir()
                work.mkdir()
                options = f"lowerdir={_escape(lower)},upperdir={upper},workdir={work}"
                run(["mount", "-t", "overlay", "-o", options, "rastos-shadow", mount_point])
            yield replace(target, root=merged, runtime=target.live, simulated=True)
        finally:
            run(["umount", "--recursive", "--lazy", scratch], check=False)
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, plain)
    return path


def _escape(path: Path) -> str:
    """overlayfs splits its options at commas and lowerdir at colons."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
