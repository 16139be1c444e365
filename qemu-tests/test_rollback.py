"""Rollback at boot, in a real guest driven through its serial console (one QEMU run per test; guest
reboots happen inside it, so the disk and the ESP carry over from boot to boot)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from guest_console import PROMPT, GuestConsole, settled

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

# The fallback tests only need to see the tries run out: they give a new entry fewer tries than the
# minimal profile's 3 (rastosd's [boot] tries), so fewer boots that are bound to fail. The hang test
# keeps two, each failing its own way, so the count going down from one failed boot to the next is
# seen too; the others take one.
FEW_TRIES = 2

BOOT_STATE = (
    'echo "STATE=$(busctl --json=short get-property org.rastos.Daemon1 /org/rastos/Daemon1 '
    'org.rastos.Daemon1.Manager BootState)"'
)


def reboot(guest: GuestConsole, command: str) -> None:
    """Type a command that reboots, and wait for the firmware to start again: until then the old
    shell may still print prompts while the system goes down."""
    guest.type(command)
    assert guest.wait_for_new(b"BdsDxe: starting", 300), "the guest rebooted"


def reboot_and_settle(guest: GuestConsole, what: str) -> dict[str, str]:
    """Reboot, wait for the next boot to settle, and return its BootState; `what` names that boot."""
    reboot(guest, "systemctl reboot")
    assert guest.wait_for_new(PROMPT, 400), what
    settled(guest)
    return boot_state(guest)


def rollback_to_a_new_snapshot(guest: GuestConsole, tries: int) -> str:
    """After the first boot: snapshot the root and roll back to it, its entry given `tries` tries;
    returns the snapshot's id."""
    assert guest.wait_for(PROMPT, 300)
    settled(guest)
    assert guest.run(f"printf '[boot]\\ntries = {tries}\\n' > /etc/rastos/daemon.toml && systemctl restart rastosd; "
                     'echo "DAEMON=$(systemctl is-active rastosd)"', "DAEMON") == "active"  # fmt: skip
    created = guest.run("echo \"ID=$(rastosctl --json snapshot create base | grep -o '[0-9]\\+')\"", "ID")
    entries = guest.run(f"rastosctl snapshot rollback {created} > /dev/null; "
                        "echo \"ENTRIES=$(ls /efi/loader/entries | tr '\\n' ' ')\"", "ENTRIES").split()  # fmt: skip
    assert f"rastos-snapshot-{created}+{tries}.conf" in entries, entries
    return created


def boot_state(guest: GuestConsole) -> dict[str, str]:
    document: dict[str, Any] = json.loads(guest.run(BOOT_STATE, "STATE"))
    return dict(document["data"])


def fell_back_from(guest: GuestConsole, created: str) -> None:
    """Once the boot has settled: it is the first deployment's, as a fallback from snapshot `created`'s
    entry, and healthy."""
    settled(guest)
    state = boot_state(guest)
    assert state["kind"] == "fallback" and state["failed_entry"] == f"rastos-snapshot-{created}.conf", state
    assert state["entry"] == "rastos-0.conf" and state["health"] == "good", state


def test_rollback_takes_back_an_op_and_keeps_the_history(guest: GuestConsole) -> None:
    assert guest.wait_for(PROMPT, 300)
    settled(guest)
    assert boot_state(guest)["health"] == "good"
    guest.type("rastosctl apply hostname hostname=changed > /dev/null")
    answer = guest.run('echo "HOST=$(cat /etc/hostname) ENTRY=$(rastosctl snapshot rollback 1)"', "HOST")
    assert answer == "changed ENTRY=the next boot starts snapshot 1 (rastos-snapshot-1.conf)"
    state = reboot_and_settle(guest, "the rollback deployment boots (its host name is the old one)")
    assert state["root"] == "@snapshots/1/deployment" and state["kind"] == "rollback", state
    assert state["entry"] == "rastos-snapshot-1.conf" and state["health"] == "good", state
    history = guest.run('echo "JOBS=$(rastosctl --json jobs | grep -c \'\\"state\\": \\"done\\"\')"', "JOBS")
    assert history == "1", "the state store (never rolled back) still has the job"
    assert guest.run('echo "HOST=$(cat /etc/hostname)"', "HOST") == "rastos"


