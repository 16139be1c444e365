"""Boot loader entries for deployments, and what this boot is.

A rollback makes a writable copy of a snapshot (`/.snapshots/N/deployment`) and a Boot Loader
Specification entry that names that subvolume explicitly (`rootflags=subvol=@snapshots/N/deployment`),
with a boot counter in its file name (`rastos-snapshot-N+3.conf`). The entry is made from the
snapshot's read-only entry (below), which copied the entry of the deployment it was taken on: kernel,
initrd and options stay those the snapshot's tree was built with, whichever version runs now. A
rollback to a snapshot that has one already makes `N/deployment@G` beside the earlier deployment,
which boots as it did until the new entry is written, and goes only then. Deleting the snapshot
deletes its entries: the menu and the snapshots never disagree (grub-btrfs's known failure).

Which entry boots is decided by order, never by naming one entry the default: systemd-boot boots the
first entry matching loader.conf's `default rastos-*` in its sorted list, sorts entries by `sort-key`,
and moves an entry whose tries are used up (`+0`) to the end. So the new entry gets sort-key
`rastos-1`, the running (known to boot) entry `rastos-2`, every other `rastos-3`: the new deployment
boots next, and if it fails its tries, the one that ran before boots again by itself. (Naming the new
entry in `default` would defeat this: systemd-boot boots a default entry even with no tries left.)

An image update is a deployment too (`@deployments/VERSION`, daemon/updates), with its own kernel and
initrd in `/ENTRY-TOKEN/VERSION/` on the ESP and an entry `rastos-update-VERSION+TRIES.conf`, ordered
the same way. So entries no longer all share one kernel: a kernel directory goes when the last entry
that refers to it goes.

Every snapshot also has a read-only entry (`readonly-snapshot-N.conf`, sort-key `rastos-4`, no boot
counter), so the menu lists each one with its date and description. It boots the read-only snapshot
under a writable overlay held in memory (`rastos.overlay`, set up by the initrd): the system runs as the
snapshot was, and what it writes is gone at the next boot. Its id does not match `default rastos-*`,
so it only ever boots when chosen: from the menu, or once through `BootOnce()` (LoaderEntryOneShot).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from daemon.errors import BootConfigError
from daemon.failpoints import failpoint
from ops.base import write_atomically

log = logging.getLogger("rastosd.boot")

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = Path("/sys/firmware/efi/efivars")
SORT_NEW, SORT_RUNNING, SORT_OTHER, SORT_READONLY = "rastos-1", "rastos-2", "rastos-3", "rastos-4"
COUNTER = re.compile(r"\+\d+(-\d+)?(?=\.conf$)")
# A rollback deployment: N/deployment, or N/deployment@G made beside an earlier one (G counts up).
DEPLOYMENT_SUBVOL = re.compile(r"(?:^|/)(\d+)/deployment(?:@(\d+))?$")
READONLY_SUBVOL = re.compile(r"(?:^|/)(\d+)/snapshot$")
SNAPSHOT_ENTRY = re.compile(r"^(rastos|readonly)-snapshot-(\d+)\.conf$")
UPDATE_ENTRY = re.compile(r"^rastos-update-(.+)\.conf$")
ENTRY_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KERNEL_FILES = ("linux", "initrd")
TEMPORARY = re.compile(r"^\.(linux|initrd)\.[0-9a-f]{12}$")  # _write_streamed's names
# Kernel command line words of a read-only snapshot boot: the initrd puts an overlay over the root,
# and systemd must not remount that overlay with the btrfs options fstab gives "/".
OVERLAY = "rastos.overlay"
READONLY_OPTIONS = (OVERLAY, "systemd.mask=systemd-remount-fs.service")


def entry_id(file_name: str) -> str:
    """The entry's id as systemd-boot sees it: the file name without the boot counter."""
    return COUNTER.sub("", file_name)


def tries_left(file_name: str) -> int | None:
    """The boot counter's tries left (`NAME+LEFT.conf` or `NAME+LEFT-DONE.conf`); None when uncounted."""
    match = COUNTER.search(file_name)
    return None if match is None else int(match.group(0)[1:].split("-")[0])


def snapshot_of_root(root_subvolume: str) -> int | None:
    """The snapshot a deployment root was made from, or that a read-only boot runs; None for the
    image's own root."""
    match = DEPLOYMENT_SUBVOL.search(root_subvolume) or READONLY_SUBVOL.search(root_subvolume)
    return int(match.group(1)) if match else None


