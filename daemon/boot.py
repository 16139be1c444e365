"""Boot loader entries for deployments, and what this boot is.

A rollback makes a writable copy of a snapshot (`/.snapshots/N/deployment`) and a Boot Loader
Specification entry that names that subvolume explicitly (`rootflags=subvol=@snapshots/N/deployment`),
with a boot counter in its file name (`rastos-snapshot-N+3.conf`). The entry is made from the entry of
the running deployment, so kernel, initrd and options stay those the image was built with. Deleting
the snapshot deletes its entry: the menu and the snapshots never disagree (grub-btrfs's known failure).

Which entry boots is decided by order, never by naming one entry the default: systemd-boot boots the
first entry matching loader.conf's `default rastos-*` in its sorted list, sorts entries by `sort-key`,
and moves an entry whose tries are used up (`+0`) to the end. So the new entry gets sort-key
`rastos-1`, the running (known to boot) entry `rastos-2`, every other `rastos-3`: the new deployment
boots next, and if it fails its tries, the one that ran before boots again by itself. (Naming the new
entry in `default` would defeat this: systemd-boot boots a default entry even with no tries left.)

Every snapshot also has a read-only entry (`readonly-snapshot-N.conf`, sort-key `rastos-4`, no boot
counter), so the menu lists each one with its date and description. It boots the read-only snapshot
under a writable overlay held in memory (`rastos.overlay`, set up by the initrd): the system runs as the
snapshot was, and what it writes is gone at the next boot. Its id does not match `default rastos-*`,
so it only ever boots when chosen: from the menu, or once through `BootOnce()` (LoaderEntryOneShot).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import BootConfigError
from daemon.failpoints import failpoint
from ops.base import write_atomically

log = logging.getLogger("rastosd.boot")

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = Path("/sys/firmware/efi/efivars")
SORT_NEW, SORT_RUNNING, SORT_OTHER, SORT_READONLY = "rastos-1", "rastos-2", "rastos-3", "rastos-4"
COUNTER = re.compile(r"\+\d+(-\d+)?(?=\.conf$)")
DEPLOYMENT_SUBVOL = re.compile(r"(?:^|/)(\d+)/deployment$")
READONLY_SUBVOL = re.compile(r"(?:^|/)(\d+)/snapshot$")
SNAPSHOT_ENTRY = re.compile(r"^(rastos|readonly)-snapshot-(\d+)\.conf$")
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


def readonly_entry_id(snapshot_id: int) -> str:
    return f"readonly-snapshot-{snapshot_id}.conf"


def deployment_entry_id(snapshot_id: int) -> str:
    return f"rastos-snapshot-{snapshot_id}.conf"


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

    def add_for_snapshot(
        self, snapshot_id: int, description: str, deployment: str, running_root: str, taken: float
    ) -> str:
        """Write the deployment's entry with its tries, ordered to boot next. Returns its id."""
        running, template = self.template_for(running_root)
        self.remove_for_snapshot(snapshot_id, readonly=False)
        lines = self._entry_lines(template, f"rastOS snapshot {snapshot_id} of {_date(taken)}: {description}",
                                  SORT_NEW, entry_options(template, deployment, readonly=False))  # fmt: skip
        # The others first: until the new entry exists, the order is the old one, whatever happens.
        for other in self.entry_files():
            if other.name.startswith("rastos"):
                self.set_sort_key(other, SORT_RUNNING if other == running else SORT_OTHER)
        failpoint("order-changed")
        entry = deployment_entry_id(snapshot_id)
        path = self.entries_dir / entry.replace(".conf", f"+{self.tries}.conf")
        write_atomically(path, "\n".join(lines) + "\n", 0o644, 0, 0)
        log.info("boot entry %s for snapshot %d boots next", path.name, snapshot_id)
        return entry

    def add_readonly(self, snapshot_id: int, description: str, subvolume: str, running_root: str, taken: float) -> str:
        """Write the menu entry that boots the read-only snapshot under an overlay. Returns its id."""
        _, template = self.template_for(running_root)
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

    def remove_for_snapshot(self, snapshot_id: int, *, readonly: bool = True) -> None:
        """Remove the snapshot's deployment entry, and its read-only entry unless told not to."""
        wanted = {deployment_entry_id(snapshot_id)} | ({readonly_entry_id(snapshot_id)} if readonly else set())
        for path in self.entry_files():
            if entry_id(path.name) in wanted:
                path.unlink()


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
    image_version: str = ""  # the image version this deployment runs (its /usr/lib/rastos/image.json); "" unknown

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
