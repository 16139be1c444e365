"""The security workflow in a VM: applied through rastosctl and confirmed, ssh stays reachable with a
key and refuses passwords, the firewall drops a port that answered before, and a compliance scan before
and after shows the checks it fixed."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import build_qcow2
from guest_console import PROMPT, GuestConsole

from imagebuilder.profile import load_profile
from imagebuilder.profile.host import host_steps
from imagebuilder.vm import free_port

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@test", "-f", key], check=True)
    return key


@pytest.fixture(scope="module")
def ssh_image(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path) -> Path:
    """The minimal image with OpenSSH and nftables, and an admin whose key the test holds; iproute2
    for `ss`, with which the test sees what listens in the guest."""
    folder = tmp_path_factory.mktemp("ssh-image")
    public = ssh_key.with_suffix(".pub").read_text().strip()
    (folder / "ssh.toml").write_text(
        'extends = "minimal"\n[packages]\ninclude = ["openssh-server", "nftables", "sudo", "iproute2"]\n'
        # The host name stays the default, set by the hostname op all the same: the console's prompt has it.
        '[system]\nenable = ["ssh.service"]\n[kernel.sysctl]\n"vm.swappiness" = 13\n'
        f'[[users]]\nname = "admin"\nsudo = true\nauthorized_keys = ["{public}"]\n'
    )
    return build_qcow2(folder / "ssh.toml", folder / "out")


def ssh(key: Path, port: int, *extra: str, command: str = "echo reached") -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", *extra,
            "admin@127.0.0.1", command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def http_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def failing_checks(guest: GuestConsole, name: str) -> set[str]:
    guest.run(f"rastosctl --json compliance scan > /root/{name}.json; echo SCANNED=$(echo $?)", "SCANNED", 300)
    listed = guest.run(
        "echo FAILING=$(python3 -c \"import json; r = json.load(open('/root/" + name + ".json')); "
        "print(','.join(c['id'] for c in r['checks'] if c['status'] == 'fail'))\")",
        "FAILING",
    )
    return set(filter(None, listed.split(",")))


def test_the_security_workflow_keeps_ssh_and_drops_a_closed_port(
    ssh_image: Path, ssh_key: Path, artifacts: Path
) -> None:
    ssh_port, web_port = free_port(), free_port()
    guest = GuestConsole(ssh_image, boot_args=("--ssh-port", str(ssh_port), "--forward", f"{web_port}:8080"))
    try:
        assert guest.wait_for(PROMPT, 300), "root is logged in on the serial console"
        states = guest.run("systemctl is-system-running --wait >/dev/null; "
                           "echo UNITS=$(systemctl is-active ssh rastosd | tr '\\n' ' ')", "UNITS", 240)  # fmt: skip
        assert states.split() == ["active", "active"]
        # The profile's host settings were set by the ops: the same settings, planned by rastosd on the
        # running host, are nothing to change (the build and the ops agree byte for byte).
        for step in host_steps(load_profile(ssh_image.parent.parent / "ssh.toml")):
            params = json.dumps(step["params"])
            planned = guest.run(f"echo PLANNED=$(rastosctl plan {step['op']} '{params}' 2>&1)", "PLANNED")
            assert planned == f"{step['op']}: nothing to change", (step, planned)
        guest.type("python3 -m http.server 8080 >/dev/null 2>&1 &")
        assert guest.run("sleep 2; echo LISTENING=$(ss -Htln 'sport = :8080' | wc -l)", "LISTENING") == "1"
        assert ssh(ssh_key, ssh_port).stdout.strip() == "reached"
        assert http_answers(web_port), "before the workflow, the port answers through the forward"
        before = failing_checks(guest, "before")
        assert {"ssh-no-password-auth", "firewall-input-drop"} <= before, before

        job = guest.run(
            "rastosctl --json workflow run security --set confirm_timeout=900 > /root/job.json; "
            "echo JOB=$(python3 -c \"import json; d = json.load(open('/root/job.json')); print(d['id'], d['state'])\")",
            "JOB", 600,
        )  # fmt: skip
        job_id, state = job.split()
        assert state == "done", guest.run("echo RESULT=$(tr -d '\\n' < /root/job.json)", "RESULT")
        assert guest.run(f"rastosctl confirm {job_id} >/dev/null; echo CONFIRMED=$(echo $?)", "CONFIRMED") == "0"

        assert ssh(ssh_key, ssh_port).stdout.strip() == "reached", "a new ssh session with the key gets in"
        refused = ssh(ssh_key, ssh_port, "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password")
        assert refused.returncode != 0 and "publickey" in refused.stderr and "password" not in refused.stderr.split(
            "Permission denied", 1)[-1], refused.stderr  # fmt: skip
        assert not http_answers(web_port), "the firewall drops the port no one opened"
        listing = guest.run("echo POLICY=$(nft list chain inet rastos input | grep -c 'policy drop')", "POLICY")
        assert listing == "1"

        after = failing_checks(guest, "after")
        fixed = before - after
        assert {"ssh-no-password-auth", "firewall-input-drop"} <= fixed, (before, after)
        assert not after - before, f"nothing newly failing: {after - before}"
        total = guest.run("echo TOTAL=$(python3 -c \"import json; print(len(json.load(open('/root/after.json'))"
                          "['checks']))\")", "TOTAL")  # fmt: skip
        assert int(total) >= 30
    finally:
        guest.close(artifacts / "console.log")


def test_a_reload_owed_when_the_daemon_died_runs_at_its_next_start(ssh_image: Path, artifacts: Path) -> None:
    """rastosd is stopped between writing sshd's drop-in and reloading sshd (a failpoint); systemd
    restarts it, and its start runs the reload it owed: sshd listens on the new port."""
    guest = GuestConsole(ssh_image)
    try:
        assert guest.wait_for(PROMPT, 300), "root is logged in on the serial console"
        guest.run("systemctl is-system-running --wait >/dev/null; echo UP=$(systemctl is-active rastosd)", "UP", 240)
        guest.type("systemctl set-environment RASTOS_TEST_FAILPOINT=follow-ups-owed; systemctl restart rastosd")
        position = len(guest.seen)
        guest.type("rastosctl apply --no-wait ssh port=2222 confirm_timeout=0")
        assert guest.wait_for_after(position, b"rastos failpoint follow-ups-owed reached", 120)
        assert guest.run("echo BEFORE=$(ss -Htln 'sport = :2222' | wc -l)", "BEFORE") == "0", "not reloaded yet"
        guest.type("systemctl unset-environment RASTOS_TEST_FAILPOINT; systemctl kill -s KILL rastosd")
        listening = guest.run(
            "for i in $(seq 60); do [ \"$(ss -Htln 'sport = :2222' | wc -l)\" -ge 1 ] && break; sleep 1; done; "
            "echo AFTER=$(ss -Htln 'sport = :2222' | wc -l)",
            "AFTER", 180,
        )  # fmt: skip
        # sshd listens on IPv4 and IPv6: two sockets
        assert int(listening) >= 1, "the restarted daemon ran the reload it owed"
        outcome = guest.run(
            "echo OUTCOME=$(rastosctl --json log --limit 1000 | python3 -c \"import json, sys; "
            "print([e['detail']['outcome'] for e in json.load(sys.stdin) if e['method'] == 'FollowUp'])\")",
            "OUTCOME",
        )  # fmt: skip
        assert outcome == "['done']", outcome
    finally:
        guest.close(artifacts / "console.log")
