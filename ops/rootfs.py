"""File access inside a target root that never follows a link it did not make.

rastosd runs as root and reads and writes files whose directories other users own (a home, its
.ssh). A path string handed to open() is resolved by the kernel at that moment, through any symlink
on the way: a user who links `~/.ssh` to /root/.ssh, or `~/.ssh/authorized_keys` to /etc/shadow, gets
root to write or read the link's target. So no op touches a file by path. Every access here descends
from the root one component at a time, each `openat` relative to the directory opened before it with
`O_NOFOLLOW`: a symlink anywhere on the way, or in place of the file itself, is refused with an error
naming the path and the link, and a link swapped in between two steps is refused by the kernel, not
followed (the check and the use are the same system call).

Files are written through a new name in the same (already opened) directory and renamed over the old
one, so a hard link or symlink in the file's place is replaced, never written through. Reads take
regular files only (a FIFO would block the daemon, a device could be endless), at most `MAX_READ`
bytes, and refuse a file with several hard links in a directory that root does not own (a user cannot
then show root a copy of a file they cannot read).

Distributions do make links in their own directories (/etc/os-release, /etc/sysctl.d/99-sysctl.conf,
/sbin). Reads that must see through them say so with `links=SYSTEM`: a link is then followed only when
root owns it and the directory it sits in, and it is resolved inside the target's root (an absolute
link means the target's path, never the host's), as `openat2(RESOLVE_IN_ROOT)` would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextvars import ContextVar
from enum import Enum
from pathlib import Path, PurePosixPath

from ops.errors import UnsafePath

MAX_READ = 16 * 1024 * 1024  # no file an op reads is near this; a bigger one is refused, not loaded
MAX_LINK_HOPS = 40  # as the kernel's own limit

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Links(Enum):
    NONE = "none"  # any symlink on the way is refused
    SYSTEM = "system"  # root's own links in root's own directories are followed, inside the root


# Tests set a list here to learn every path an op touches (and plant links there).
touched: ContextVar[list[str] | None] = ContextVar("touched", default=None)


def _note(absolute: str) -> None:
    seen = touched.get()
    if seen is not None:
        seen.append(absolute)


def parts_of(absolute: str) -> list[str]:
    """The components of an absolute path in the target; `..`, `.` and empty ones are refused."""
    if not absolute.startswith("/"):
        raise UnsafePath(absolute, "not an absolute path")
    parts = absolute.split("/")[1:] if absolute != "/" else []
    if any(part in ("", ".", "..") for part in parts) or "\0" in absolute:
        raise UnsafePath(absolute, "holds an empty, '.' or '..' component")
    return parts


def _refuse_link(absolute: str, where: str) -> UnsafePath:
    place = "is a symbolic link" if where == absolute else f"leads through a symbolic link, {where}"
    return UnsafePath(absolute, f"{place}, which rastosd does not follow")


def _open_file(parent: int, name: str, absolute: str) -> int:
    """The file `name` in the open directory, never through a link in its place (never blocking on a
    FIFO either: O_NONBLOCK); FileNotFoundError when it is missing."""
    try:
        return os.open(name, READ_FLAGS, dir_fd=parent)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _refuse_link(absolute, absolute) from None
        raise


class Root:
    """The target's root directory: every method takes an absolute path as the target sees it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # Descending

    @contextlib.contextmanager
    def directory(self, absolute: str, *, create: bool = False, links: Links = Links.NONE) -> Iterator[int]:
        """An open descriptor of the directory `absolute`, reached without following links.
        With `create`, missing directories are made (mode 0755, root's)."""
        _note(absolute)
        fd = self._descend(absolute, parts_of(absolute), create, links)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def parent(self, absolute: str, *, create: bool = False, links: Links = Links.NONE) -> Iterator[tuple[int, str]]:
        """The open directory that holds `absolute`, and the file's name in it."""
        _note(absolute)
        parts = parts_of(absolute)
        if not parts:
            raise UnsafePath(absolute, "is the root itself, not a file")
        if links is Links.SYSTEM:
            parts = self._resolved(absolute, parts)
        fd = self._descend(absolute, parts[:-1], create, Links.NONE)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _descend(self, absolute: str, parts: list[str], create: bool, links: Links) -> int:
        if links is Links.SYSTEM:
            parts = self._resolved(absolute, parts)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for index, part in enumerate(parts):
                try:
                    child = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = self._open_directory(fd, part, absolute, parts, index)
                except OSError as error:
                    if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    raise self._not_a_directory(fd, part, absolute, parts, index) from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_directory(self, fd: int, part: str, absolute: str, parts: list[str], index: int) -> int:
        try:
            return os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise self._not_a_directory(fd, part, absolute, parts, index) from None

    @staticmethod
    def _not_a_directory(fd: int, part: str, absolute: str, parts: list[str], index: int) -> UnsafePath:
        where = "/" + "/".join(parts[: index + 1])
        if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
            return _refuse_link(absolute, where)
        return UnsafePath(absolute, f"{where} is not a directory")

    def _resolved(self, absolute: str, parts: list[str]) -> list[str]:
        """`parts` with root's own links followed inside the root; any other link is refused."""
        pending, done, hops = list(parts), list[str](), 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            status = self._lstat_parts([*done, part], absolute)  # missing: FileNotFoundError, as open's
            if not stat.S_ISLNK(status.st_mode):
                done.append(part)
                continue
            where = "/" + "/".join([*done, part])
            directory = self._lstat_parts(done, absolute) if done else os.lstat(self.root)
            if status.st_uid != 0 or directory.st_uid != 0 or directory.st_mode & 0o022:
                raise UnsafePath(absolute, f"leads through {where}, a symbolic link root did not make")
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise UnsafePath(absolute, f"{where}: too many levels of links")
            with self.directory("/" + "/".join(done)) as fd:
                link = PurePosixPath(os.readlink(part, dir_fd=fd))
            pending = list(link.parts[1:] if link.is_absolute() else link.parts) + pending
            done = [] if link.is_absolute() else done
        return done

    def resolve(self, absolute: str) -> str:
        """`absolute` with root's own links followed inside the root (a missing part ends it there);
        a link anyone else made is refused (UnsafePath)."""
        parts = parts_of(absolute)
        for end in range(len(parts), 0, -1):
            try:
                return "/" + "/".join(self._resolved(absolute, parts[:end]) + parts[end:])
            except FileNotFoundError:
                continue
        return "/" + "/".join(parts)

    def _lstat_parts(self, parts: list[str], absolute: str) -> os.stat_result:
        fd = self._descend(absolute, parts[:-1], False, Links.NONE)
        try:
            return os.lstat(parts[-1], dir_fd=fd)
        finally:
            os.close(fd)

    # Reading

    def lstat(self, absolute: str) -> os.stat_result | None:
        """The entry itself (a link is not followed); None when it or a directory above is missing."""
        try:
            with self.parent(absolute) as (fd, name):
                return os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return None

    def kind(self, absolute: str, *, links: Links = Links.NONE) -> str | None:
        """ "file", "directory", "link" or "other" (a link only with links=NONE); None when missing."""
        try:
            with self.parent(absolute, links=links) as (fd, name):
                mode = os.lstat(name, dir_fd=fd).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISREG(mode):
            return "file"
        if stat.S_ISDIR(mode):
            return "directory"
        return "link" if stat.S_ISLNK(mode) else "other"

    def read_bytes(self, absolute: str, *, links: Links = Links.NONE, limit: int = MAX_READ) -> bytes | None:
        """A regular file's content; None when it is missing."""
        try:
            with self.parent(absolute, links=links) as (parent, name):
                fd = _open_file(parent, name, absolute)
                directory_owner = os.fstat(parent).st_uid
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise UnsafePath(absolute, "is not a regular file")
            if status.st_nlink > 1 and directory_owner != 0:
                raise UnsafePath(absolute, f"has {status.st_nlink} hard links in a directory root does not own")
            content = handle.read(limit + 1)
        if len(content) > limit:
            raise UnsafePath(absolute, f"is larger than {limit} bytes")
        return content

    def open_regular(self, absolute: str) -> int:
        """A descriptor (read-only) of the regular file `absolute`, reached without following a link,
        under the rules of `read_bytes`, for a file too big to read whole (an update bundle): the
        caller reads it through the descriptor, so a file swapped in at that path later is not it.
        FileNotFoundError when it is missing."""
        with self.parent(absolute) as (parent, name):
            fd = _open_file(parent, name, absolute)
            directory_owner = os.fstat(parent).st_uid
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise UnsafePath(absolute, "is not a regular file")
            if status.st_nlink > 1 and directory_owner != 0:
                raise UnsafePath(absolute, f"has {status.st_nlink} hard links in a directory root does not own")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_text(self, absolute: str, *, links: Links = Links.NONE) -> str | None:
        content = self.read_bytes(absolute, links=links)
        # Bytes that are not UTF-8 become U+FFFD: the text differs from any wanted one (so it is
        # rewritten) and stays encodable for a D-Bus reply.
        return None if content is None else content.decode("utf-8", errors="replace")

    def names(self, absolute: str, *, links: Links = Links.NONE) -> list[str]:
        """The names in a directory, sorted; [] when it is missing."""
        try:
            with self.directory(absolute, links=links) as fd:
                return sorted(os.listdir(fd))  # noqa: PTH208  (a descriptor: pathlib takes none)
        except FileNotFoundError:
            return []

    def readlink(self, absolute: str) -> str | None:
        """Where a link points (the link itself is not followed); None when it is missing or no link."""
        try:
            with self.parent(absolute) as (fd, name):
                if not stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
                    return None
                return os.readlink(name, dir_fd=fd)
        except FileNotFoundError:
            return None

    # Writing

    def write(
        self, absolute: str, content: str | bytes, mode: int, uid: int = 0, gid: int = 0, *, mtime_ns: int | None = None
    ) -> None:
        """Put `content` in place atomically: a new file in the same directory, fsynced, renamed over
        the old name (what was there, a link too, is replaced, not written through). Missing parent
        directories are made, root's."""
        data = content.encode() if isinstance(content, str) else content
        with self.parent(absolute, create=True) as (parent, name):
            temporary = f".{name}.{secrets.token_hex(6)}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)  # fmt: skip
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                    if mtime_ns is not None:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                    os.fsync(fd)
                    os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
                    # Durable once the rename is on disk too (a power cut may follow at once). The file
                    # again first: on vfat (the ESP) a rename over an existing file moves the new file's
                    # directory entry only when its inode is written back, while the replaced file's
                    # clusters are freed at once; fsyncing just the directory left the entry pointing at
                    # freed clusters.
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=parent)
                raise
            os.fsync(parent)

    def make_directory(self, absolute: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        """The directory (its parents made root's, 0755 where missing), owned and moded as asked."""
        with self.parent(absolute, create=True) as (parent, name):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = self._open_directory(parent, name, absolute, parts_of(absolute), len(parts_of(absolute)) - 1)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def set_owner_and_mode(self, absolute: str, mode: int, uid: int, gid: int) -> None:
        with self.parent(absolute) as (parent, name):
            fd = _open_file(parent, name, absolute)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UnsafePath(absolute, "is not a regular file")
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def remove(self, absolute: str) -> bool:
        """Remove a file (a link is refused: it is not ours to remove); False when it was missing."""
        try:
            with self.parent(absolute) as (parent, name):
                if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
                    raise _refuse_link(absolute, absolute)
                os.unlink(name, dir_fd=parent)
                os.fsync(parent)
                return True
        except FileNotFoundError:
            return False

    def remove_link(self, absolute: str) -> None:
        """Remove a link itself (one an op made, as systemctl enable does); nothing else."""
        with self.parent(absolute) as (parent, name):
            if not stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
                raise UnsafePath(absolute, "is not a symbolic link")
            os.unlink(name, dir_fd=parent)

    def remove_tree(self, absolute: str) -> None:
        """A directory and everything in it; links inside are removed, never followed."""
        with contextlib.suppress(FileNotFoundError), self.parent(absolute) as (parent, name):
            shutil.rmtree(name, dir_fd=parent)

    def symlink(self, absolute: str, points_to: str) -> None:
        """Make a link (what systemctl enable makes), replacing a file or link of that name."""
        with self.parent(absolute, create=True) as (parent, name):
            temporary = f".{name}.{secrets.token_hex(6)}"
            os.symlink(points_to, temporary, dir_fd=parent)
            os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)

    @contextlib.contextmanager
    def scratch_directory(self, absolute_parent: str, prefix: str) -> Iterator[str]:
        """A new directory (0700, root's) in `absolute_parent` for a program's check; removed after.
        Yields its path in the target."""
        with self.directory(absolute_parent) as parent:
            name = f"{prefix}{secrets.token_hex(6)}"
            os.mkdir(name, 0o700, dir_fd=parent)
            try:
                yield f"{absolute_parent.rstrip('/')}/{name}"
            finally:
                shutil.rmtree(name, dir_fd=parent, ignore_errors=True)
