"""The host's btrfs layout for image updates, reached through the file system's top level:

    @                        the first deployment (a writable snapshot of @images/<first version>)
    @images/NAME             read-only: one per image version this host holds, the parent of a later
                             delta (found by its identity: the received UUID of one received as an
                             update, the own UUID of the one the host was installed from)
    @deployments/VERSION     the writable root of each version received as an update
    @deployments/VERSION@ID  the same, made by staging ID while an earlier deployment of the version
                             was still there: that one stays bootable until this one's entry is written
    @deployments/.incoming-ID  a deployment being made (removed at the next start if it was cut)

Only the root subvolume is mounted on a host, so the top level (subvolid=5) is mounted here, at
/run/rastos/top, in a mount namespace of the calling thread's own (unshare(CLONE_NEWNS) moves only
the calling thread, and the programs it starts): no other process sees the mount, and it goes with
the thread even if rastosd is killed. `top_level` therefore runs on a thread made for it.

A bundle's root stream is received straight into @images/: btrfs receive names the subvolume after
the stream and marks it complete (read-only, with its received UUID) only at its very end. The kernel
will not move a read-only subvolume to another directory (the move rewrites its ".."), and making it
writable for a move would leave the received UUID to the kernel's good will; so the mark itself tells
a complete image from one whose receive was cut, and anything in @images without it is removed. (The
image a host was installed from was never received: read-only, with no received UUID, it is whole.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import btrfsutil

from daemon.errors import UpdateFailed, UpdateNoSpace, UpdatesUnavailable
from daemon.updates.source import Cancelled
from rastos.process import start

if TYPE_CHECKING:
    from rastos.bundle import Bundle

log = logging.getLogger("rastosd.updates")

TOP = Path("/run/rastos/top")
IMAGES, DEPLOYMENTS = "@images", "@deployments"
INCOMING = ".incoming-"
GENERATION = "@"  # a version never holds one (rastos/bundle.py's VERSION)
ROOT_STREAM = "root.btrfs.zst"
CLONE_NEWNS = 0x00020000
MS_REC, MS_SLAVE = 0x4000, 0x80000
MNT_DETACH = 2
T = TypeVar("T")


def btrfs_device(path: Path) -> str:
    """The device of the btrfs file system `path` is on, from this thread's mount table."""
    target = os.path.realpath(path)
    found: tuple[str, str, str] | None = None
    for line in Path("/proc/thread-self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        mount_point = _unescape(fields[0].split()[4])
        kind, source = fields[1].split()[:2]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (found is None or len(mount_point) >= len(found[0])):
            found = (mount_point, kind, _unescape(source))  # a later mount on the same point hides an earlier one
    if found is None or found[1] != "btrfs":
        raise UpdatesUnavailable(f"{path} is not on a btrfs file system: this host cannot take image updates")
    return found[2]


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", errors="surrogateescape")


def _libc_call(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


@contextlib.contextmanager
def top_level(root: Path) -> Iterator[Path]:
    """The top level of `root`'s btrfs, mounted at TOP in this thread's own mount namespace (made
    here: call it on a thread of its own, which keeps that namespace until it ends)."""
    device = btrfs_device(root)
    libc = ctypes.CDLL(None, use_errno=True)
    _libc_call(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # A slave of the host's mounts: what is mounted here never propagates back to the host.
    _libc_call(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    TOP.mkdir(mode=0o700, parents=True, exist_ok=True)
    mount_point = os.fsencode(TOP)
    _libc_call(libc.mount(os.fsencode(device), mount_point, b"btrfs", 0, b"subvolid=5"), f"mount {device} {TOP}")
    try:
        yield TOP
    finally:
        _libc_call(libc.umount2(mount_point, MNT_DETACH), f"umount {TOP}")


def on_own_thread(function: Callable[[], T], name: str) -> T:
    """`function`'s result, run on a new thread (one that may take a mount namespace of its own)."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as error:
            outcome.append((False, error))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def identity(path: Path) -> str | None:
    """The image's identity: the received UUID of a complete, read-only received subvolume, or the own
    UUID of a read-only one never received (the image the host was installed from: the builder made
    its root there and sent the version's streams from it); else None. btrfs receive sets the received
    UUID before the read-only flag, so a cut receive is never read-only; and it finds a delta's parent
    the same two ways."""
    try:
        if not btrfsutil.is_subvolume(path) or not btrfsutil.get_subvolume_read_only(path):
            return None
        info = btrfsutil.subvolume_info(path)
    except btrfsutil.BtrfsUtilError:
        return None
    return str(uuid.UUID(bytes=info.received_uuid if info.received_uuid != bytes(16) else info.uuid))


def deployment_version(name: str) -> str:
    """The version a deployment's name (`VERSION` or `VERSION@ID`) is of."""
    return name.split(GENERATION, 1)[0]


def version_deployed(subvolume: str) -> str | None:
    """The version a subvolume (named from the top) is an update deployment of; None for any other."""
    name = subvolume.removeprefix(f"{DEPLOYMENTS}/")
    return None if name == subvolume or "/" in name else deployment_version(name)


def generation(name: str) -> int:
    """Which of a version's deployments was made last: `VERSION` (0) first, then by staging id."""
    _, _, made_by = name.partition(GENERATION)
    return int(made_by) if made_by.isdigit() else 0


def delete_subvolume(path: Path) -> None:
    """The subvolume and any nested in it (systemd makes some inside a root); a plain directory too."""
    if not path.exists():
        return
    if btrfsutil.is_subvolume(path):
        btrfsutil.delete_subvolume(path, recursive=True)
    else:
        shutil.rmtree(path)


@dataclass(frozen=True)
class HostLayout:
    top: Path

    @property
    def images(self) -> Path:
        return self.top / IMAGES

    @property
    def deployments(self) -> Path:
        return self.top / DEPLOYMENTS

    def ensure(self) -> None:
        for directory in (self.images, self.deployments):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)

    def subvolume(self, path: Path) -> str:
        """The path as rootflags=subvol= and BootState name it: from the top of the file system."""
        return str(path.relative_to(self.top))

    def deployment(self, name: str) -> Path:
        return self.deployments / name

    def deployments_of(self, version: str) -> list[Path]:
        """The deployments of the version, the one made last at the end."""
        names = [name for name in self.deployment_names() if deployment_version(name) == version]
        return [self.deployment(name) for name in sorted(names, key=generation)]

    def new_deployment_name(self, version: str, update_id: int) -> str:
        """`VERSION`, or `VERSION@ID` while an earlier deployment of the version is there: that one
        keeps its name, and so its entry, until the new one can boot in its stead."""
        return f"{version}{GENERATION}{update_id}" if self.deployments_of(version) else version

    def find_image(self, wanted: str) -> Path | None:
        """The image in @images whose identity (received UUID) is `wanted`. (Its children only: a
        SubvolumeIterator would walk every subvolume of the file system, snapshots and all.)"""
        if not self.images.is_dir():
            return None
        for candidate in sorted(self.images.iterdir()):
            if identity(candidate) == wanted:
                return candidate
        return None

    # Receiving

    def receive(self, bundle: Bundle, cancelled: threading.Event, progress: Callable[[int, int], None]) -> Path:
        """`btrfs receive` of the bundle's root stream (checked against its sha256 as it is read) into
        @images/NAME. Whatever it made is deleted again if it fails or is cancelled."""
        manifest = bundle.manifest
        target = self.images / manifest.subvolume_name
        if target.exists() or target.is_symlink():
            if identity(target) is not None:
                raise UpdateFailed(
                    f"{IMAGES}/{manifest.subvolume_name} holds another image (identity {identity(target)}); "
                    f"version {manifest.version} has {manifest.subvolume_uuid}",
                    hint="remove the other image if it is not in use, or build the version under another name",
                )
            delete_subvolume(target)  # an earlier receive that was cut: never complete
        total = bundle.offsets[ROOT_STREAM][1]
        with tempfile.TemporaryFile() as output:
            try:
                self._receive(bundle, output, cancelled, lambda done: progress(done, total))
                if identity(target) != manifest.subvolume_uuid:
                    raise UpdateFailed(f"btrfs receive made no complete image {IMAGES}/{manifest.subvolume_name}")
                btrfsutil.sync(target)
            except BaseException as error:
                with contextlib.suppress(OSError, btrfsutil.BtrfsUtilError):
                    delete_subvolume(target)
                raise _receive_error(error, output) from None
        log.info("received %s/%s (version %s)", IMAGES, manifest.subvolume_name, manifest.version)
        return target

    def _receive(
        self, bundle: Bundle, output: IO[bytes], cancelled: threading.Event, progress: Callable[[int], None]
    ) -> None:
        # --chroot: the stream, however made, can only reach what is under @images.
        zstd = start(["zstd", "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=output)
        receive = start(["btrfs", "receive", "--chroot", self.images], stdin=zstd.stdout, stdout=output, stderr=output)
        assert zstd.stdin is not None and zstd.stdout is not None
        zstd.stdout.close()  # btrfs holds it now; zstd sees a closed pipe if btrfs ends early
        try:
            done = 0
            try:
                for chunk in bundle.chunks(ROOT_STREAM):
                    if cancelled.is_set():
                        raise Cancelled
                    zstd.stdin.write(chunk)
                    done += len(chunk)
                    progress(done)
                zstd.stdin.close()
            except BrokenPipeError:
                pass  # btrfs or zstd gave up: their status and output say why
            if zstd.wait() != 0 or receive.wait() != 0:
                raise UpdateFailed(f"btrfs receive failed (zstd {zstd.returncode}, btrfs {receive.returncode})")
        finally:
            for process in (zstd, receive):
                if process.poll() is None:
                    process.kill()
                process.wait()
            with contextlib.suppress(BrokenPipeError):
                zstd.stdin.close()

    # Deployments

    def make_deployment(self, image: Path, update_id: int) -> Path:
        """A writable snapshot of the image, @deployments/.incoming-ID, to be readied and renamed."""
        incoming = self.deployments / f"{INCOMING}{update_id}"
        delete_subvolume(incoming)
        btrfsutil.create_snapshot(image, incoming, read_only=False)
        return incoming

    def place_deployment(self, incoming: Path, name: str) -> Path:
        """Rename the readied deployment to @deployments/NAME (a name no deployment has: an earlier
        one of the version is not touched here) and commit it before any entry names it."""
        target = self.deployment(name)
        if target.exists() or target.is_symlink():
            raise UpdateFailed(f"{DEPLOYMENTS}/{name} exists already")
        incoming.rename(target)
        btrfsutil.sync(target)
        return target

    # What a cut left

    def leftovers(self, running: str) -> list[tuple[Path, str]]:
        """Subvolumes a cut staging left: images never completed, deployments never readied."""
        found = []
        if self.images.is_dir():
            for path in sorted(self.images.iterdir()):
                if identity(path) is None:
                    found.append((path, "an image whose receive was cut short"))
        if self.deployments.is_dir():
            for path in sorted(self.deployments.glob(f"{INCOMING}*")):
                if self.subvolume(path) != running:
                    found.append((path, "a deployment whose staging was cut short"))
        return found

    def deployment_names(self) -> list[str]:
        if not self.deployments.is_dir():
            return []
        return sorted(path.name for path in self.deployments.iterdir() if not path.name.startswith(INCOMING))


def _receive_error(error: BaseException, output: IO[bytes]) -> BaseException:
    """The error to raise for a failed receive: running out of space gets its own, and a failure of
    btrfs's own says what btrfs said."""
    output.seek(0)
    said = output.read()[-4000:].decode("utf-8", errors="replace").strip()
    if "No space left on device" in said or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return UpdateNoSpace(f"the file system ran out of space while the image was received: {_last_line(said)}")
    if isinstance(error, UpdateFailed) and said:
        return UpdateFailed(f"{error}: {_last_line(said)}")
    return error


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line]
    return (errors or lines or [""])[-1][:500]
