"""Crash consistency of making and activating a deployment, in a real guest.

One disk goes through a chain of power cuts: the VM is stopped hard (QMP `quit`, no shutdown) at each
step of making a snapshot and a deployment (the daemon's failpoints: snapshot written, deployment
made, boot order changed, entry written), during the new deployment's first boot, and right after
its blessing. After every cut the next boot must be healthy, on the deployment the boot order names,
and the snapshots, deployments, boot entries and state store must agree.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from guest_console import PROMPT, GuestConsole, SavedGuest, settled
from test_rollback import boot_state

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

FAILPOINTS = ("snapshot-written", "deployment-made", "order-changed", "entry-written")
# One line the harness parses: snapshot ids in the store; snapshot and deployment subvolumes on disk;
# the entries on the ESP.
SURVEY = (
    "echo \"SURVEY=$(rastosctl --json snapshot list | grep -o '\"id\": [0-9]*' | grep -o '[0-9]*' | tr '\\n' ,)"
    ";$(cd /.snapshots && ls -d */snapshot 2>/dev/null | cut -d/ -f1 | sort -n | tr '\\n' ,)"
    ";$(cd /.snapshots && ls -d */deployment 2>/dev/null | cut -d/ -f1 | sort -n | tr '\\n' ,)"
    ";$(ls -A /efi/loader/entries | tr '\\n' ,)\""
)


def ids(field: str) -> list[int]:
    return [int(word) for word in field.split(",") if word]


def assert_consistent(guest: GuestConsole) -> list[int]:
    """The store, the subvolumes and the ESP agree (as tests/test_daemon_bus.py checks on a scratch
    root); returns the snapshot ids."""
    listed, snapshots, deployments, entries_field = guest.run(SURVEY, "SURVEY").split(";")
    entries = [name for name in entries_field.split(",") if name]
    assert ids(listed) == ids(snapshots), f"store {listed} and subvolumes {snapshots} disagree"
    assert not [name for name in entries if name.startswith(".")], f"temporary files on the ESP: {entries}"
    for snapshot in ids(listed):
        assert f"readonly-snapshot-{snapshot}.conf" in entries, f"snapshot {snapshot} has no menu entry: {entries}"
    counted = sorted({int(name.split("-")[2].split("+")[0].split(".")[0]) for name in entries
                      if name.startswith("rastos-snapshot-")})  # fmt: skip
    assert counted == ids(deployments), f"deployments {deployments} and their entries {entries} disagree"
    return ids(listed)


def boot(image: Path, log: Path) -> GuestConsole:
    guest = GuestConsole(image, keep_changes=True)
    try:
        assert guest.wait_for(PROMPT, 600), "the guest boots after the cut"
        settled(guest)
    except BaseException:
        guest.close(log)
        raise
    return guest


def new_snapshot(guest: GuestConsole, description: str) -> int:
    return int(guest.run(f"echo \"ID=$(rastosctl --json snapshot create {description} | grep -o '[0-9]\\+')\"", "ID"))


def test_power_cuts_while_making_and_activating_a_deployment(saved_minimal: SavedGuest, artifacts: Path) -> None:
    # The first boot is the saved one; every boot after a cut is a real one, of the disk the cut left.
    guest = GuestConsole.resume(saved_minimal, artifacts)
    image = artifacts / "disk.qcow2"
    logs = iter(range(100))
    try:
        assert guest.wait_for(PROMPT, 120), "the saved guest's prompt"
        running = "@"
        for point in FAILPOINTS:
            guest.type(f"systemctl set-environment RASTOS_TEST_FAILPOINT={point} && systemctl restart rastosd")
            if point == "snapshot-written":
                guest.type("rastosctl snapshot create cut-while-writing &")
            else:
                target = new_snapshot(guest, f"before-{point}")
                guest.type(f"rastosctl snapshot rollback {target} &")
            assert guest.wait_for_new(f"rastos failpoint {point} reached".encode(), 180), point
            guest.power_cut()
            guest.close(artifacts / f"console-{next(logs)}-{point}.log")

            guest = boot(image, artifacts / f"console-after-{point}.log")
            state = boot_state(guest)
            if point == "entry-written":
                running = f"@snapshots/{target}/deployment"  # its entry was written: it boots first
            assert state["root"] == running and state["health"] == "good", (point, state)
            assert_consistent(guest)

        # A cut during the new deployment's first boot: the try is used up, the next one succeeds.
        target = new_snapshot(guest, "cut-in-first-boot")
        guest.type(f"rastosctl snapshot rollback {target} > /dev/null && systemctl reboot")
        assert guest.wait_for_new(b"BdsDxe: starting", 300), "the guest reboots"
        time.sleep(5)  # the kernel and the initrd are running
        guest.power_cut()
        guest.close(artifacts / f"console-{next(logs)}-first-boot.log")
        guest = boot(image, artifacts / "console-after-first-boot.log")
        state = boot_state(guest)
        assert state["root"] == f"@snapshots/{target}/deployment" and state["health"] == "good", state
        assert_consistent(guest)

        # A cut right after the blessing: whether or not the rename reached the ESP, the next boot is
        # this deployment again, healthy, and its entry ends up blessed.
        target = new_snapshot(guest, "cut-after-blessing")
        guest.type(f"rastosctl snapshot rollback {target} > /dev/null && systemctl reboot")
        assert guest.wait_for_new(b"BdsDxe: starting", 300), "the guest reboots"
        assert guest.wait_for_new(PROMPT, 600), "the new deployment boots"
        waited = "until systemctl is-active -q systemd-bless-boot; do sleep 0.2; done; echo yes"
        assert guest.run(f'echo "BLESSED=$({waited})"', "BLESSED", 300) == "yes"
        guest.power_cut()
        guest.close(artifacts / f"console-{next(logs)}-blessing.log")
        guest = boot(image, artifacts / "console-after-blessing.log")
        state = boot_state(guest)
        assert state["root"] == f"@snapshots/{target}/deployment" and state["health"] == "good", state
        entries = assert_consistent(guest)
        assert target in entries
        blessed_entry = guest.run(f'echo "ENTRY=$(ls /efi/loader/entries | grep rastos-snapshot-{target})"', "ENTRY")
        assert blessed_entry == f"rastos-snapshot-{target}.conf", "the entry is blessed: no counter left"
    finally:
        guest.close(artifacts / "console.log")
