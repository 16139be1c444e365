"""What the build host must provide, checked before any work starts."""

from __future__ import annotations

import os
import re
import shutil

from rastos.errors import RastosError
from rastos.process import missing_program_error, run

BUILD_PROGRAMS = (
    "mmdebstrap",
    "unshare",
    "bwrap",
    "mkfs.btrfs",
    "btrfs",
    "mkfs.vfat",
    "mcopy",
    "sfdisk",
    "qemu-img",
    "cp",
    "zstd",
)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RastosError(
            f"{what} needs root (it creates device nodes and files owned by other users)",
            hint="run it with sudo",
        )


def require_programs(programs: tuple[str, ...]) -> None:
    for program in programs:
        if shutil.which(program) is None:
            raise missing_program_error(program)


def btrfs_progs_version() -> tuple[int, ...]:
    out = run(["mkfs.btrfs", "--version"], capture=True).stdout
    match = re.search(r"v(\d+)\.(\d+)", out)
    if not match:
        raise RastosError(f"cannot read the btrfs-progs version from: {out.strip()!r}")
    return int(match.group(1)), int(match.group(2))


def check_build_host() -> tuple[int, ...]:
    """Refuses early when the host cannot build; returns the btrfs-progs version, which decides
    whether the root file system can be made without mounting it."""
    require_root("building an image")
    require_programs(BUILD_PROGRAMS)
    return btrfs_progs_version()
