"""What a host keeps of its image updates, and removing the rest (docs/updates.md, "Retention").

Kept: the running deployment, the fallback (the newest other root a boot was marked good on), the
staged one (its entry boots next, with tries left), and during the boot that fell back from it, a
deployment that used up its tries (`failed`: the daemon passes it in the first such boot only). Every
other update deployment (@deployments/*) goes. An image (@images/*) stays
while a kept root was made from it: the running one's is also the parent of the next delta, the
staged one's the next running one's. The first deployment `@` and rollbacks (@snapshots/N/deployment)
are not update deployments: they are never removed here.

A deployment goes in the order that leaves, after a cut at any point, something harmless or
something the next start finishes (reconcile.py): its entries first, each taking the kernel
directories no other entry names (a snapshot taken on the deployment copied its entry, and keeps its
kernel), then its own kernel directory if no entry names it (one whose entry was replaced in place),
then the subvolume (a deployment without an entry is removed at the next start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from daemon.boot import SORT_NEW, BootEntries, tries_left
from daemon.errors import BootConfigError
from daemon.updates.layout import HostLayout, delete_subvolume, deployment_version, identity
from daemon.updates.model import image_identity

log = logging.getLogger("rastosd.updates")


def remove_deployment(layout: HostLayout, entries: BootEntries, deployment: Path, token: str | None) -> None:
    """The deployment, every entry that boots it, and its kernel directory /TOKEN/NAME (when the
    token is known) unless an entry still names it."""
    subvolume = layout.subvolume(deployment)
    for path in entries.entry_files():
        if entries.root_of(path) == subvolume:
            entries.remove_entry(path)
    if token is not None:
        entries.drop_kernel_directory(token, deployment.name)
    delete_subvolume(deployment)


def staged_roots(entries: BootEntries, running: str) -> list[str]:
    """The deployments whose update entry boots next and has tries left: staged, not booted yet."""
    staged = []
    for root, path in entries.update_entries():
        first = f"sort-key {SORT_NEW}" in path.read_text().splitlines()
        if first and root != running and tries_left(path.name) != 0:
            staged.append(root)
    return staged


def kept_roots(
    layout: HostLayout, entries: BootEntries, running: str, good_roots: Iterable[str], failed: str | None
) -> dict[str, str]:
    """The roots retention keeps, each with why."""
    kept = {running: "the running deployment"}
    fallback = next((root for root in good_roots if root != running and (layout.top / root).is_dir()), None)
    if fallback is not None:
        kept.setdefault(fallback, "the fallback: the last other root a boot was good on")
    for root in staged_roots(entries, running):
        kept.setdefault(root, "staged: it boots next")
    if failed:
        kept.setdefault(failed, "this boot fell back from it")
    return kept


def collect(
    layout: HostLayout, entries: BootEntries, running: str, good_roots: Iterable[str], failed: str | None
) -> list[str]:
    """Remove the update deployments and images retention does not keep; returns what went."""
    try:
        if not entries.entry_files():  # an ESP not mounted looks like one without entries
            return []
    except BootConfigError:
        return []  # which deployment is staged cannot be told: nothing goes
    kept = kept_roots(layout, entries, running, good_roots, failed)
    for root, why in kept.items():
        log.debug("update retention keeps %s: %s", root, why)
    token = entry_token(entries, running)
    done = []
    for name in layout.deployment_names():
        deployment = layout.deployment(name)
        subvolume = layout.subvolume(deployment)
        if subvolume in kept:
            continue
        remove_deployment(layout, entries, deployment, token)
        done.append(f"removed {subvolume} (version {deployment_version(name)}): "
                    "neither the running deployment, the fallback nor the staged one")  # fmt: skip
    return done + _images(layout, running, kept)


def _images(layout: HostLayout, running: str, kept: Iterable[str]) -> list[str]:
    """Images no kept root was made from. Nothing goes when the running root does not say which
    image it was made from: the next delta's parent cannot be told."""
    wanted = {image_identity(layout.top / root) for root in kept}
    if image_identity(layout.top / running) is None or not layout.images.is_dir():
        return []
    done = []
    for image in sorted(layout.images.iterdir()):
        found = identity(image)
        if found is None or found in wanted:
            continue  # an image whose receive was cut is reconcile's to remove
        delete_subvolume(image)
        done.append(f"removed {layout.subvolume(image)}: no deployment kept was made from it")
    return done


def entry_token(entries: BootEntries, running: str) -> str | None:
    """The ESP's directory of this installation's kernels, from the running entry; None if it does
    not say (an entry removed still takes the kernels it named last)."""
    try:
        return entries.entry_token(running, None)
    except BootConfigError:
        return None
