"""Who may change a host, decided by polkit, and rastosd's sandbox as systemd rates it, in a booted guest
of the `server` profile (which has polkitd; remote_guests.py): a plain user refused naming the action, a
member of the admin group let in by the shipped rule, a sudoer let in once she types her password to
pkttyagent, and `systemd-analyze security` within its bounds."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
from guest_console import SavedGuest
from remote_guests import resume, ssh

from tests.ssh_fixtures import SshClient

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


def apply_motd(text: str, interactive: bool) -> str:
    """Manager.Apply of the motd op through busctl, which sets the call's interactive flag when asked."""
    allow = "yes" if interactive else "no"
    return (f"busctl --allow-interactive-authorization={allow} call org.rastos.Daemon1 /org/rastos/Daemon1 "
            f"org.rastos.Daemon1.Manager Apply sst motd '{{\"text\":\"{text}\"}}' 0")  # fmt: skip


PASSWORD = "correct horse battery staple"
# The bounds tests/test_units_security.py holds the units to, rated offline on the build host; here by
# the guest's own systemd, on the units as installed.
EXPOSURE = {"rastosd.service": 6.0, "rastos-health.service": 4.0, "rastos-boot-report.service": 4.0,
            "rastos-boot-probe.service": 4.0}  # fmt: skip


def exposure(client: SshClient, port: int, unit: str) -> float:
    rated = ssh(client, port, f"systemd-analyze security --no-pager {unit} | tail -1")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated)
    assert match is not None, rated
    return float(match.group(1))


def on_a_terminal(client: SshClient, port: int, user: str, command: str, answers: dict[bytes, bytes]) -> str:
    """`command` in a login of `user`'s own over SSH, on a terminal (pkttyagent asks on it); each prompt
    in `answers` is answered once it shows. Everything the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(client.bin / "ssh"), "-tt", "-p", str(port), f"{user}@127.0.0.1", command],
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen, pending = b"", dict(answers)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the session ended
                    break
                if not chunk:
                    break
                seen += chunk
            for prompt in [p for p in pending if p in seen]:
                os.write(controller, pending.pop(prompt) + b"\n")
            if process.poll() is not None and not ready:
                break
        return seen.decode(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        os.close(controller)


def test_polkit_decides_who_may_change_the_host_and_the_units_are_sandboxed(
    saved_server: SavedGuest, ssh_client: SshClient, artifacts: Path
) -> None:
    guest = resume(saved_server, ssh_client, artifacts / "guest")
    try:
        port = guest.ssh_port()
        for unit, bound in EXPOSURE.items():
            assert exposure(ssh_client, port, unit) <= bound, f"{unit} is rated above {bound}"
        journal = ssh(ssh_client, port, "journalctl --boot --unit rastosd --no-pager --output cat")
        assert "access: polkit decides" in journal, journal[-2000:]

        ssh(ssh_client, port, "useradd --create-home carol && useradd --create-home --groups rastos dave"
                              " && useradd --create-home --groups sudo alice"
                              f" && echo 'alice:{PASSWORD}' | chpasswd"
                              " && install -d -o alice -m 700 /home/alice/.ssh"
                              " && install -o alice -m 600 /root/.ssh/authorized_keys /home/alice/.ssh/")  # fmt: skip
        # A plain user: refused, the action named, /etc/motd untouched.
        motd = ssh(ssh_client, port, "sha256sum /etc/motd")
        refused = ssh(ssh_client, port, f"runuser -u carol -- {apply_motd('carol', False)} 2>&1; echo EXIT=$?")
        assert "org.rastos.Daemon1.apply" in refused and "EXIT=1" in refused, refused
        assert ssh(ssh_client, port, "sha256sum /etc/motd") == motd

        # A member of the admin group: the shipped rule lets them in, no password asked.
        done = ssh(ssh_client, port, "runuser -u dave -- rastosctl --json apply motd text=dave; echo EXIT=$?")
        assert done.endswith("EXIT=0"), done
        assert ssh(ssh_client, port, "cat /etc/motd") == "dave"

        # A sudoer, polkit's administrator on Debian: asked for her password on her terminal by pkttyagent,
        # and let in once she gives it. polkit asks the agent registered for the calling process, so the
        # agent is started for this shell's process, which then becomes busctl (exec keeps the process).
        script = f"pkttyagent --process $$ --fallback < /dev/tty &\nsleep 3\nexec {apply_motd('alice', True)}\n"
        ssh(ssh_client, port, f"cat > /home/alice/ask <<'EOF'\n{script}EOF")
        shown = on_a_terminal(ssh_client, port, "alice", "sh /home/alice/ask; echo EXIT=$?",
                              {b"Password: ": PASSWORD.encode()})  # fmt: skip
        assert "org.rastos.Daemon1.apply" in shown and "EXIT=0" in shown, shown
        job = re.search(r'o "/org/rastos/Daemon1/job/(\d+)"', shown)
        assert job is not None, shown
        assert json.loads(ssh(ssh_client, port, f"rastosctl --json job {job.group(1)}"))["state"] == "done"
        assert ssh(ssh_client, port, "cat /etc/motd") == "alice"
        alice = int(ssh(ssh_client, port, "id -u alice"))
        events = json.loads(ssh(ssh_client, port, "rastosctl --json log --limit 50"))
        assert "Apply" in [e["method"] for e in events if e["uid"] == alice], events
    finally:
        guest.close(artifacts / "console.log")
