"""What a crash or power cut in the middle of a staging left, found and removed at the next start.

Each step of a staging is ordered so that a cut leaves something harmless or something found here:
an image whose receive never completed (no read-only received subvolume), or that a staging cut
later received for a deployment it never made, a deployment never readied
(`.incoming-ID`), a deployment placed but never given its entry (it was never going to boot), a
kernel directory no entry names, an entry whose deployment is gone, two entries of one version (a
staging of it again was cut after its entry was written: the later deployment stays), a temporary
file on the ESP, and downloads nobody will resume.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from daemon.boot import BootEntries, entry_id
from daemon.errors import BootConfigError
from daemon.updates.layout import DEPLOYMENTS, IMAGES, HostLayout, delete_subvolume, generation, identity
from daemon.updates.model import image_identity
from daemon.updates.retention import entry_token

log = logging.getLogger("rastosd.updates")

KEEP_PARTIAL = 7 * 24 * 3600  # seconds a download cut short is kept for a later staging to resume


def reconcile(
    layout: HostLayout, entries: BootEntries, running: str, downloads: Path, received: list[str], kernels: list[str]
) -> list[str]:
    """`received`: the images that stagings cut short had received; `kernels`: the names of the
    kernel directories stagings may have made."""
    done = []
    for path, why in layout.leftovers(running):
        delete_subvolume(path)
        done.append(f"removed {layout.subvolume(path)}: {why}")
    try:
        done += _entries_and_deployments(layout, entries, running)
        done += _kernels(entries, running, kernels)
    except BootConfigError as error:  # no ESP here: no entries to agree with
        log.debug("update reconcile: no boot entries: %s", error)
    done += _received(layout, received)
    done += _downloads(downloads, time.time())
    return done


def _received(layout: HostLayout, received: list[str]) -> list[str]:
    """An image a cut staging received goes, unless a deployment was made of it after all."""
    done = []
    used = {image_identity(layout.deployment(name)) for name in layout.deployment_names()}
    for subvolume in received:
        path = layout.top / subvolume
        if not subvolume.startswith(f"{IMAGES}/") or ".." in subvolume or not path.exists():
            continue
        if identity(path) not in used:
            delete_subvolume(path)
            done.append(f"removed {subvolume}: received by a staging that was cut short")
    return done


def _entries_and_deployments(layout: HostLayout, entries: BootEntries, running: str) -> list[str]:
    if not entries.entry_files():  # an ESP not mounted looks like one without entries: judge nothing by it
        raise BootConfigError(f"no boot entries in {entries.entries_dir}")
    done = []
    named: dict[str, list[tuple[str, Path]]] = {}  # entry id -> (deployment, entry file)
    for root, path in entries.update_entries():
        if root.startswith(f"{DEPLOYMENTS}/") and (layout.top / root).is_dir():
            named.setdefault(entry_id(path.name), []).append((root, path))
        elif root != running:
            entries.remove_entry(path)
            done.append(f"removed boot entry {path.name}: its deployment {root or '(none)'} is gone")
    done += _replaced(entries, named, running)
    booted = {root for found in named.values() for root, path in found if path.exists()}
    token = entry_token(entries, running)
    for name in layout.deployment_names():
        subvolume = layout.subvolume(layout.deployment(name))
        if subvolume in booted or subvolume == running:
            continue
        if token is not None:
            entries.drop_kernel_directory(token, name)
        delete_subvolume(layout.deployment(name))
        done.append(f"removed {subvolume}: no boot entry names it")
    for leftover in [*entries.kernel_leftovers(), *entries.leftovers()]:
        leftover.unlink()
        done.append(f"removed {leftover.relative_to(entries.esp)}: a write to the ESP cut short")
    return done


def _replaced(entries: BootEntries, named: dict[str, list[tuple[str, Path]]], running: str) -> list[str]:
    """Of two entries of one version, the one whose deployment was made first goes (its deployment
    with it, as one without an entry): a staging of the version again was cut once its own entry was
    written, before it retired the earlier one."""
    done = []
    for found in named.values():
        latest = max(found, key=lambda item: generation(item[0].rsplit("/", 1)[-1]))
        for root, path in found:
            if root in (latest[0], running):
                continue
            entries.remove_entry(path)
            done.append(f"removed boot entry {path.name}: {latest[0]} replaces its deployment {root}")
    return done


def _kernels(entries: BootEntries, running: str, names: list[str]) -> list[str]:
    """An update's kernel directory no entry names: removing an entry removes the entry first and
    then the kernel directories it was the last to name, and a cut between the two left this."""
    token = entry_token(entries, running)
    if token is None:
        return []
    done = []
    for directory in entries.unnamed_kernels(token, names):
        shutil.rmtree(directory)
        done.append(
            f"removed {directory.relative_to(entries.esp)} from the ESP: no entry names it "
            "(its last entry's removal was cut short)"
        )
    return done


def _downloads(directory: Path, now: float) -> list[str]:
    """Complete downloads are never resumed (a staging that ended removed its own); partial ones are
    kept a week for a staging of the same URL to go on from."""
    done: list[str] = []
    if not directory.is_dir():
        return done
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".partial"):
            stale = now - path.stat().st_mtime > KEEP_PARTIAL
        elif path.name.endswith(".tmp"):
            stale = True
        else:
            partial = path.with_name(path.name.removesuffix(".json"))
            stale = path.name.endswith(".rbundle") or (path.name.endswith(".json") and not partial.exists())
        if stale and path.is_file():
            path.unlink()
            done.append(f"removed the download {path.name}: no staging will go on with it")
    return done
