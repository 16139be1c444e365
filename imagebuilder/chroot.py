"""Running the image's own programs inside its root file system.

bubblewrap gives each command a private mount namespace with /proc, /dev and a tmpfs /run and /tmp,
so nothing is ever mounted on the host: an interrupted build cannot leave a mount behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from rastos.process import Argv, run

GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def in_private_mount_namespace(argv: Argv) -> list[str]:
    """`argv` run in a mount namespace of its own: whatever it mounts vanishes with it, even on
    SIGKILL, and it is stopped when the build stops it (--kill-child)."""
    return ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child=SIGTERM", "--", *map(str, argv)]


def chroot_argv(root: Path, argv: Argv) -> list[str]:
    return [
        "bwrap",
        "--bind", str(root), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-net",
        "--die-with-parent",
        "--clearenv",
        "--setenv", "PATH", GUEST_PATH,
        "--setenv", "LC_ALL", "C.UTF-8",
        "--setenv", "SYSTEMD_OFFLINE", "1",
        "--",
        *[str(a) for a in argv],
    ]  # fmt: skip


def chroot_run(
    root: Path, argv: Argv, *, capture: bool = False, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `argv` with `root` as its root directory."""
    return run(chroot_argv(root, argv), capture=capture, input=input)