def rollback_generation(root_subvolume: str) -> int | None:
    """Which of its snapshot's rollback deployments the root is, the later the greater: 0 for
    `N/deployment`, G for `N/deployment@G`; None for any other root."""
    match = DEPLOYMENT_SUBVOL.search(root_subvolume)
    return None if match is None else int(match.group(2) or 0)


def readonly_entry_id(snapshot_id: int) -> str:
    return f"readonly-snapshot-{snapshot_id}.conf"


def deployment_entry_id(snapshot_id: int) -> str:
    return f"rastos-snapshot-{snapshot_id}.conf"


def update_entry_id(version: str) -> str:
    """The entry of an update's deployment. A version may hold '+' (Debian's style), which in an
    entry's file name would read as a boot counter: it becomes '_' there (the deployment keeps it)."""
    return f"rastos-update-{version.replace('+', '_')}.conf"


def entry_options(template: dict[str, list[str]], root_subvolume: str, *, readonly: bool) -> list[str]:
    """The template entry's kernel options, naming `root_subvolume`; `ro` under an overlay for a
    read-only snapshot, `rw` and no overlay for a deployment (whichever kind the template was)."""
    kept = [
        option
        for option in " ".join(template.get("options", [])).split()
        if not option.startswith("rootflags=") and option not in ("ro", "rw", *READONLY_OPTIONS)
    ]
    return [*kept, f"rootflags=subvol={root_subvolume}", *(("ro", *READONLY_OPTIONS) if readonly else ("rw",))]


def overlay_boot(cmdline: str) -> str | None:
    """The root subvolume of a read-only snapshot boot, from the kernel command line; else None."""
    words = cmdline.split()
    if OVERLAY not in words:
        return None
    subvolume = subvolume_option(words)
    return subvolume.lstrip("/") if subvolume else None


def subvolume_option(options: list[str]) -> str:
    """The subvolume a kernel command line's `rootflags=...subvol=X...` names, or ""."""
    for option in options:
        if option.startswith("rootflags=") and "subvol=" in option:
            return option.split("subvol=", 1)[1].split(",")[0]
    return ""


def read_loader_variable(name: str) -> str | None:
    """A systemd-boot EFI variable (UTF-16 after 4 bytes of attributes), None where there is none."""
    try:
        raw = (EFIVARS / f"{name}-{LOADER_GUID}").read_bytes()
    except OSError:
        return None
    return raw[4:].decode("utf-16-le", errors="replace").rstrip("\0")


