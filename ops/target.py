"""What an op acts on: a `Target`, a root directory, and the reads every op makes of it.

On the live system the root is `/` and actions with a runtime side (the kernel's host name, /proc/sys,
a service reload) take effect at once; aimed at a scratch root they only write files. A *simulated*
target is a throwaway copy-on-write view of a live one (shadow.py): a dry run applies its steps there,
so each step is planned against what the earlier ones would leave; runtime actions are planned as on
the live system but never carried out. Files in it are reached only through `Target.files`
(rootfs.py), which follows no link it did not make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.errors import UnsafePath
from ops.rootfs import Links, Root


@dataclass(frozen=True)
class Target:
    root: Path
    # Whether the running kernel and services are this root's (plan runtime actions). Default: root is /.
    # A test sets it for a scratch root inside a network namespace it made.
    runtime: bool | None = None
    simulated: bool = False  # a shadow for a dry run: runtime actions are planned, never carried out

    @property
    def live(self) -> bool:
        return self.root == Path("/") if self.runtime is None else self.runtime

    @property
    def acts_at_runtime(self) -> bool:
        return self.live and not self.simulated

    @property
    def files(self) -> Root:
        """Every file an op reads or writes goes through here: no link it did not make is followed."""
        return Root(self.root)

    def host_path(self, absolute: str) -> Path:
        """The host's path of a file in the target, for a program run on it (bwrap, useradd --prefix).
        Never opened here: the kernel would follow whatever links are on the way (use `files`)."""
        return self.root / absolute.lstrip("/")

    def read_text(self, absolute: str, *, links: Links = Links.NONE) -> str | None:
        return self.files.read_text(absolute, links=links)

    def exists(self, absolute: str) -> bool:
        """A file or directory is there; a link in its place or on its way is refused (UnsafePath)."""
        return self._kind(absolute) is not None

    def is_dir(self, absolute: str) -> bool:
        return self._kind(absolute) == "directory"

    def _kind(self, absolute: str) -> str | None:
        kind = self.files.kind(absolute)
        if kind == "link":
            raise UnsafePath(absolute, "is a symbolic link, which rastosd does not follow")
        return kind

    def has_program(self, absolute: str) -> bool:
        """One of the distribution's programs is installed (its own links, as alternatives make, count)."""
        return self.files.kind(absolute, links=Links.SYSTEM) == "file"


def lookup_user(target: Target, name: str) -> tuple[int, int]:
    """uid and gid of a user in the target's own /etc/passwd (not the host's: the target may differ)."""
    if name == "root":
        return 0, 0
    for entry in read_colon_file(target, "/etc/passwd"):
        if entry[0] == name and len(entry) >= 4:
            return int(entry[2]), int(entry[3])
    raise LookupError(f"user {name!r} does not exist in {target.host_path('/etc/passwd')}")


def read_colon_file(target: Target, absolute: str) -> list[list[str]]:
    text = target.read_text(absolute) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def in_target(target: Target, argv: Sequence[str], run_dirs: Sequence[str] = ()) -> list[str]:
    """argv for one of the target's own programs, run on the target's files. On / as it is; on a
    scratch root under bubblewrap (the root bound at /, fresh /proc, /dev and an empty /run with
    `run_dirs` in it), which mounts nothing on the host. The network namespace stays the caller's:
    a test that made one for the target gets the target's nft or ip acting in it."""
    if target.root == Path("/"):
        return list(argv)
    wrapper = ["bwrap", "--bind", str(target.root), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run",
               "--tmpfs", "/tmp", "--die-with-parent", "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin"]  # fmt: skip
    for directory in run_dirs:
        wrapper += ["--dir", f"/run/{directory}"]
    return [*wrapper, "--", *argv]