def test_a_deployment_that_cannot_boot_falls_back_by_itself(guest: GuestConsole) -> None:
    created = rollback_to_a_new_snapshot(guest, tries=1)
    # Break the new deployment: no init, so every try ends in a reboot (initrd failure or panic).
    reboot(guest, f"rm -f /.snapshots/{created}/deployment/usr/sbin/init "
                  f"/.snapshots/{created}/deployment/usr/lib/systemd/systemd && systemctl reboot")  # fmt: skip
    assert guest.wait_for_new(PROMPT, 900), "after the tries run out, the previous deployment boots"
    settled(guest)
    state = boot_state(guest)
    assert state["kind"] == "fallback" and state["entry"] == "rastos-0.conf", state
    assert state["failed_entry"] == f"rastos-snapshot-{created}.conf", state
    assert state["failed_root"] == f"@snapshots/{created}/deployment", state
    logged = guest.run('echo "FALLBACKS=$(rastosctl --json log | grep -c \'\\"method\\": \\"BootFallback\\"\')"',
                       "FALLBACKS")  # fmt: skip
    assert logged == "1"


def test_a_deployment_whose_health_check_fails_falls_back(guest: GuestConsole) -> None:
    """This deployment boots, but rastosd cannot start in it: the health check fails, so the trial boot
    reboots by itself, its one try is used up, and the deployment that ran before boots again."""
    created = rollback_to_a_new_snapshot(guest, tries=1)
    reboot(guest, f"rm /.snapshots/{created}/deployment/usr/bin/rastosd && systemctl reboot")
    # The trial boot reaches a login prompt before its check fails: wait for the failure instead.
    start = len(guest.seen)
    assert guest.wait_for_new(b"trial boot failed (the health check failed)", 600), "the trial boot failed its check"
    # The reboot may come in the same read as the failure message (seen once in CI, on a busy
    # machine): look for it after that message, not after the read.
    last_failure = guest.seen.find(b"the health check failed", start)
    assert guest.wait_for_after(last_failure, b"BdsDxe: starting", 300), "the last trial boot rebooted"
    rebooted = guest.seen.find(b"BdsDxe: starting", last_failure)
    assert guest.wait_for_after(rebooted, PROMPT, 400), "after the tries run out, the previous deployment boots"
    fell_back_from(guest, created)


def test_a_snapshot_boots_once_read_only_and_the_default_stays(guest: GuestConsole) -> None:
    """An older snapshot boots once (systemd-boot's one-shot entry, set by BootOnce)
    from its read-only menu entry, under an overlay in memory; the boot after it is the default again,
    with none of what the snapshot boot wrote."""
    assert guest.wait_for(PROMPT, 300)
    settled(guest)
    guest.type("rastosctl apply motd text=changed > /dev/null")  # pre snapshot 1 has the image's motd
    menu = guest.run("echo \"MENU=$(ls /efi/loader/entries | tr '\\n' ' ')\"", "MENU").split()
    assert "readonly-snapshot-1.conf" in menu and "readonly-snapshot-2.conf" in menu, menu
    once = guest.run('echo "ONCE=$(rastosctl --json snapshot boot-once 1 | grep -o \'readonly[^"]*\')"', "ONCE")
    assert once == "readonly-snapshot-1.conf"
    state = reboot_and_settle(guest, "the snapshot boots")
    assert state["kind"] == "snapshot" and state["snapshot"] == "1", state
    assert state["entry"] == "readonly-snapshot-1.conf" and state["root"] == "@snapshots/1/snapshot", state
    seen = guest.run('echo "ROOT=$(findmnt -no FSTYPE /) MOTD=$(grep -c changed /etc/motd)"', "ROOT")
    assert seen == "overlay MOTD=0", "the snapshot's root, as it was before the op"
    wrote = guest.run('echo in-memory > /etc/rastos-test && echo "WROTE=$(cat /etc/rastos-test)"', "WROTE")
    assert wrote == "in-memory", "the overlay takes writes"
    state = reboot_and_settle(guest, "the default entry boots again")
    assert state["kind"] == "deployment" and state["entry"] == "rastos-0.conf" and state["root"] == "@", state
    seen = guest.run('echo "MOTD=$(cat /etc/motd) KEPT=$(ls /etc/rastos-test 2>/dev/null | wc -l)"', "MOTD")
    assert seen == "changed KEPT=0", "the deployment as it was, without the snapshot boot's writes"


