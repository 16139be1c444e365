"""The minimal image boots under UEFI with systemd-boot, reaches multi-user with no failed unit,
runs on the expected btrfs subvolume, lists its boot entry, and blesses it (boot counting works); the
server profile boots through Debian's initramfs and answers SSH."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from guest_console import SavedGuest
from remote_guests import resume, ssh

from imagebuilder.vm import VmOptions, running_vm
from tests.ssh_fixtures import SshClient

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

BOOT_TIMEOUT = 300.0


async def ssh_banner(port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    try:
        return await asyncio.wait_for(reader.readline(), 60)
    finally:
        writer.close()


async def boot_and_report(options: VmOptions, folder: Path) -> tuple[dict[str, Any], int]:
    async with running_vm(options, folder / "console.log") as vm:
        report = await vm.wait_ready(BOOT_TIMEOUT)
        diagnostics = await vm.diagnostics()
        (folder / "boot-report.json").write_text(json.dumps({**report, **diagnostics}, indent=2))
        if "journal" in diagnostics:
            (folder / "journal.txt").write_text(diagnostics["journal"])
        status = await vm.powerdown()
        return report, status


def esp_entries(image: Path) -> list[str]:
    """Boot entry file names on the ESP of a qcow2 image, read without mounting anything."""
    raw = image.with_suffix(".check.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                          check=True).stdout)  # fmt: skip
        esp = next(p for p in table["partitiontable"]["partitions"] if p["name"] == "esp")
        listing = subprocess.run(["mdir", "-b", "-i", f"{raw}@@{esp['start'] * 512}", "::/loader/entries"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        return sorted(Path(line.strip()).name for line in listing.splitlines() if line.strip())
    finally:
        raw.unlink()


def test_boots_to_multi_user_on_its_subvolume_and_blesses_its_entry(minimal_image: Path, artifacts: Path) -> None:
    image = artifacts / "disk.qcow2"
    shutil.copyfile(minimal_image, image)
    assert esp_entries(image) == ["rastos-0+3.conf"]

    report, status = asyncio.run(boot_and_report(VmOptions(image=image), artifacts))

    assert report["state"] == "running", f"failed units: {report['failed_units']}"
    assert report["failed_units"] == []
    assert report["root"]["fstype"] == "btrfs"
    assert report["root"]["fsroot"] == "/@"
    assert "subvol=/@" in report["root"]["options"]
    # fstab's options for / were applied by the initrd, systemd's remount of / being masked.
    assert "compress=zstd:1" in report["root"]["options"].split(","), report["root"]
    assert "noatime" in report["root"]["mount_options"].split(","), report["root"]
    assert report["btrfs_mounts"] == {
        "/": "/@",
        "/home": "/@home",
        "/var/log": "/@var_log",
        "/var/lib/rastos": "/@rastos",
        "/.snapshots": "/@snapshots",
    }
    assert report["loader"]["entries"] == ["rastos-0.conf"]
    assert report["loader"]["selected"] == "rastos-0.conf"
    assert "rootflags=subvol=@" in report["cmdline"].split()
    # The daemon's memory is reported for the bench (its figure is there, not a test's threshold).
    print(f"rastosd RSS in the guest: {report['daemon']['rss_kb']} kB")
    assert report["daemon"]["answered"] and report["daemon"]["rss_kb"] > 0, report["daemon"]
    assert (
        0 < report["host_seconds_to_kernel"] < report["host_seconds_to_multi_user"] <= report["host_seconds_to_ready"]
    )
    # The boot's first call to rastosd was answered, before the report that waits for the whole boot.
    assert 0 < report["host_seconds_to_kernel"] < report["host_seconds_to_daemon"] <= report["host_seconds_to_ready"]
    # rastosd started before sysinit.target was reached (its Python imports beside the early boot), and
    # answered only after: the bus it waits on comes after basic.target.
    times = report["timestamps"]
    assert 0 < times["daemon_start_usec"] < times["sysinit_usec"] < report["daemon"]["first_answer_usec"], report
    # QEMU's watchdog, armed by systemd (profile [boot] watchdog): a hard hang resets the machine.
    assert "i6300ESB" in report["watchdog"].get("identity", ""), report["watchdog"]
    assert report["watchdog"].get("state") == "active" and report["watchdog"].get("timeout") == "30", report
    assert status == 0, "QEMU should exit cleanly after an ACPI power-off"
    # systemd-boot counted the try, and systemd-bless-boot marked the entry good once the boot
    # reached boot-complete.target: the counter is gone from its name.
    assert esp_entries(image) == ["rastos-0.conf"]


def test_snapshot_mode_leaves_the_image_unchanged(minimal_image: Path, artifacts: Path) -> None:
    image = artifacts / "pristine.qcow2"
    shutil.copyfile(minimal_image, image)
    before = image.read_bytes()
    report, _ = asyncio.run(boot_and_report(VmOptions(image=image, snapshot=True), artifacts))
    assert report["state"] == "running"
    assert image.read_bytes() == before
    assert esp_entries(image) == ["rastos-0+3.conf"]
    assert not image.with_name(image.name + ".efivars").exists()


def test_server_profile_boots_with_debians_initramfs_and_answers_ssh(
    saved_server: SavedGuest, ssh_client: SshClient, artifacts: Path
) -> None:
    """The server profile's boot is the one saved_server made (Debian's initramfs, OpenSSH): a copy of
    it resumed here is asked over SSH how that boot went."""
    guest = resume(saved_server, ssh_client, artifacts / "guest")
    try:
        port = guest.ssh_port()
        # Through QEMU's user networking and the forwarded port, to the guest's sshd.
        assert asyncio.run(ssh_banner(port)).startswith(b"SSH-2.0-OpenSSH")
        assert ssh(ssh_client, port, "systemctl is-system-running") == "running"
        # Debian's initramfs does not run systemd, so only the kernel saw it.
        assert ssh(ssh_client, port, "journalctl -k -b -q -o cat -g 'Freeing initrd memory'"), "booted an initrd"
        assert ssh(ssh_client, port, "ls /boot/initrd.img-*").count("initrd.img-") == 1, "Debian's initramfs"
        assert ssh(ssh_client, port, "findmnt --noheadings --output FSROOT /var/log") == "/@var_log"
        assert ssh(ssh_client, port, "systemctl show --property Result --value rastos-boot-report") == "success"
    finally:
        guest.close(artifacts / "console.log")
