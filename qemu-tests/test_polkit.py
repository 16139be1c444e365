"""Who may change a host, decided by polkit, and rastosd's sandbox as systemd rates it, in a booted guest
of the `server` profile (which has polkitd; remote_guests.py): a plain user refused naming the action, a
member of the admin group let in by the shipped rule, a sudoer let in once she types her password to
the agent her rastosctl starts, her answer kept for a while in a session at the machine and not over
SSH, and `systemd-analyze security` within its bounds."""

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
# chvt without the kbd package: VT_ACTIVATE, then VT_WAITACTIVE, on the console.
BRING_TO_FRONT = ("python3 -c 'import fcntl, os; console = os.open(\"/dev/tty0\", os.O_RDWR); "
                  "fcntl.ioctl(console, 0x5606, {0}); fcntl.ioctl(console, 0x5607, {0})'")  # fmt: skip
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
    # polkit's agent prints its prompt, then turns echo off with TCSAFLUSH, which throws away whatever was
    # typed in between: an answer that shows on the terminal came too early, was echoed and discarded.
    # It is typed again until one goes in unseen (CI once waited out polkit's 120 s for a lost answer).
    given: dict[bytes, int] = {}
    # A first login starts the user's systemd, then Python, polkit's agent, a password hash and a
    # snapshot: with two VMs on two cores, more than two minutes once in CI. The wait ends with the session.
    deadline = time.monotonic() + 300
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
                answer = pending.pop(prompt)
                os.write(controller, answer + b"\n")
                given[answer] = seen.count(answer)
            for answer, echoed in given.items():
                if seen.count(answer) > echoed:
                    os.write(controller, answer + b"\n")
                    given[answer] = seen.count(answer)
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

        # A sudoer, polkit's administrator on Debian: her rastosctl, on her terminal, starts polkit's text
        # agent for itself as systemctl does; she is asked for her password there, and let in once she
        # gives it.
        shown = on_a_terminal(ssh_client, port, "alice", "rastosctl apply motd text=alice; echo EXIT=$?",
                              {b"Password: ": PASSWORD.encode()})  # fmt: skip
        assert "AUTHENTICATING FOR org.rastos.Daemon1.apply" in shown and "EXIT=0" in shown, shown
        assert ssh(ssh_client, port, "cat /etc/motd") == "alice"
        alice = int(ssh(ssh_client, port, "id -u alice"))
        events = json.loads(ssh(ssh_client, port, "rastosctl --json log --limit 50"))
        assert "Apply" in [e["method"] for e in events if e["uid"] == alice], events
        # Over SSH her session is not local, so polkit keeps nothing (auth_admin): her next call that may
        # not ask is refused.
        again = ssh(ssh_client, port, f"runuser -u alice -- {apply_motd('again', False)} 2>&1; echo EXIT=$?")
        assert "org.rastos.Daemon1.apply" in again and "EXIT=1" in again, again

        # At the machine (a session on its seat's foreground virtual terminal) polkit keeps her answer
        # (auth_admin_keep): asked once, then let in without a prompt.
        keep_time_in_a_local_session(ssh_client, port)
    finally:
        guest.close(artifacts / "console.log")


# A client that stays (a UI, a script): one process, two calls. polkit keeps an answer for the process
# that gave it, so the second call, which may not ask, goes through only on the kept answer.
TWO_CALLS = """
import json, os, pathlib, sys, time
sys.path.insert(0, "/usr/lib/rastos/python")
from sdbus import sd_bus_open_system
from daemon.ctl_polkit import allow_interactive_authorization

def wait_for(name):
    while not pathlib.Path(name).exists():
        time.sleep(0.2)

def apply(text):
    call = bus.new_method_call_message("org.rastos.Daemon1", "/org/rastos/Daemon1", "org.rastos.Daemon1.Manager",
                                       "Apply")
    call.append_data("sst", "motd", json.dumps({"text": text}), 0)
    try:
        print("JOB", bus.call(call).get_contents(), flush=True)
    except Exception as error:
        print("REFUSED", type(error).__name__, error, flush=True)

bus = sd_bus_open_system()
pathlib.Path("/tmp/caller.pid").write_text(str(os.getpid()))
wait_for("/tmp/agent.ready")
assert allow_interactive_authorization(bus, True)
apply("local-first")
pathlib.Path("/tmp/first.done").touch()
wait_for("/tmp/agent.gone")
assert allow_interactive_authorization(bus, False)
apply("local-second")
pathlib.Path("/tmp/second.done").touch()
"""


def keep_time_in_a_local_session(client: SshClient, port: int) -> None:
    """Alice's session on tty2, the foreground terminal of seat0, as a login there makes it (PAM's `login`
    service, so pam_systemd registers it with logind), with no keyboard needed. Her client's first call
    is asked for her password by pkttyagent, registered for that process from her SSH terminal; the agent
    is then stopped, and the client's second call, which may not ask, is let in on the kept answer."""
    ssh(client, port, f"cat > /home/alice/two-calls.py <<'EOF'\n{TWO_CALLS}EOF")
    ssh(client, port, "systemd-run --unit=alice-at-the-machine --property=PAMName=login --property=TTYPath=/dev/tty2"
                      " --property=StandardInput=tty --property=StandardOutput=file:/tmp/two-calls.out"
                      " --property=StandardError=file:/tmp/two-calls.out --uid=alice python3 /home/alice/two-calls.py"
                      f" && {BRING_TO_FRONT.format(2)}")  # fmt: skip
    # Up to 300 s each, ended by the file: with two VMs on two cores, her first call (Python, polkit's
    # agent, the password's hash, a snapshot) once took more than the 60 s this wait had been.
    waited = "for i in $(seq 1500); do [ -e {0} ] && break; sleep 0.2; done; cat {0}"
    pid = ssh(client, port, waited.format("/tmp/caller.pid"))
    # Her session as polkit sees it, found from the process logind placed in it.
    session = ssh(client, port, f"loginctl show-session $(ps -o lsession= -p {pid}) --property=Seat"
                                " --property=Active --property=Remote --property=TTY")  # fmt: skip
    assert "Seat=seat0" in session and "Active=yes" in session and "Remote=no" in session, session
    agent = (f"pkttyagent --process {pid} --fallback < /dev/tty & sleep 3; touch /tmp/agent.ready; "
             f"{waited.format('/tmp/first.done')}; kill $!; wait; touch /tmp/agent.gone")  # fmt: skip
    shown = on_a_terminal(client, port, "alice", agent, {b"Password: ": PASSWORD.encode()})
    assert "org.rastos.Daemon1.apply" in shown, shown
    said = ssh(client, port, f"{waited.format('/tmp/second.done')}; cat /tmp/two-calls.out")
    jobs = re.findall(r"^JOB /org/rastos/Daemon1/job/(\d+)$", said, re.MULTILINE)
    assert len(jobs) == 2 and "REFUSED" not in said, said
    for job in jobs:
        assert json.loads(ssh(client, port, f"rastosctl --json job {job}"))["state"] == "done"
    assert ssh(client, port, "cat /etc/motd") == "local-second"
