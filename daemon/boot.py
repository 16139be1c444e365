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
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import BootConfigError
from daemon.ops.base import write_atomically

log = logging.getLogger("rastosd.boot")

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = Path("/sys/firmware/efi/efivars")
SORT_NEW, SORT_RUNNING, SORT_OTHER = "rastos-1", "rastos-2", "rastos-3"
COUNTER = re.compile(r"\+\d+(-\d+)?(?=\.conf$)")
DEPLOYMENT_SUBVOL = re.compile(r"(?:^|/)(\d+)/deployment$")


def entry_id(file_name: str) -> str:
    """The entry's id as systemd-boot sees it: the file name without the boot counter."""
    return COUNTER.sub("", file_name)


def tries_left(file_name: str) -> int | None:
    """The boot counter's tries left (`NAME+LEFT.conf` or `NAME+LEFT-DONE.conf`); None when uncounted."""
    match = COUNTER.search(file_name)
    return None if match is None else int(match.group(0)[1:].split("-")[0])


def snapshot_of_root(root_subvolume: str) -> int | None:
    """The snapshot a deployment root was made from, or None for the image's own root."""
    match = DEPLOYMENT_SUBVOL.search(root_subvolume)
    return int(match.group(1)) if match else None


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
        """Write the snapshot's entry with its tries, ordered to boot next. Returns its id."""
        running, template = self.template_for(running_root)
        self.remove_for_snapshot(snapshot_id)
        name = f"rastos-snapshot-{snapshot_id}"
        options = [
            f"rootflags=subvol={deployment}" if option.startswith("rootflags=") else option
            for option in " ".join(template.get("options", [])).split()
        ]
        if not any(option.startswith("rootflags=") for option in options):
            options.append(f"rootflags=subvol={deployment}")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(taken))
        title = f"title rastOS snapshot {snapshot_id} of {when}: {description}"[:200]
        lines = [title, f"sort-key {SORT_NEW}"]
        for key in ("version", "machine-id", "linux", "efi"):
            lines += [f"{key} {value}" for value in template.get(key, [])]
        lines += [f"initrd {value}" for value in template.get("initrd", [])]
        lines.append("options " + " ".join(options))
        # The others first: until the new entry exists, the order is the old one, whatever happens.
        for other in self.entry_files():
            if other.name.startswith("rastos"):
                self.set_sort_key(other, SORT_RUNNING if other == running else SORT_OTHER)
        path = self.entries_dir / f"{name}+{self.tries}.conf"
        write_atomically(path, "\n".join(lines) + "\n", 0o644, 0, 0)
        log.info("boot entry %s for snapshot %d boots next", path.name, snapshot_id)
        return f"{name}.conf"

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
        for option in " ".join(parse_entry(path.read_text()).get("options", [])).split():
            if option.startswith("rootflags=") and "subvol=" in option:
                return option.split("subvol=", 1)[1].split(",")[0]
        return ""

    def remove_for_snapshot(self, snapshot_id: int) -> None:
        wanted = f"rastos-snapshot-{snapshot_id}.conf"
        for path in self.entry_files():
            if entry_id(path.name) == wanted:
                path.unlink()


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

    @property
    def kind(self) -> str:
        if self.fallback is not None:
            return "fallback"
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
