"""What a staging is, and what it reads of the running tree: the light part of daemon/updates that
rastosd imports at start (the downloads, bundles and btrfs work are imported when a staging begins).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.updates.source import Cancelled, Source
from ops.errors import UnsafePath
from ops.rootfs import Links, Root

if TYPE_CHECKING:
    import ssl

    from daemon.updates.fetch import Download

IMAGE_INFO = "/usr/lib/rastos/image.json"
PrepareDeployment = Callable[[Path, Path, "Path | None"], dict[str, Any]]


def carry_nothing(new_root: Path, running_root: Path, pristine_image: Path | None) -> dict[str, Any]:
    """The deployment as its image made it: nothing carried over from the running root (the hook
    daemon/updates/carry.py's prepare_deployment fills)."""
    del new_root, running_root, pristine_image
    return {"carried": [], "reapplied": [], "hand_changes": []}


def read_image_info(root: Path) -> dict[str, Any]:
    """/usr/lib/rastos/image.json of a tree ({"profile", "version", "subvolume": {"name", "uuid"}}),
    or {} where there is none or it is not an object."""
    try:
        raw = Root(root).read_bytes(IMAGE_INFO, links=Links.SYSTEM, limit=64 * 1024)
        info = json.loads(raw) if raw is not None else {}
    except (UnsafePath, OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def image_identity(root: Path) -> str | None:
    """The identity (subvolume UUID) of the image version the tree was made from, if it says."""
    subvolume = read_image_info(root).get("subvolume")
    wanted = subvolume.get("uuid") if isinstance(subvolume, dict) else None
    return wanted if isinstance(wanted, str) else None


def image_version(root: Path) -> str:
    version = read_image_info(root).get("version")
    return version if isinstance(version, str) and version.isprintable() and len(version) <= 64 else ""


@dataclass(frozen=True)
class StageAnswer:
    """What a request to stage a named version came to (Updates.stage_version): `staging`, a staging
    of it started or under way already, with that staging's id; or `staged`, a deployment of it
    boots next already, with the id of the staging that placed it (0 when the store does not know)."""

    id: int
    state: str


@dataclass
class Staging:
    """One staging: what was asked, and what a Cancel() must reach."""

    id: int
    source: Source
    uid: int
    method: str
    reboot: bool
    headers: dict[str, str]
    fd: int | None  # the bundle's file, for a path
    tls: ssl.SSLContext | None = None  # what an https source is verified with; None: the system's store
    cancelled: threading.Event = field(default_factory=threading.Event)
    download: Download | None = None
    version: str = ""
    why_cancelled: str = "cancelled before it was staged"

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled
