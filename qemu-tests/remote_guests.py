"""Guests of the `server` profile reached over SSH, as an admin reaches hosts without a hub: root's key
given as a systemd credential at boot, sshd forwarded to a port of 127.0.0.1 by QEMU. The profile
boots once (Debian's initramfs: about a minute under TCG) and is saved; each host is then that saved
guest resumed on a disk of its own, in seconds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from guest_console import GuestConsole, SavedGuest, overlay

from tests.ssh_fixtures import SshClient


def ssh(client: SshClient, port: int, command: str, timeout: float = 300) -> str:
    """A command on a guest through its forwarded sshd; its output."""
    done = subprocess.run([str(client.bin / "ssh"), "-p", str(port), "root@127.0.0.1", command], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout.strip()


def known(client: SshClient, port: int) -> None:
    """The guest's host key, as an admin takes it on first contact (the guest is on this machine)."""
    scanned = subprocess.run(["ssh-keyscan", "-p", str(port), "-t", "ed25519", "127.0.0.1"], capture_output=True,
                             text=True, timeout=120, check=False).stdout  # fmt: skip
    assert scanned.strip(), f"no host key from port {port}"
    with client.known_hosts.open("a") as hosts:
        hosts.write(scanned)


def boot_and_save(image: Path, client: SshClient, folder: Path) -> SavedGuest:
    """`image` booted once with the client's key for root, its boot over and rastosd up, saved in `folder`."""
    disk = overlay(image, folder / "saved.qcow2")
    console = GuestConsole(
        disk, keep_changes=True, boot_args=("--credential", f"ssh.authorized_keys.root={client.public_key}")
    )
    try:
        assert console.wait_for(b"login:", 400), "the guest boots to its login prompt"
        port = console.ssh_port()
        known(client, port)
        assert ssh(client, port, "systemctl is-system-running --wait; systemctl is-active rastosd") == "running\nactive"
        console.save(folder / "state")
    finally:
        console.close(folder / "console.log")
    return SavedGuest(disk, folder / "state")


def resume(saved: SavedGuest, client: SshClient, folder: Path) -> GuestConsole:
    """One more host: the saved guest running again, its host key known, its clock set to this host's
    (it stood still while the guest was saved, and apt refuses a mirror's index dated in its future)."""
    folder.mkdir()
    guest = GuestConsole.resume(saved, folder)
    port = guest.ssh_port()
    known(client, port)
    ssh(client, port, f"date --set=@{time.time():.0f} >/dev/null")
    return guest
