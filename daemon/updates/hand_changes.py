"""Hand changes: what differs under /etc between the running root and the image it was made from, and
that an update neither carries nor re-applies, so the new deployment would not have it.

A path is reported when the running root and the pristine image differ in it (presence, kind, content,
link target, mode, owner), the new tree after carrying and re-applying does not already match the
running root, and it is neither written by a re-applied op, nor carried, nor volatile (a file the
system itself rewrites). Nothing is merged: the admin decides.

The report is shown to any caller (GetStatus is cheap for all), so it shows content only of a small
text file that every user may read on both sides (the file world-readable, every directory on the way
world-searchable); of any other file (sudoers, shadow, keys) only the name and what kind of change.
"""

from __future__ import annotations

import difflib
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ops.errors import UnsafePath
from ops.rootfs import Root

TOP = "/etc"
MAX_ENTRIES = 200
MAX_DIFF_TEXT = 64 * 1024  # characters of diff in the whole report
MAX_DIFF_FILE = 32 * 1024  # a bigger file is named, never diffed
VOLATILE = frozenset({
    "/etc/machine-id", "/etc/adjtime", "/etc/resolv.conf", "/etc/ld.so.cache", "/etc/.pwd.lock", "/etc/.updated",
    "/etc/mtab", "/etc/passwd-", "/etc/shadow-", "/etc/group-", "/etc/gshadow-", "/etc/subuid-", "/etc/subgid-",
})  # fmt: skip
VOLATILE_PATTERN = re.compile(r"^/etc/ssh/ssh_host_[a-z0-9]+_key(\.pub)?$")
ACCOUNT_FILES = {"/etc/passwd": "accounts", "/etc/group": "groups"}


@dataclass(frozen=True)
class Seen:
    """One path as a tree has it."""

    kind: str  # file, directory, link, other, missing
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0


def volatile(path: str) -> bool:
    return path in VOLATILE or bool(VOLATILE_PATTERN.match(path))


def hand_changes(running: Root, pristine: Root, new: Root, skip: set[str]) -> tuple[list[dict[str, Any]], int]:
    """[{path, change, kind, detail?, diff?, content?}], and how many more were not listed."""
    report = _Report()
    for path in _walk(running, pristine, TOP):
        if path in skip or volatile(path):
            continue
        before, now = _seen(pristine, path), _seen(running, path)
        change = _change(pristine, running, path, before, now)
        if change is None or _same(running, new, path, now, _seen(new, path)):
            continue
        report.add(pristine, running, path, before, now, change)
    for path, what in ACCOUNT_FILES.items():
        lost = _lost_names(running, pristine, new, path)
        if lost:
            report.note(path, f"{what} made by hand that the new deployment lacks: {', '.join(lost)}")
    return report.entries, report.truncated


def _walk(running: Root, pristine: Root, directory: str) -> Iterator[str]:
    """Every path under `directory` in either tree, parents before children; links are not entered."""
    names = set()
    for root in (running, pristine):
        if _seen(root, directory).kind == "directory":
            names.update(root.names(directory))
    for name in sorted(names):
        path = f"{directory}/{name}"
        yield path
        if "directory" in (_seen(running, path).kind, _seen(pristine, path).kind):
            yield from _walk(running, pristine, path)


def _seen(root: Root, path: str) -> Seen:
    try:
        status = root.lstat(path)
    except UnsafePath:  # a link on the way: the path is not there as such
        return Seen("missing")
    if status is None:
        return Seen("missing")
    mode = status.st_mode
    kinds = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "link"))
    kind = next((name for test, name in kinds if test(mode)), "other")
    return Seen(kind, stat.S_IMODE(mode), status.st_uid, status.st_gid, status.st_size)


def _content(root: Root, path: str, seen: Seen) -> bytes | str | None:
    """A file's bytes or a link's target; None for anything else or what cannot be read safely."""
    try:
        if seen.kind == "file":
            return root.read_bytes(path)
        if seen.kind == "link":
            return root.readlink(path)
    except (UnsafePath, OSError):
        return None
    return None


def _change(pristine: Root, running: Root, path: str, before: Seen, now: Seen) -> str | None:
    if before.kind == "missing" and now.kind == "missing":
        return None
    if before.kind == "missing":
        return "added"
    if now.kind == "missing":
        return "removed"
    if before.kind != now.kind or _content_differs(pristine, running, path, before, now):
        return "modified"
    if before.mode != now.mode and now.kind != "link":
        return "mode"
    if (before.uid, before.gid) != (now.uid, now.gid):
        return "owner"
    return None


