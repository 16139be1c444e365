"""The steps of a plan: each action says what it will change (`describe`, what plans show) and carries
it out (`execute`, only ever from the executor in base.py). Files are written through the target's
link-refusing file access; programs of the target run on its files (bwrap on a scratch root).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ops.target import Target, lookup_user
from rastos.process import run

Output = Callable[[str], None]
SYSTEMD_RUNNING = Path("/run/systemd/system")  # what sd_booted() looks for


@dataclass(frozen=True)
class Change:
    """One line of a plan or a result, as a client shows it."""

    subject: str  # "/etc/hostname", "user alice", "kernel host name"
    action: str  # create, modify, remove, set, run
    detail: str = ""  # a unified diff for files, the command for commands

    def as_json(self) -> dict[str, str]:
        return {"subject": self.subject, "action": self.action, "detail": self.detail}


class Action(ABC):
    """One step of a plan. `paths` are the files it may change: what a restore puts back.
    A `runtime` action changes the running system only (a kernel value, a service): it is carried out
    on the live system and skipped on scratch roots and shadows."""

    runtime: ClassVar[bool] = False

    @abstractmethod
    def describe(self) -> Change: ...

    @abstractmethod
    def execute(self, target: Target, output: Output) -> None: ...

    @property
    def paths(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class WriteFile(Action):
    path: str
    content: str
    old_content: str | None
    mode: int = 0o644
    owner: str = "root"  # a user name, resolved in the target's /etc/passwd when applied
    old_mode: int | None = None  # the file's mode now, where it is there

    def describe(self) -> Change:
        action = "create" if self.old_content is None else "modify"
        if not self.mode & 0o004 or (self.old_mode is not None and not self.old_mode & 0o004):
            # Plans and job results are for every user to read: a file that not every user may read
            # (sudoers, keys) shows in them by name only, neither its old content nor its new.
            return Change(self.path, action, "content not shown: the file is not readable by every user")
        return Change(self.path, action, _diff(self.path, self.old_content or "", self.content))

    def execute(self, target: Target, output: Output) -> None:
        uid, gid = lookup_user(target, self.owner)
        target.files.write(self.path, self.content, self.mode, uid, gid)
        output(f"wrote {self.path}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class CheckedWrite(Action):
    """A file written only after a program of the target accepted its new content (nft -c, sshd -t,
    visudo -c): the plan says which, and nothing is written when it refuses."""

    path: str
    content: str
    old_content: str | None
    checker: ClassVar[str]  # the check as the plan and the output name it
    what: ClassVar[str]  # what the file holds: "the new <what>"
    mode: ClassVar[int] = 0o644

    @abstractmethod
    def check(self, target: Target) -> None:
        """Raise OpFailed, saying why, when the target's program refuses `content`."""

    def describe(self) -> Change:
        change = self._write().describe()
        checked = f"(checked with {self.checker} before it is written)\n"
        return Change(change.subject, change.action, change.detail + checked)

    def execute(self, target: Target, output: Output) -> None:
        self.check(target)
        output(f"{self.checker} accepts the new {self.what}")
        self._write().execute(target, output)

    def _write(self) -> WriteFile:
        return WriteFile(self.path, self.content, self.old_content, self.mode)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class MakeDirectory(Action):
    path: str
    mode: int = 0o755
    owner: str = "root"

    def describe(self) -> Change:
        return Change(self.path, "create", f"directory, mode {self.mode:o}, owner {self.owner}")

    def execute(self, target: Target, output: Output) -> None:
        uid, gid = lookup_user(target, self.owner)
        target.files.make_directory(self.path, self.mode, uid, gid)
        output(f"created {self.path}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class RemoveFile(Action):
    path: str

    def describe(self) -> Change:
        return Change(self.path, "remove")

    def execute(self, target: Target, output: Output) -> None:
        target.files.remove(self.path)
        output(f"removed {self.path}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class RunCommand(Action):
    """A program run on the host against the target; `{root}` in argv becomes the target's root."""

    subject: str
    argv: tuple[str, ...]
    touches: tuple[str, ...] = ()
    makes_links: bool = False  # what it touches are links it makes (systemctl enable)

    def describe(self) -> Change:
        return Change(self.subject, "run", " ".join(self.argv))

    def execute(self, target: Target, output: Output) -> None:
        argv = [arg.replace("{root}", str(target.root)) for arg in self.argv]
        # Each line as the program prints it (stderr too): a long one is followed while it runs.
        run(argv, on_line=output)
        output(f"ran {argv[0]} for {self.subject}")

    @property
    def paths(self) -> tuple[str, ...]:
        return self.touches


@dataclass(frozen=True)
class SetKernelHostname(Action):
    """The running kernel's host name; only on the live system (a scratch root has no kernel)."""

    hostname: str
    old: str
    runtime: ClassVar[bool] = True

    def describe(self) -> Change:
        return Change("kernel host name", "set", f"{self.old} -> {self.hostname}")

    def execute(self, target: Target, output: Output) -> None:
        socket.sethostname(self.hostname)
        output(f"kernel host name is now {self.hostname}")


@dataclass(frozen=True)
class WriteSysctl(Action):
    """A value written to /proc/sys at once; only on the live system."""

    key: str
    value: str
    old: str
    runtime: ClassVar[bool] = True

    def describe(self) -> Change:
        return Change(f"sysctl {self.key}", "set", f"{self.old} -> {self.value}")

    def execute(self, target: Target, output: Output) -> None:
        Path("/proc/sys", *self.key.split(".")).write_text(self.value + "\n")
        output(f"{self.key} = {self.value}")


@dataclass(frozen=True)
class FollowUp(Action):
    """What a service owes after its files changed (`systemctl reload ssh.service`). The executor
    records it in the state store before the step's writes and marks it done after it ran, so a crash
    in between still runs it at the daemon's next start (followups.py)."""

    verb: str  # reload, restart, try-reload-or-restart, enable --now: systemctl's own words
    unit: str
    runtime: ClassVar[bool] = True

    def describe(self) -> Change:
        return Change(f"unit {self.unit}", self.verb, f"systemctl {self.verb} {self.unit}")

    def execute(self, target: Target, output: Output) -> None:
        output(f"{self.verb} {self.unit}: {self.run(output)}")

    def run(self, output: Output) -> str:
        """Carry it out; returns the outcome the state store records."""
        if not SYSTEMD_RUNNING.is_dir():  # sd_booted(): a container or chroot without systemd as init
            return "skipped: systemd is not running here"
        run(["systemctl", *self.verb.split(), self.unit], capture=True)
        return "done"

    def as_json(self) -> dict[str, str]:
        return {"verb": self.verb, "unit": self.unit}


MAX_DIFF = 64 * 1024  # of a plan's diff, kept in the job and shown: a huge file is said, not copied


def _diff(path: str, old: str, new: str) -> str:
    import difflib  # here: a plan's diff is rare, and rastosd's start imports this module

    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a{path}", f"b{path}", n=1
    )
    text = "".join(lines)
    if len(text) <= MAX_DIFF:
        return text
    return text[:MAX_DIFF] + f"\n(diff cut at {MAX_DIFF} of its {len(text)} characters)\n"
