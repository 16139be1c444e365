"""Drive `rastos-image boot` through a pseudo-terminal, as a person at the serial console would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from imagebuilder.vm import VmOptions, choose_accel, efivars_path, find_firmware, image_format, qemu_argv

CHECKOUT = Path(__file__).resolve().parents[1]
PROMPT = b"root@rastos:~#"


async def _qmp_quit(socket_path: str) -> None:
    client = QMPClient("rastos-power-cut")
    await client.connect(socket_path)
    with contextlib.suppress(Exception):  # QEMU may close the connection before it answers
        await client.execute("quit")
    with contextlib.suppress(Exception):
        await client.disconnect()


def read_until(fd: int, wanted: bytes, timeout: float, seen: bytearray) -> bool:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed: QEMU is gone
                return wanted in seen
            if not chunk:
                return wanted in seen
            seen += chunk
    return True


@dataclass(frozen=True)
class SavedGuest:
    """A guest booted once, logged in on its console and settled, then saved: its disk as a qcow2
    overlay (its UEFI variables beside it, as `rastos-image boot` keeps them) and its memory and devices
    as QEMU's migration stream in a file. Resuming it costs seconds where a boot under TCG costs tens."""

    disk: Path
    state: Path


def overlay(backing: Path, disk: Path) -> Path:
    """A new qcow2 whose unwritten blocks read from `backing`, and a copy of backing's UEFI variables."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", image_format(backing), "-b", str(backing), str(disk)],
        check=True,
    )  # fmt: skip
    if efivars_path(backing).is_file():
        shutil.copyfile(efivars_path(backing), efivars_path(disk))
    return disk


async def _query(client: QMPClient, command: str) -> object:
    """The `status` of a QMP query's answer (query-status, query-migrate)."""
    answer = await client.execute(command)
    return answer.get("status") if isinstance(answer, dict) else None


async def _qmp_cpu_state(socket_path: str) -> str:
    """What QEMU says the guest's CPUs are doing: its run state and, sampled twice, each CPU's
    instruction pointer (firmware addresses lie below 4 GiB, the kernel's at 0xffffffff8...)."""
    client = QMPClient("rastos-state")
    await client.connect(socket_path)
    try:
        lines = [f"status: {await _query(client, 'query-status')}"]
        for sample in range(2):
            registers = await client.execute("human-monitor-command", {"command-line": "info registers -a"})
            pointers = re.findall(r"RIP=([0-9a-f]+)", str(registers))
            lines.append(f"sample {sample}: RIP {' '.join(pointers)}")
            await asyncio.sleep(0.5)
        return "\n".join(lines)
    finally:
        await client.disconnect()


async def _qmp_save(socket_path: str, state: Path) -> None:
    client = QMPClient("rastos-save")
    await client.connect(socket_path)
    await client.execute("migrate", {"uri": f"file:{state}"})
    while (status := await _query(client, "query-migrate")) not in ("completed", "failed"):
        await asyncio.sleep(0.2)
    assert status == "completed", "QEMU could not save the guest"
    with contextlib.suppress(Exception):  # QEMU may close the connection before it answers
        await client.execute("quit")
    with contextlib.suppress(Exception):
        await client.disconnect()


async def _qmp_wait_running(socket_path: str, timeout: float) -> None:
    client = QMPClient("rastos-resume")
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.connect(socket_path)
            break
        except Exception:
            assert time.monotonic() < deadline, "QEMU opened no QMP socket"
            await asyncio.sleep(0.1)
    try:
        while await _query(client, "query-status") != "running":
            assert time.monotonic() < deadline, "the saved guest did not resume"
            await asyncio.sleep(0.1)
    finally:
        await client.disconnect()