@dataclass(frozen=True)
class BootEntries:
    esp: Path
    tries: int

    @property
    def entries_dir(self) -> Path:
        return self.esp / "loader" / "entries"

    def entry_files(self) -> list[Path]:
        try:
            return sorted(self.entries_dir.glob("*.conf"))
        except OSError as error:
            raise BootConfigError(f"cannot read boot entries in {self.entries_dir}: {error}") from None

    def template_for(self, root_subvolume: str) -> tuple[Path, dict[str, list[str]]]:
        """The entry that boots `root_subvolume` (or, failing that, the image's first entry)."""
        files = self.entry_files()
        if not files:
            raise BootConfigError(f"no boot entries in {self.entries_dir}", hint="is the ESP mounted at /efi?")
        parsed = [(path, parse_entry(path.read_text())) for path in files]
        for path, entry in parsed:
            if f"rootflags=subvol={root_subvolume}" in " ".join(entry.get("options", [])).split():
                return path, entry
        return parsed[0]

    def snapshot_template(self, snapshot_id: int) -> dict[str, list[str]] | None:
        """The snapshot's own entry, to boot it with: its read-only entry, else its deployment's; None
        when it has neither. It names the kernel, initrd and options of the root the snapshot was
        taken on (the read-only entry copied them then), and the modules in the snapshot are that
        kernel's: since each image update brings a kernel of its own, the running one may be another."""
        found = {entry_id(path.name): path for path in self.entry_files()}
        for wanted in (readonly_entry_id(snapshot_id), deployment_entry_id(snapshot_id)):
            if wanted in found:
                return parse_entry(found[wanted].read_text())
        return None

    def add_for_snapshot(
        self, snapshot_id: int, description: str, deployment: str, running_root: str, taken: float
    ) -> str:
        """Write the deployment's entry with its tries, ordered to boot next, with the kernel the
        snapshot was taken with. Returns its id.

        An entry of an earlier rollback to the snapshot is left as it is, first in the order: it
        boots its own deployment until this one is written (in its place when the file names meet,
        the rename being atomic), and the caller retires it after."""
        running, running_template = self.template_for(running_root)
        template = self.snapshot_template(snapshot_id)
        if template is None:
            # Only when no entry of it could be written (no entries to copy when it was taken, or a
            # cut before its read-only entry that no start since could repair) or its entry was
            # removed by hand: nothing says which kernel it was taken with, and the running one is
            # the best guess left.
            log.warning("snapshot %d has no boot entry to tell its kernel: its deployment boots the running one's",
                        snapshot_id)  # fmt: skip
            template = running_template
        lines = self._entry_lines(template, f"rastOS snapshot {snapshot_id} of {_date(taken)}: {description}",
                                  SORT_NEW, entry_options(template, deployment, readonly=False))  # fmt: skip
        entry = deployment_entry_id(snapshot_id)
        self._add_first(entry, lines, running)
        log.info("boot entry %s for snapshot %d boots next", entry, snapshot_id)
        return entry

    def add_for_update(
        self, version: str, template_text: str, kernel: PurePosixPath, deployment: str, running_root: str
    ) -> str:
        """Write the entry of an update's deployment from the bundle's template, with its tries,
        ordered to boot next; its kernel and initrd must be in place in `kernel` (/TOKEN/NAME,
        `install_kernel`). The root device is the running entry's: the deployment lives on the same
        file system, whatever the builder's own file system was called. Returns the entry's id.

        An entry of an earlier staging of the version is left as it is, first in the order: it boots
        its own deployment and kernel until this one is written (in its place when the file names
        meet, the rename being atomic), and the caller retires it after."""
        running, running_template = self.template_for(running_root)
        template = parse_entry(template_text)
        root = [word for word in " ".join(running_template.get("options", [])).split() if word.startswith("root=")]
        words = [word for word in " ".join(template.get("options", [])).split() if not word.startswith("root=")]
        template["options"] = [" ".join([*root[:1], *words])]
        template["linux"] = [str(kernel / "linux")]
        template["initrd"] = [str(kernel / "initrd")]
        template.pop("efi", None)
        if "machine-id" not in template and "machine-id" in running_template:
            template["machine-id"] = running_template["machine-id"]
        title = (template.get("title") or [f"rastOS {version}"])[0]
        lines = self._entry_lines(template, title, SORT_NEW, entry_options(template, deployment, readonly=False))
        entry = update_entry_id(version)
        self._add_first(entry, lines, running)
        log.info("boot entry %s for update %s boots next", entry, version)
        return entry

    def _add_first(self, entry: str, lines: list[str], running: Path) -> None:
        # The others first: until the new entry exists, the order is the old one, whatever happens.
        # An earlier entry of the same id keeps its place: it is the one the new one stands in for.
        for other in self.entry_files():
            if other.name.startswith("rastos") and entry_id(other.name) != entry:
                self.set_sort_key(other, SORT_RUNNING if other == running else SORT_OTHER)
        failpoint("order-changed")
        path = self.entries_dir / entry.replace(".conf", f"+{self.tries}.conf")
        write_atomically(path, "\n".join(lines) + "\n", 0o644, 0, 0)

    # Kernels of update deployments: /TOKEN/VERSION/{linux,initrd}, one directory per version

    def entry_token(self, running_root: str, configured: str | None) -> str:
        """The entry token (the ESP's directory of this installation's kernels): from the running
        entry's kernel path (/TOKEN/VERSION/linux), else /etc/kernel/entry-token's (`configured`)."""
        _, template = self.template_for(running_root)
        for value in template.get("linux", []):
            parts = PurePosixPath(value).parts
            if len(parts) == 4 and parts[0] == "/" and ENTRY_TOKEN.match(parts[1]):
                return parts[1]
        token = (configured or "").strip()
        if not ENTRY_TOKEN.match(token) or token in ("EFI", "loader"):
            raise BootConfigError(
                "cannot tell this host's entry token: the running entry's kernel is not in /TOKEN/VERSION/ "
                "and /etc/kernel/entry-token names none"
            )
        return token

    def kernel_directory(self, token: str, name: str) -> Path:
        return self.esp / token / name

    def file_with(self, name: str, size: int, sha256: str) -> Path | None:
        """A kernel or initrd already on the ESP (/TOKEN/DIRECTORY/NAME, no link) with this content:
        what a delta that keeps its parent's kernel is installed from."""
        for candidate in sorted(self.esp.glob(f"*/*/{name}")):
            try:
                if candidate.is_symlink() or not candidate.is_file() or candidate.stat().st_size != size:
                    continue
                with candidate.open("rb") as file:
                    if hashlib.file_digest(file, "sha256").hexdigest() == sha256:
                        return candidate
            except OSError:
                continue
        return None

    def install_kernel(self, token: str, name: str, files: Mapping[str, Iterable[bytes]]) -> Path:
        """Write the files (linux, initrd) into /TOKEN/NAME/ on the ESP (NAME: the deployment's), each
        through a temporary name, fsynced and renamed: a cut leaves either the whole file or a
        temporary one (`leftovers`)."""
        directory = self.kernel_directory(token, name)
        directory.mkdir(parents=True, exist_ok=True)
        for name, chunks in files.items():
            _write_streamed(directory / name, chunks)
        return directory

    def referenced_directories(self, path: Path) -> set[PurePosixPath]:
        """The kernel directories (/TOKEN/VERSION) the entry's linux, initrd, efi and devicetree name."""
        try:
            entry = parse_entry(path.read_text())
        except FileNotFoundError:
            return set()
        found = set()
        for key in ("linux", "initrd", "efi", "devicetree"):
            for value in entry.get(key, []):
                parts = PurePosixPath("/" + value.lstrip("/")).parts
                if len(parts) >= 4 and ".." not in parts:  # a file in /TOKEN/VERSION/, not /rastos/vmlinuz
                    found.add(PurePosixPath(*parts[:3]))
        return found

    def remove_entry(self, path: Path) -> None:
        """Remove the entry, and each kernel directory it named that no other entry names (an
        update's own kernel goes with its last entry; the image's shared one stays while any refers
        to it). Only /TOKEN/VERSION directories are ever removed, never the ESP's others."""
        directories = self.referenced_directories(path)
        path.unlink()
        still: set[PurePosixPath] = set()
        for other in self.entry_files():
            still |= self.referenced_directories(other)
        for directory in sorted(directories - still):
            target = self.esp / directory.relative_to("/")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                log.info("removed %s from the ESP: no entry refers to it any more", directory)

    def drop_kernel_directory(self, token: str, name: str) -> None:
        """Remove /TOKEN/NAME unless an entry refers to it (a staging that failed after writing it, a
        deployment retired after its entry was replaced)."""
        directory = PurePosixPath("/", token, name)
        for path in self.entry_files():
            if directory in self.referenced_directories(path):
                return
        shutil.rmtree(self.kernel_directory(token, name), ignore_errors=True)

    def unnamed_kernels(self, token: str, names: Iterable[str]) -> list[Path]:
        """Of the kernel directories /TOKEN/NAME, those that are there and no entry names."""
        named: set[PurePosixPath] = set()
        for path in self.entry_files():
            named |= self.referenced_directories(path)
        found = []
        for name in sorted(set(names)):
            directory = self.kernel_directory(token, name)
            if PurePosixPath("/", token, name) not in named and directory.is_dir() and not directory.is_symlink():
                found.append(directory)
        return found

    def update_entries(self) -> list[tuple[str, Path]]:
        """Every entry made for an update: (the deployment it boots, its file)."""
        return [(self.root_of(path), path) for path in self.entry_files() if UPDATE_ENTRY.match(entry_id(path.name))]

    def kernel_leftovers(self) -> list[Path]:
        """Temporary files of a kernel write that was cut short, in /TOKEN/VERSION/ directories."""
        found = [path for name in KERNEL_FILES for path in self.esp.glob(f"*/*/.{name}.*")]
        return sorted(path for path in found if TEMPORARY.match(path.name) and path.is_file())

    def add_readonly(self, snapshot_id: int, description: str, subvolume: str, running_root: str, taken: float) -> str:
        """Write the menu entry that boots the read-only snapshot under an overlay. Returns its id. A
        snapshot being taken has no entry yet and boots the running root's kernel; one whose entry is
        written again keeps the kernel its deployment's entry names, if it has one."""
        template = self.snapshot_template(snapshot_id) or self.template_for(running_root)[1]
        title = f"rastOS snapshot {snapshot_id} of {_date(taken)}, read-only: {description}"
        lines = self._entry_lines(template, title, SORT_READONLY, entry_options(template, subvolume, readonly=True))
        path = self.entries_dir / readonly_entry_id(snapshot_id)
        write_atomically(path, "\n".join(lines) + "\n", 0o644, 0, 0)
        return path.name

    def snapshot_entries(self) -> list[tuple[str, int, Path]]:
        """Every entry made for a snapshot: (kind "deployment" or "readonly", snapshot id, file)."""
        found = []
        for path in self.entry_files():
            if match := SNAPSHOT_ENTRY.match(entry_id(path.name)):
                found.append(("deployment" if match.group(1) == "rastos" else "readonly", int(match.group(2)), path))
        return found

    def leftovers(self) -> list[Path]:
        """Temporary files of an entry write that was cut short (systemd-boot ignores them)."""
        return sorted(self.entries_dir.glob(".*.conf.*")) if self.entries_dir.is_dir() else []

    def has_entry(self, entry: str) -> bool:
        return any(entry_id(path.name) == entry for path in self.entry_files())

    @staticmethod
    def _entry_lines(template: dict[str, list[str]], title: str, sort_key: str, options: list[str]) -> list[str]:
        lines = [f"title {title}"[:200], f"sort-key {sort_key}"]
        for key in ("version", "machine-id", "linux", "efi"):
            lines += [f"{key} {value}" for value in template.get(key, [])]
        lines += [f"initrd {value}" for value in template.get("initrd", [])]
        lines.append("options " + " ".join(options))
        return lines

    def set_sort_key(self, path: Path, key: str) -> None:
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.split(maxsplit=1)[:1] != ["sort-key"]]
        wanted = [*kept[:1], f"sort-key {key}", *kept[1:]]
        if wanted != lines:
            write_atomically(path, "\n".join(wanted) + "\n", 0o644, 0, 0)

    def failed_entries(self) -> list[Path]:
        """rastOS entries whose tries are used up: deployments that did not boot to a good state."""
        return [path for path in self.entry_files() if path.name.startswith("rastos") and tries_left(path.name) == 0]

    def root_of(self, path: Path) -> str:
        return subvolume_option(" ".join(parse_entry(path.read_text()).get("options", [])).split())

    def remove_for_snapshot(self, snapshot_id: int) -> None:
        """Remove the snapshot's entries: its read-only one and those of its deployments."""
        wanted = {deployment_entry_id(snapshot_id), readonly_entry_id(snapshot_id)}
        for path in self.entry_files():
            if entry_id(path.name) in wanted:
                self.remove_entry(path)