def _content_differs(first: Root, second: Root, path: str, a: Seen, b: Seen) -> bool:
    if a.kind not in ("file", "link"):
        return False
    if a.kind == "file" and a.size != b.size:
        return True
    return _content(first, path, a) != _content(second, path, b)


def _same(running: Root, new: Root, path: str, now: Seen, there: Seen) -> bool:
    """The new tree has the path exactly as the running root does: nothing would be lost."""
    if now.kind != there.kind:
        return False
    if now.kind == "missing":
        return True
    if (now.mode, now.uid, now.gid) != (there.mode, there.uid, there.gid) and now.kind != "link":
        return False
    return not _content_differs(running, new, path, now, there)


def _lost_names(running: Root, pristine: Root, new: Root, path: str) -> list[str]:
    """Names in the running root's account file that neither the image had nor the new tree has."""
    had, has = _names(pristine, path), _names(new, path)
    return sorted(name for name in _names(running, path) if name not in had and name not in has)


def _names(root: Root, path: str) -> set[str]:
    try:
        text = root.read_text(path) or ""
    except UnsafePath:
        return set()
    return {line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


class _Report:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.truncated = 0
        self.diff_left = MAX_DIFF_TEXT

    def add(self, pristine: Root, running: Root, path: str, before: Seen, now: Seen, change: str) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            self.truncated += 1
            return
        kind = now.kind if now.kind != "missing" else before.kind
        entry: dict[str, Any] = {"path": path, "change": change, "kind": kind}
        detail = _detail(before, now)
        if detail:
            entry["detail"] = detail
        if change in ("added", "removed", "modified") and "file" in (before.kind, now.kind):
            self._diff(entry, pristine, running, path, before, now)
        self.entries.append(entry)

    def note(self, path: str, detail: str) -> None:
        for entry in self.entries:
            if entry["path"] == path:
                entry["detail"] = "; ".join(filter(None, (entry.get("detail"), detail)))
                return
        if len(self.entries) >= MAX_ENTRIES:
            self.truncated += 1
            return
        self.entries.append({"path": path, "change": "modified", "kind": "file", "detail": detail})

    def _diff(self, entry: dict[str, Any], pristine: Root, running: Root, path: str, before: Seen, now: Seen) -> None:
        old, new = _shown_text(pristine, path, before), _shown_text(running, path, now)
        if old is None or new is None:
            entry["content"] = "not shown: not a small text file every user may read"
            return
        lines = difflib.unified_diff(
            old.splitlines(), new.splitlines(), "/dev/null" if before.kind == "missing" else f"a{path}",
            "/dev/null" if now.kind == "missing" else f"b{path}", lineterm="",
        )  # fmt: skip
        diff = "\n".join(lines) + "\n"
        if len(diff) > self.diff_left:
            entry["content"] = f"not shown: the report's {MAX_DIFF_TEXT // 1024} KiB of diff text are used up"
            return
        self.diff_left -= len(diff)
        entry["diff"] = diff


def _detail(before: Seen, now: Seen) -> str:
    parts = []
    if "missing" not in (before.kind, now.kind) and before.kind != now.kind:
        parts.append(f"{before.kind} -> {now.kind}")
    elif "missing" not in (before.kind, now.kind) and now.kind != "link":
        if before.mode != now.mode:
            parts.append(f"mode {before.mode:04o} -> {now.mode:04o}")
        if (before.uid, before.gid) != (now.uid, now.gid):
            parts.append(f"owner {before.uid}:{before.gid} -> {now.uid}:{now.gid}")
    return ", ".join(parts)


def _shown_text(root: Root, path: str, seen: Seen) -> str | None:
    """The file's text if every user may read it and it is small text; "" for a missing side."""
    if seen.kind == "missing":
        return ""
    if seen.kind != "file" or seen.size > MAX_DIFF_FILE or not seen.mode & stat.S_IROTH:
        return None
    if not _searchable_by_all(root, path.rsplit("/", 1)[0]):
        return None
    content = _content(root, path, seen)
    if not isinstance(content, bytes) or b"\0" in content:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _searchable_by_all(root: Root, directory: str) -> bool:
    parts = directory.strip("/").split("/")
    for end in range(1, len(parts) + 1):
        seen = _seen(root, "/" + "/".join(parts[:end]))
        if seen.kind != "directory" or not seen.mode & stat.S_IXOTH:
            return False
    return True
