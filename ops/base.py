"""What an op is, and the one executor that carries out every op's plan.

An op reads facts from its target root (target.py), turns facts and params into a plan (a list of
actions, actions.py; pure, so planning is tested from data), and the executor here applies exactly
that plan. `verify` reads the facts again afterwards. An op whose plan is empty reports "unchanged":
that is what makes a second apply idempotent, and it is checked for every op by the tests.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ops.actions import Action, Change, FollowUp, Output, RunCommand, WriteFile
from ops.errors import UnsafePath
from ops.params import Params, Schema
from ops.target import Target


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


def file_action(target: Target, path: str, content: str, *, mode: int = 0o644, owner: str = "root") -> list[Action]:
    """A write only when the file differs in content or mode: the building block of idempotent ops."""
    old = target.read_text(path)
    status = target.files.lstat(path) if old is not None else None
    old_mode = status.st_mode & 0o7777 if status is not None else None
    if old == content and old_mode == mode:
        return []
    return [WriteFile(path, content, old, mode, owner, old_mode)]


def joined(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "none"