class GuestConsole:
    """`rastos-image boot --snapshot IMAGE` on a pty; `seen` keeps everything the console printed.
    With `keep_changes`, the guest writes to IMAGE itself (and its UEFI variables beside it), so a
    later GuestConsole boots what this one left: the power-cut tests need that. `resume` gives a
    console on a saved guest instead of a boot."""

    def __init__(self, image: Path, *, keep_changes: bool = False, boot_args: tuple[str, ...] = ()) -> None:
        snapshot = [] if keep_changes else ["--snapshot"]
        self._spawn([sys.executable, "-m", "imagebuilder", "boot", *snapshot, *boot_args, str(image)])
        self.qmp_socket: str | None = None  # printed by `rastos-image boot`
        self.forwarded_ssh: int | None = None  # likewise

    def _spawn(self, argv: list[str]) -> None:
        self.controller, terminal = pty.openpty()
        self.process = subprocess.Popen(
            argv, stdin=terminal, stdout=terminal, stderr=terminal, cwd=CHECKOUT, start_new_session=True
        )
        os.close(terminal)
        self.seen = bytearray()
        self.prompt = PROMPT  # the shell's, which names the host: a test that renames it says so here

    @classmethod
    def resume(cls, saved: SavedGuest, folder: Path) -> GuestConsole:
        """The saved guest, running again on a disk of its own (`folder`/disk.qcow2, over the saved
        one): QEMU started with the same machine as `rastos-image boot` and `-incoming` from the saved
        state. A fresh prompt is asked for, so the caller waits for PROMPT as after a boot."""
        disk = overlay(saved.disk, folder / "disk.qcow2")
        scratch = folder / "vm"
        scratch.mkdir()
        firmware = find_firmware()
        options = VmOptions(image=disk)
        argv = qemu_argv(
            options, accel=choose_accel("auto", firmware), firmware=firmware,
            vars_file=efivars_path(disk), qmp_socket=scratch / "qmp.sock", status_socket=scratch / "status.sock",
            console=["-serial", "mon:stdio"],
        )  # fmt: skip
        guest = cls.__new__(cls)
        guest._spawn([*argv, "-incoming", f"file:{saved.state}"])
        guest.qmp_socket = str(scratch / "qmp.sock")
        guest.forwarded_ssh = options.ssh_port
        asyncio.run(_qmp_wait_running(guest.qmp_socket, 120))
        os.write(guest.controller, b"\r")
        return guest

    def save(self, state: Path) -> None:
        """Save the running guest to `state` (QMP migrate to a file) and stop QEMU: the disk it wrote
        is then the saved one. Call it at a shell prompt on a settled system."""
        asyncio.run(_qmp_save(self.qmp_path(), state))
        self.process.wait(60)

    def ssh_port(self) -> int:
        """The port of 127.0.0.1 forwarded to the guest's sshd (`rastos-image boot` prints it)."""
        deadline = time.monotonic() + 60
        while self.forwarded_ssh is None:
            if match := re.search(rb"ssh -p (\d+)", bytes(self.seen)):
                self.forwarded_ssh = int(match.group(1))
            else:
                assert time.monotonic() < deadline, "rastos-image boot printed no ssh port"
                self._read_some(1.0)
        return self.forwarded_ssh

    def qmp_path(self) -> str:
        if self.qmp_socket is None:
            match = re.search(rb"QMP: (\S+)", bytes(self.seen))
            assert match is not None, "rastos-image boot printed no QMP socket"
            self.qmp_socket = match.group(1).decode()
        return self.qmp_socket

    def wait_for(self, wanted: bytes, timeout: float) -> bool:
        return read_until(self.controller, wanted, timeout, self.seen)

    def wait_for_new(self, wanted: bytes, timeout: float) -> bool:
        """Like wait_for, but only output from now on counts (a prompt after a reboot)."""
        if self.process.poll() is not None:
            return False
        return self._wait_after(len(self.seen), wanted, timeout)

    def type(self, line: str, echo_timeout: float = 45) -> None:
        """Type a line and wait for the shell to echo it. Seen in CI: a line typed right after the
        first prompt was lost (never echoed, as if the terminal's input was flushed); a line that is
        not echoed within `echo_timeout` is typed once more."""
        for _ in range(2):
            start = len(self.seen)
            os.write(self.controller, line.encode() + b"\r")
            deadline = time.monotonic() + echo_timeout
            while line[:24].encode() not in self.seen[start:] and time.monotonic() < deadline:
                self._read_some(1.0)
            if line[:24].encode() in self.seen[start:]:
                return
        raise AssertionError(f"the guest's shell never echoed {line[:40]!r}")

    def run(self, command: str, marker: str, timeout: float = 120) -> str:
        """Type `command`, which must print `marker=` and its answer on one line; return the answer,
        once the shell's prompt is back (so the next line typed goes to the shell, not to the terminal's
        raw echo). The echo of the typed line shows `marker=$(...`, the command's output does not: the
        text after a line's last `marker=` tells them apart, also when the terminal echoed the typed
        line raw in front of the prompt. (bash's bracketed-paste sequences may precede the answer.)"""
        start = len(self.seen)
        self.type(command)
        needle = f"{marker}=".encode()
        deadline = time.monotonic() + timeout
        while True:
            offset = start
            for line in bytes(self.seen[start:]).split(b"\n"):
                answer = line.rsplit(needle, 1)[1] if needle in line else b"$("
                offset += len(line) + 1
                if line.endswith(b"\r") and not answer.startswith(b"$("):
                    self._wait_after(offset, self.prompt, 60)
                    return answer.decode(errors="replace").strip()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker}= line within {timeout}s"
            self._read_some(min(remaining, 5.0))

    def assert_up(self) -> None:
        """The boot finished with no failed unit (the failed ones are named if not), and rastosd runs."""
        state = self.run("echo STATE=$(systemctl is-system-running --wait)", "STATE", 240)
        assert state == "running", self.run("echo FAILED=$(systemctl --failed --plain --no-legend | tr '\\n' ' ')",
                                            "FAILED")  # fmt: skip
        assert self.run("echo DAEMON=$(systemctl is-active rastosd)", "DAEMON") == "active"

    def wait_for_after(self, position: int, wanted: bytes, timeout: float) -> bool:
        """Like wait_for, but only output after `position` in `seen` counts: for a message that may
        have come in the same read as the one before it (a reboot right after a failure message)."""
        return self._wait_after(position, wanted, timeout)

    def _wait_after(self, position: int, wanted: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while wanted not in self.seen[position:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._read_some(min(remaining, 5.0))
        return True

    def _read_some(self, timeout: float) -> None:
        ready, _, _ = select.select([self.controller], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):  # QEMU is gone; the caller's deadline ends the wait
                self.seen += os.read(self.controller, 4096)

    def power_cut(self) -> None:
        """Stop the VM at once through QMP `quit`: no shutdown, and whatever the guest had not written
        to its disk is lost, as in a power cut."""
        asyncio.run(_qmp_quit(self.qmp_path()))
        self.process.wait(60)

    def _cpu_state(self) -> bytes:
        """The CPUs' state for the log while QEMU still runs: a guest that stalled with a quiet console
        (seen once in CI, between systemd-boot and the kernel's first line) says at least where."""
        if self.process.poll() is not None:
            return b""
        try:
            state = asyncio.run(asyncio.wait_for(_qmp_cpu_state(self.qmp_path()), 10))
        except Exception as error:  # a diagnosis must not fail the test's own teardown
            state = f"no CPU state from QMP: {error!r}"
        return f"\n=== QEMU at close ===\n{state}\n".encode()

    def close(self, log: Path) -> None:
        """Keep the console's log and stop the session; a second call does nothing."""
        if self.controller < 0:
            return
        log.write_bytes(bytes(self.seen) + self._cpu_state())
        # The whole session: stopping only `rastos-image boot` would leave its QEMU running, orphaned.
        # SIGTERM first, so that it removes its scratch directory; SIGKILL if that takes too long.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.controller)
        self.controller = -1


def settled(guest: GuestConsole) -> None:
    """Wait until the boot is over: rastosd up, the health check run, the entry blessed."""
    assert guest.run('systemctl is-system-running --wait; echo "UP=$(systemctl is-active rastos-health)"', "UP",
                     300) == "active"  # fmt: skip