def _write_streamed(path: Path, chunks: Iterable[bytes]) -> None:
    """`chunks` into `path` through a temporary name in the same directory, as write_atomically does
    for a text: the file fsynced, renamed, fsynced again (vfat), the directory fsynced."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
            temporary.replace(path)
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _date(taken: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(taken))


def parse_entry(text: str) -> dict[str, list[str]]:
    entry: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.strip().split(maxsplit=1)
        if len(words) == 2 and not words[0].startswith("#"):
            entry.setdefault(words[0], []).append(words[1])
    return entry


@dataclass(frozen=True)
class Fallback:
    """This boot fell back: the entry ordered before ours used up its tries."""

    failed_entry: str  # its id, e.g. rastos-snapshot-7.conf
    failed_root: str  # the subvolume it names


@dataclass(frozen=True)
class BootState:
    root: str  # the root subvolume, from the top of the filesystem
    snapshot: int | None  # the snapshot it was rolled back to, if any
    entry: str  # the boot entry systemd-boot selected ("" when not booted by it)
    health: str  # good, pending, unknown
    fallback: Fallback | None = None
    image_version: str = ""  # the image version the booted tree says it is (/usr/lib/rastos/image.json)

    @property
    def kind(self) -> str:
        if self.fallback is not None:
            return "fallback"
        if READONLY_SUBVOL.search(self.root):
            return "snapshot"  # a read-only snapshot under an overlay: its changes are not kept
        return "deployment" if self.snapshot is None else "rollback"

    def as_dbus(self) -> dict[str, str]:
        return {
            "root": self.root,
            "snapshot": "" if self.snapshot is None else str(self.snapshot),
            "kind": self.kind,
            "entry": self.entry,
            "health": self.health,
            "failed_entry": "" if self.fallback is None else self.fallback.failed_entry,
            "failed_root": "" if self.fallback is None else self.fallback.failed_root,
            "image_version": self.image_version,
        }


def find_fallback(entries: BootEntries, booted_entry: str) -> Fallback | None:
    """A rastOS entry with no tries left that is not the one we booted: it failed, and this boot is
    what systemd-boot fell back to. (Not booted by systemd-boot, nothing can be said: None.)"""
    if not booted_entry:
        return None
    for path in entries.failed_entries():
        if entry_id(path.name) != entry_id(booted_entry):
            return Fallback(entry_id(path.name), entries.root_of(path))
    return None


def current_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def booted_entry_blessed(esp: Path, entry: str) -> bool:
    """True when the selected entry carries no boot counter any more (systemd-bless-boot renamed it)."""
    if not entry:
        return False
    return (esp / "loader" / "entries" / entry).exists()
