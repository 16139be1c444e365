"""`rastos-image boot IMAGE`, the command the build prints: the serial console is on the terminal, a
person can log in (minimal logs root in by itself) and type commands, and powering off ends QEMU."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from guest_console import read_until

CHECKOUT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


def test_interactive_console_logs_in_and_powers_off(minimal_image: Path, artifacts: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebuilder", "boot", "--snapshot", str(minimal_image)],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=CHECKOUT, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = bytearray()
    try:
        assert read_until(controller, b"ssh -p ", 30, seen), "the ssh port is announced"
        assert read_until(controller, b"root@rastos:~#", 300, seen), "root is logged in on the serial console"
        os.write(controller, b"echo console-$((6*7))\r")
        assert read_until(controller, b"console-42", 60, seen), "a typed command runs in the guest"
        os.write(controller, b"systemctl poweroff\r")
        assert proc.wait(timeout=180) == 0
    finally:
        (artifacts / "console.log").write_bytes(bytes(seen))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session: QEMU too, not only its parent
            proc.wait()
        os.close(controller)