# A unit for the deployment under trial: its first boot hangs in userspace (a oneshot that never ends
# holds multi-user.target, so boot-complete.target is never reached), its second hangs hard (a panic
# with the kernel's own reboot off, so it stops dead). /root is in the deployment: the mark of the
# first try is there on the second.
HANG_UNIT = """[Unit]
Description=Hang this boot: in userspace the first time, hard the next
Before=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/hang-this-boot
[Install]
WantedBy=multi-user.target
"""
HANG_SCRIPT = """#!/bin/sh
if [ -e /root/hung-once ]; then
    sysctl -q kernel.panic=0
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger
fi
touch /root/hung-once && sync
exec sleep infinity
"""
# The deadline of the deployment under trial, shortened for the test (10 minutes as shipped).
SHORT_DEADLINE = "[Unit]\nJobTimeoutSec=20\n"


def write_into(guest: GuestConsole, path: str, text: str, mode: str = "644") -> None:
    encoded = base64.b64encode(text.encode()).decode()
    written = guest.run(
        f"mkdir -p $(dirname {path}) && echo {encoded} | base64 -d > {path} && chmod {mode} {path}; "
        f'echo "WRITTEN=$(sha256sum < {path} | cut -c1-16)"',
        "WRITTEN",
    )
    assert written == hashlib.sha256(text.encode()).hexdigest()[:16], f"{path} written in the guest"


def test_a_trial_boot_that_hangs_is_ended_and_falls_back(guest: GuestConsole) -> None:
    """A trial boot that never completes is rebooted by PID 1 when boot-complete.target's start job
    times out; one that hangs hard stops systemd's pings to the hardware watchdog, and QEMU's
    i6300esb resets the machine. Both use up a try, and the deployment that ran before boots again."""
    created = rollback_to_a_new_snapshot(guest, tries=FEW_TRIES)
    assert guest.run('echo "WATCHDOG=$(cat /sys/class/watchdog/watchdog0/state)"', "WATCHDOG") == "active"
    shipped = guest.run('echo "DEADLINE=$(systemctl show -P JobTimeoutUSec boot-complete.target)"', "DEADLINE")
    assert shipped == "10min"
    deployment = f"/.snapshots/{created}/deployment"
    write_into(guest, f"{deployment}/etc/systemd/system/boot-complete.target.d/zz-short.conf", SHORT_DEADLINE)
    write_into(guest, f"{deployment}/etc/systemd/system/hang-this-boot.service", HANG_UNIT)
    write_into(guest, f"{deployment}/usr/local/sbin/hang-this-boot", HANG_SCRIPT, mode="755")
    wants = f"{deployment}/etc/systemd/system/multi-user.target.wants"
    reboot(guest, f"mkdir -p {wants} && ln -s ../hang-this-boot.service {wants}/ && systemctl reboot")
    first_try = len(guest.seen)
    assert guest.wait_for_new(b"BdsDxe: starting", 300), "the deadline rebooted the hung trial boot"
    second_try = guest.seen.find(b"BdsDxe: starting", first_try)
    assert guest.wait_for_after(second_try, b"sysrq triggered crash", 300), "the second try hung hard"
    crashed = guest.seen.find(b"sysrq triggered crash", second_try)
    assert guest.wait_for_after(crashed, b"BdsDxe: starting", 300), "the watchdog reset the hung machine"
    reset = guest.seen.find(b"BdsDxe: starting", crashed)
    assert guest.wait_for_after(reset, PROMPT, 400), "after the tries run out, the previous deployment boots"
    fell_back_from(guest, created)
    # PID 1 says so only in the journal (/var/log is the host's, kept across deployments).
    timeouts = "journalctl -q -o cat | grep -c 'boot-complete.target/start timed out'"
    timed_out = guest.run(f'echo "TIMEOUTS=$({timeouts})"', "TIMEOUTS")
    assert timed_out == "1", "the deadline, not something else, ended the first try"
