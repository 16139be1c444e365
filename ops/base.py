"""What an op is, and the one executor that carries out every op's plan.

An op reads facts from its target root, turns facts and params into a plan (a list of actions; pure,
so planning is tested from data), and the executor here applies exactly that plan. `verify` reads the
facts again afterwards. An op whose plan is empty reports "unchanged": that is what makes a second
apply idempotent, and it is checked for every op by the tests.

Ops act on a `Target`: a root directory. On the live system it is `/` and actions with a runtime side
(the kernel's host name, /proc/sys, a service reload) take effect at once; aimed at a scratch root they
only write files. A *simulated* target is a throwaway copy-on-write view of a live one (shadow.py): a
dry run applies its steps there, so each step is planned against what the earlier ones would leave;
runtime actions are planned as on the live system but never carried out.
"""

from __future__ import annotations

import difflib
import os
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ops.errors import UnsafePath
from ops.params import Params, Schema
from ops.rootfs import Links, Root
from rastos.process import run

Output = Callable[[str], None]
SYSTEMD_RUNNING = Path("/run/systemd/system")  # what sd_booted() looks for


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
        result = run(argv, capture=True)
        for line in result.stdout.splitlines():
            output(line)
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


@dataclass(frozen=True)
class Plan:
    op: str
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> list[Change]:
        return [action.describe() for action in self.actions]

    @property
    def paths(self) -> list[str]:
        return sorted({path for action in self.actions for path in action.paths})

    def as_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "changed": bool(self.actions),
            "changes": [change.as_json() for change in self.changes],
        }


class Op(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    schema: ClassVar[Schema]
    after: ClassVar[tuple[str, ...]] = ()  # ops a pipeline must run before this one (order.py)
    # A change that can cut the host off (firewall, network, ssh): it must be confirmed within its
    # `confirm_timeout` param, or the daemon puts the old files back and runs `revert_actions` (confirm.py).
    risky: ClassVar[bool] = False

    def revert_actions(self) -> tuple[Action, ...]:
        """What makes the running system read the restored files again (a reload)."""
        return ()

    @abstractmethod
    def plan(self, target: Target, params: Params) -> Plan:
        """What apply would do now. Reads the target, changes nothing."""

    def check(self, target: Target, params: Params) -> None:
        """Checks that need the target (a kernel parameter exists); raise InvalidParams. Changes nothing."""
        del target, params  # most ops need nothing beyond their schema

    def verify(self, target: Target, params: Params) -> list[str]:
        """Problems left after apply; by default, anything a fresh plan still wants to change."""
        return [f"{change.subject}: still needs {change.action}" for change in self.plan(target, params).changes]


class FollowUpLog(Protocol):
    """Where the executor records follow-ups before it writes, and marks them done (the state store)."""

    def add_follow_ups(self, follow_ups: Sequence[FollowUp]) -> list[int]: ...
    def before_follow_ups(self) -> None: ...
    def finish_follow_up(self, follow_up_id: int, outcome: str) -> None: ...


def execute(plan: Plan, target: Target, output: Output, follow_ups: FollowUpLog | None = None) -> None:
    """Carry out exactly the plan's actions, in order, then its follow-ups (each service once).
    Runtime actions are skipped unless the target is the running system and not a shadow."""
    owed = list(dict.fromkeys(a for a in plan.actions if isinstance(a, FollowUp))) if target.acts_at_runtime else []
    ids = follow_ups.add_follow_ups(owed) if follow_ups is not None and owed else [0] * len(owed)
    for action in plan.actions:
        if isinstance(action, FollowUp) or (action.runtime and not target.acts_at_runtime):
            continue
        # Programs (useradd, update-ca-certificates, systemctl) open what they change by path and
        # follow links: no link may be on the way to, or in place of, any file an action changes.
        for path in action.paths:
            kind = target.files.kind(path)  # a link on the way is refused here
            if kind == "link" and not (isinstance(action, RunCommand) and action.makes_links):
                raise UnsafePath(path, "is a symbolic link, which rastosd does not follow")
        action.execute(target, output)
    if follow_ups is not None and owed:
        follow_ups.before_follow_ups()
    for follow_up_id, follow_up in zip(ids, owed, strict=True):
        try:
            outcome = follow_up.run(output)
        except Exception as error:
            if follow_ups is not None:
                follow_ups.finish_follow_up(follow_up_id, f"failed: {error}")
            raise
        output(f"{follow_up.verb} {follow_up.unit}: {outcome}")
        if follow_ups is not None:
            follow_ups.finish_follow_up(follow_up_id, outcome)


def write_atomically(path: Path, content: str, mode: int, uid: int, gid: int) -> None:
    """Write through a temporary file in the same directory, fsync, rename: never a half-written file."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fchown(handle.fileno(), uid, gid)
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # Durable only once the rename is on disk too (a power cut may follow at once). The file itself
    # again first: on vfat (the ESP) a rename over an existing file moves the new file's directory
    # entry only when its inode is written back, while the replaced file's clusters are freed at
    # once; fsyncing just the directory left the entry pointing at freed clusters (a power-cut test
    # found it: "Fat problem while decoding").
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        descriptor = os.open(target, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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


def file_action(target: Target, path: str, content: str, *, mode: int = 0o644, owner: str = "root") -> list[Action]:
    """A write only when the file differs in content or mode: the building block of idempotent ops."""
    old = target.read_text(path)
    status = target.files.lstat(path) if old is not None else None
    old_mode = status.st_mode & 0o7777 if status is not None else None
    if old == content and old_mode == mode:
        return []
    return [WriteFile(path, content, old, mode, owner, old_mode)]


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


def _diff(path: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a{path}", f"b{path}", n=1
    )
    return "".join(lines)


def joined(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "none"
