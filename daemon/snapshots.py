"""Read-only btrfs snapshots of the root, with their metadata in the state store.

Layout, inside the snapshot subvolume the image builder mounts at /.snapshots (as snapper does):
    /.snapshots/N/snapshot     the read-only snapshot of the root subvolume
    /.snapshots/N/info.json    what it is, so a human or a rescue system can tell without the database
    /.snapshots/N/deployment   a writable copy made by a rollback: a root the boot loader can boot
    /.snapshots/N/deployment@G the copy a later rollback to N makes while the earlier one is there; the
                               earlier goes once the new one's entry is written (G counts up)
Each snapshot has a read-only boot menu entry, written with it and removed with it (see boot.py).
Other subvolumes (/home, /var/log, /var/lib/rastos) are separate and never part of a root snapshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import btrfsutil

from daemon.boot import BootEntries, readonly_entry_id, rollback_generation, snapshot_of_root
from daemon.errors import BootConfigError, InvalidParams, NoSuchSnapshot, SnapshotProtected, SnapshotsUnavailable
from daemon.failpoints import failpoint
from daemon.store import SnapshotRow, StateStore
from ops.rootfs import Root

log = logging.getLogger("rastosd.snapshots")

KINDS = ("pre", "post", "manual")
DEPLOYMENT = "deployment"
MAX_DESCRIPTION = 200


def check_description(description: str) -> None:
    """A manual snapshot's description, as Snapshots.Create and the hub's `action` frame take it: it
    is a boot menu entry's title too, so one short printable line."""
    if not 1 <= len(description) <= MAX_DESCRIPTION:
        raise InvalidParams("description", f"must be 1 to {MAX_DESCRIPTION} characters, got {len(description)}")
    if not description.isprintable():
        raise InvalidParams("description", "must be one line of printable characters")


@dataclass(frozen=True)
class SnapshotLayout:
    root: Path  # the root subvolume (/ on a host)
    directory: Path  # where snapshots live (/.snapshots)

    def snapshot(self, snapshot_id: int) -> Path:
        return self.directory / str(snapshot_id) / "snapshot"

    def deployments(self, snapshot_id: int) -> list[Path]:
        """The snapshot's rollback deployments, the one made last at the end."""
        found = [path for path in (self.directory / str(snapshot_id)).glob(f"{DEPLOYMENT}*") if _generation(path) >= 0]
        return sorted(found, key=_generation)

    def new_deployment(self, snapshot_id: int) -> Path:
        """N/deployment, or N/deployment@G while an earlier one is there (G past its): that one keeps
        its name, and so its entry, until the new one can boot in its stead."""
        earlier = self.deployments(snapshot_id)
        name = f"{DEPLOYMENT}@{_generation(earlier[-1]) + 1}" if earlier else DEPLOYMENT
        return self.directory / str(snapshot_id) / name


def _generation(deployment: Path) -> int:
    """Which of its snapshot's rollback deployments the path is, the later the greater; -1 for no
    deployment's name."""
    found = rollback_generation(f"{deployment.parent.name}/{deployment.name}")
    return -1 if found is None else found


