"""Removing update deployments: one replaced by a later staging of its version, or one a cut left.

A deployment goes in the order that leaves, after a cut at any point, something harmless or
something the next start finishes (reconcile.py): its entries first, each taking the kernel
directories no other entry names (a snapshot taken on the deployment copied its entry, and keeps its
kernel), then its own kernel directory if no entry names it (one whose entry was replaced in place),
then the subvolume (a deployment without an entry is removed at the next start).
"""

from __future__ import annotations

from pathlib import Path

from daemon.boot import BootEntries
from daemon.updates.layout import HostLayout, delete_subvolume


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
