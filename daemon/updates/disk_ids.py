"""The host's own file system ids in a new tree.

Every build makes its disk with new ids, so a new image's /etc/fstab and /etc/kernel/cmdline name a
root file system and an ESP the host does not have. The running root's fstab names the ones it has:
each id the new tree's fstab gives a mount point is replaced by the id the running fstab gives the same
mount point, in both files. Nothing else in them changes, so a new image's own changes to either (a
mount option, a kernel option) still arrive.
"""

from __future__ import annotations

import re

FILES = ("/etc/fstab", "/etc/kernel/cmdline")
SPEC = re.compile(r"^(UUID|PARTUUID|LABEL)=(\S+)$")


def mounted_ids(fstab: str) -> dict[str, str]:
    """Mount point -> the id its line names (`UUID=...`), for lines that name one."""
    ids: dict[str, str] = {}
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and (match := SPEC.match(fields[0])):
            ids.setdefault(fields[1], match.group(2))
    return ids


def id_changes(running_fstab: str, new_fstab: str) -> dict[str, str]:
    """The new tree's id -> the host's, for every mount point both fstabs name with different ids."""
    running, new = mounted_ids(running_fstab), mounted_ids(new_fstab)
    return {new[point]: running[point] for point in new.keys() & running.keys() if new[point] != running[point]}


def with_host_ids(text: str, changes: dict[str, str]) -> str:
    """`text` with each of the new tree's ids replaced by the host's, as whole words only."""
    if not changes:
        return text
    pattern = re.compile(r"(?<![0-9A-Za-z-])(" + "|".join(map(re.escape, changes)) + r")(?![0-9A-Za-z-])")
    return pattern.sub(lambda match: changes[match.group(1)], text)