class Snapshots:
    def __init__(
        self,
        layout: SnapshotLayout,
        store: StateStore,
        keep_pairs: int,
        entries: BootEntries | None = None,
    ) -> None:
        self.layout = layout
        self.store = store
        self.keep_pairs = keep_pairs
        self.entries = entries  # a snapshot's boot entries go with it
        self.running_root = ""  # whose boot entry new entries copy (kernel, initrd, options); set by the daemon
        self.refusal: str | None = None  # why no snapshot can be taken on this boot, if none can

    def check_available(self, *, root: bool = True) -> None:
        """Raise SnapshotsUnavailable unless the snapshot directory (and, with `root`, the root) is a
        btrfs subvolume."""
        if root and self.refusal is not None:
            raise SnapshotsUnavailable(self.refusal)
        checked = [(self.layout.directory, "snapshot directory")]
        if root:
            checked.insert(0, (self.layout.root, "root"))
        for path, what in checked:
            try:
                if not btrfsutil.is_subvolume(path):
                    raise SnapshotsUnavailable(f"the {what} {path} is not a btrfs subvolume")
            except btrfsutil.BtrfsUtilError as error:
                raise SnapshotsUnavailable(f"the {what} {path} is not on btrfs: {error}") from None

    def create(
        self,
        description: str,
        kind: str,
        *,
        uid: int,
        method: str,
        job_id: int | None = None,
        pre_id: int | None = None,
    ) -> int:
        self.check_available()
        started = time.monotonic()
        snapshot_id = self.store.add_snapshot(uid, method, description, kind, job_id, pre_id)
        path = self.layout.snapshot(snapshot_id)
        try:
            path.parent.mkdir(mode=0o750)
            btrfsutil.create_snapshot(self.layout.root, path, read_only=True)
            taken = time.time()
            info = {"id": snapshot_id, "time": taken, "description": description, "kind": kind, "job": job_id}
            (path.parent / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            failpoint("snapshot-written")
            self.add_menu_entry(snapshot_id, description, taken)
        except BaseException:
            # Nothing half-made: no directory without a snapshot, no record without a directory.
            self._remove_directory(snapshot_id)
            self.store.forget_snapshot(snapshot_id, uid, "SnapshotCreateFailed")
            raise
        milliseconds = (time.monotonic() - started) * 1000
        log.info(
            "created snapshot %d (%s) in %.1f ms", snapshot_id, kind, milliseconds, extra={"SNAPSHOT": snapshot_id}
        )
        return snapshot_id

    def add_menu_entry(self, snapshot_id: int, description: str, taken: float) -> str | None:
        """The snapshot's read-only entry in the boot menu. A host with no boot entries to copy (no
        ESP, or not booted by systemd-boot) has no menu to keep in step: None. A write that fails
        (the ESP full or broken) is an error: the snapshot is not made without its entry."""
        if self.entries is None:
            return None
        subvolume = subvolume_path(self.layout.snapshot(snapshot_id))
        try:
            return self.entries.add_readonly(snapshot_id, description, subvolume, self.running_root, taken)
        except BootConfigError as error:
            log.debug("snapshot %d: no boot menu entry: %s", snapshot_id, error)
            return None

    def ensure_menu_entry(self, snapshot_id: int) -> str:
        """The read-only entry's id, written now if the snapshot predates it."""
        row = self.get(snapshot_id)
        entry = readonly_entry_id(snapshot_id)
        missing = self.entries is None or not self.entries.has_entry(entry)
        if missing and self.add_menu_entry(snapshot_id, row.description, row.created) is None:
            raise BootConfigError(f"snapshot {snapshot_id} cannot have a boot entry: no boot entries to copy")
        return entry

    def reconcile(self, booted_snapshot: int | None) -> list[str]:
        """Make snapshots, deployments, boot entries and the state store agree again after a crash or
        a power cut between two steps of Create, Rollback or Delete; returns what was done. Each step
        is ordered so that what a cut leaves is either harmless or found here: a record whose
        subvolume never reached the disk, a deployment no entry names (never activated, or replaced
        by a later rollback's entry), an entry without its subvolume, two entries of one snapshot's
        deployments (a rollback to it again, cut before it retired the earlier one), a snapshot
        without its menu entry, a temporary file on the ESP."""
        done = []
        for row in self.store.snapshots():
            if not self.layout.snapshot(row.id).is_dir() and row.id != booted_snapshot:
                self._remove_directory(row.id)
                self.store.forget_snapshot(row.id, 0, "Reconcile")
                done.append(f"forgot snapshot {row.id}: its subvolume is not on disk")
        if self.entries is None:
            return done
        try:
            entries = self.entries.snapshot_entries()
        except BootConfigError:
            return done  # no ESP here: no boot entries to agree with
        existing = {row.id: row for row in self.existing()}
        done += self._reconcile_deployments(self.entries, entries, existing, booted_snapshot)
        listed = {snapshot_id for kind, snapshot_id, _ in entries if kind == "readonly"}
        for snapshot_id, row in existing.items():
            if snapshot_id not in listed and self.add_menu_entry(snapshot_id, row.description, row.created):
                done.append(f"wrote the boot menu entry of snapshot {snapshot_id}")
        for leftover in self.entries.leftovers():
            leftover.unlink()
            done.append(f"removed {leftover.name}: an entry write cut short")
        return done

    def _reconcile_deployments(
        self,
        entries: BootEntries,
        found: list[tuple[str, int, Path]],
        existing: dict[int, SnapshotRow],
        booted_snapshot: int | None,
    ) -> list[str]:
        """Entries without their subvolume go, then of two entries of one snapshot's deployments the
        earlier's, then deployments no entry names. The running root and its entry always stay."""
        done = []
        deployments = {
            subvolume_path(path): path for snapshot_id in existing for path in self.layout.deployments(snapshot_id)
        }
        booting: dict[int, list[tuple[str, Path]]] = {}  # snapshot -> (its deployment, an entry that boots it)
        for kind, snapshot_id, path in found:
            root = entries.root_of(path)
            if kind == "deployment" and root in deployments and snapshot_of_root(root) == snapshot_id:
                booting.setdefault(snapshot_id, []).append((root, path))
                continue
            orphan = kind == "deployment" or snapshot_id not in existing
            if orphan and snapshot_id != booted_snapshot and root != self.running_root:
                entries.remove_entry(path)  # an update's kernel goes with the last entry naming it
                done.append(f"removed boot entry {path.name}: its subvolume is gone")
        for pairs in booting.values():
            latest = max(pairs, key=lambda pair: rollback_generation(pair[0]) or 0)[0]
            for root, path in pairs:
                if root not in (latest, self.running_root):
                    entries.remove_entry(path)
                    done.append(f"removed boot entry {path.name}: {latest} replaces its deployment {root}")
        named = {root for pairs in booting.values() for root, path in pairs if path.exists()}
        for root, deployment in deployments.items():
            if root not in named and root != self.running_root:
                self.remove_deployment(deployment)
                done.append(f"removed deployment {root}: no boot entry names it")
        return done

    def existing(self) -> list[SnapshotRow]:
        return [row for row in self.store.snapshots() if self.layout.snapshot(row.id).is_dir()]

    def get(self, snapshot_id: int) -> SnapshotRow:
        for row in self.existing():
            if row.id == snapshot_id:
                return row
        raise NoSuchSnapshot(f"snapshot {snapshot_id} does not exist")

    def protected(self, booted_snapshot: int | None) -> dict[int, str]:
        """Snapshots retention and Delete() must keep, with the reason."""
        reasons: dict[int, str] = {}
        good = [row.id for row in self.existing() if row.known_good]
        if good:
            reasons[good[-1]] = "it is the last known-good snapshot"
        if booted_snapshot is not None:
            reasons[booted_snapshot] = "the running system was booted from it"
        return reasons

    def delete(self, snapshot_id: int, *, uid: int, method: str, booted_snapshot: int | None) -> None:
        self.get(snapshot_id)
        if (reason := self.protected(booted_snapshot).get(snapshot_id)) is not None:
            raise SnapshotProtected(f"snapshot {snapshot_id} is kept: {reason}")
        self._remove_directory(snapshot_id)
        self.store.forget_snapshot(snapshot_id, uid, method)
        log.info("deleted snapshot %d", snapshot_id)

    def cleanup(self, *, booted_snapshot: int | None) -> list[int]:
        """Keep the newest `keep_pairs` pre/post pairs; manual snapshots are the user's to delete."""
        rows = self.existing()
        pres = [row.id for row in rows if row.kind == "pre"]
        expired_pres = set(pres[: max(0, len(pres) - self.keep_pairs)])
        expired = [
            row.id
            for row in rows
            if (row.kind == "pre" and row.id in expired_pres) or (row.kind == "post" and row.pre_id in expired_pres)
        ]
        keep = self.protected(booted_snapshot)
        deleted = []
        for snapshot_id in expired:
            if snapshot_id in keep:
                continue
            self._remove_directory(snapshot_id)
            self.store.forget_snapshot(snapshot_id, 0, "SnapshotCleanup")
            deleted.append(snapshot_id)
        return deleted

    def restore_paths(self, snapshot_id: int, paths: list[str]) -> list[str]:
        """Put files back as they were in the snapshot; a file the snapshot lacks is removed.
        Returns what was restored. Directories are not restored recursively: ops name files."""
        # Both sides through the link-refusing file access: a user who owned a directory on the way
        # may have left a link there, in the snapshot or since.
        source, destination = Root(self.layout.snapshot(snapshot_id)), Root(self.layout.root)
        restored = []
        for path in paths:
            kind = source.kind(path)
            if kind == "file":
                status = source.lstat(path)
                content = source.read_bytes(path)
                if status is None or content is None:
                    continue
                destination.write(path, content, status.st_mode & 0o7777, status.st_uid, status.st_gid,
                                  mtime_ns=status.st_mtime_ns)  # fmt: skip
                restored.append(path)
            elif kind is None and destination.kind(path) in ("file", "link"):
                if destination.kind(path) == "link":
                    destination.remove_link(path)
                else:
                    destination.remove(path)
                restored.append(path)
        return restored

    def make_deployment(self, snapshot_id: int) -> Path:
        """A writable copy of the snapshot that a boot entry can name as its root, under a name of its
        own: an earlier rollback deployment of the snapshot is left as it is (`retire_earlier`)."""
        self.get(snapshot_id)
        deployment = self.layout.new_deployment(snapshot_id)
        btrfsutil.create_snapshot(self.layout.snapshot(snapshot_id), deployment, read_only=False)
        # Committed before any boot entry names it: after a power cut, an entry never points at a
        # subvolume the file system's last transaction did not have.
        btrfsutil.sync(deployment)
        return deployment

    def retire_earlier(self, snapshot_id: int, deployment: Path) -> list[str]:
        """The snapshot's earlier rollback deployments, each with its entries, now that the entry of
        `deployment` stands in for theirs. The rollback is made already: a failure here is logged,
        and the next start's reconcile finishes it."""
        retired = []
        for earlier in self.layout.deployments(snapshot_id):
            if earlier == deployment:
                continue
            try:
                subvolume = subvolume_path(earlier)
                if subvolume == self.running_root:
                    continue
                if self.entries is not None:
                    for path in self.entries.entry_files():
                        if self.entries.root_of(path) == subvolume:
                            self.entries.remove_entry(path)  # the snapshot's kernel stays: the new entry names it
                self.remove_deployment(earlier)
            except (OSError, btrfsutil.BtrfsUtilError, BootConfigError) as error:
                log.error("could not remove %s, which a new rollback to snapshot %d replaces (the next start does): %s",
                          earlier, snapshot_id, error)  # fmt: skip
                continue
            log.info("removed %s: %s replaces it", subvolume, subvolume_path(deployment))
            retired.append(subvolume)
        return retired

    @staticmethod
    def remove_deployment(deployment: Path) -> None:
        _delete_subvolume(deployment)

    def _remove_directory(self, snapshot_id: int) -> None:
        if self.entries is not None:
            try:
                self.entries.remove_for_snapshot(snapshot_id)
            except (BootConfigError, OSError) as error:
                log.warning("snapshot %d: its boot entry could not be checked: %s", snapshot_id, error)
        directory = self.layout.directory / str(snapshot_id)
        for child in (self.layout.snapshot(snapshot_id), *self.layout.deployments(snapshot_id)):
            with contextlib.suppress(btrfsutil.BtrfsUtilError):
                _delete_subvolume(child)
        if directory.exists():
            shutil.rmtree(directory)


def subvolume_path(path: Path) -> str:
    """The subvolume's path from the top of the filesystem, as rootflags=subvol= names it."""
    return str(btrfsutil.subvolume_path(path))


def _delete_subvolume(path: Path) -> None:
    """The subvolume and any nested in it (systemd makes some inside a root that booted)."""
    if path.exists() and btrfsutil.is_subvolume(path):
        btrfsutil.delete_subvolume(path, recursive=True)
