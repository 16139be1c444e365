"""rastosctl -H over real SSH to a real rastosd, -M into a real mount namespace, and the errors of each
way of not getting there, each made as it happens on a real host (tests/ssh_fixtures.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.failpoints import VARIABLE as FAILPOINT_VARIABLE
from tests.daemon_fixtures import CHECKOUT, PLAIN_USER, STRICT_POLICY, PrivateBus, Rastosd, ScratchRoot, private_bus
from tests.ssh_fixtures import CTL, IN_NAMESPACE, SshClient, Sshd, bus_dir, closed_port, keygen, silent_listener, sshd
from tests.ssh_fixtures import client as client

pytestmark = pytest.mark.root


@pytest.fixture
def remote(rastosd: Rastosd, client: SshClient, tmp_path: Path) -> Iterator[Sshd]:
    """An sshd whose system bus is `rastosd`'s."""
    with sshd(tmp_path / "sshd", client, bus_dir(rastosd.bus.address)) as server:
        yield server


def test_status_over_ssh_is_the_status_on_the_bus(rastosd: Rastosd, remote: Sshd, client: SshClient) -> None:
    over_ssh = client.ctl("-H", remote.destination(), "--json", "status")
    assert over_ssh.returncode == 0, over_ssh.stderr
    assert json.loads(over_ssh.stdout) == json.loads(rastosd.ctl("--json", "status").stdout)
    text = client.ctl("-H", remote.destination(), "status")
    assert text.stdout == rastosd.ctl("status").stdout
    assert "Accepted publickey for root" in remote.log.read_text(), "it came through sshd"


def test_a_job_is_followed_live_and_its_exit_status_kept(rastosd: Rastosd, remote: Sshd, client: SshClient) -> None:
    applied = client.ctl("-H", remote.destination(), "apply", "motd", "text=over ssh")
    assert applied.returncode == 0, applied.stderr
    assert "wrote /etc/motd" in applied.stdout, "the job's output came as it ran"
    assert "step 1: motd changed" in applied.stdout
    assert (rastosd.scratch.root / "etc/motd").read_text() == "over ssh\n"
    assert client.ctl("-H", remote.destination(), "apply", "user", "name=svc", "uid=1500").returncode == 0
    clash = client.ctl("-H", remote.destination(), "--json", "apply", "user", "name=other", "uid=1500")
    assert clash.returncode == 3, clash.stderr
    assert json.loads(clash.stdout)["state"] == "failed"


def test_the_ssh_users_rights_decide(rastosd: Rastosd, remote: Sshd, client: SshClient) -> None:
    # useradd leaves the password "!", which sshd takes for a locked account and lets no key in for;
    # "*" has no password either, but is not locked.
    subprocess.run(["usermod", "--password", "*", PLAIN_USER], check=True)
    read = client.ctl("-H", remote.destination(PLAIN_USER), "--json", "status")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["hostname"] == "rastos"
    refused = client.ctl("-H", remote.destination(PLAIN_USER), "apply", "motd", "text=not yours")
    assert refused.returncode == 1
    # No polkit on the test's bus: rastosd's own check decides, and says so.
    assert "AccessDenied: Apply changes the host: only root or members of group 'rastos' may call it" in refused.stderr
    assert not (rastosd.scratch.root / "etc/motd").exists()


def unreachable(client: SshClient, destination: str, *args: str) -> str:
    """rastosctl's one error for a target it cannot reach: exit 1, and what it said."""
    result = client.ctl(*args, "-H", destination, "status")
    assert result.returncode == 1, result
    assert result.stdout == ""
    return result.stderr


def test_a_refused_port_is_unreachable(client: SshClient) -> None:
    port = closed_port()
    said = unreachable(client, f"root@127.0.0.1:{port}")
    assert said == f"rastosctl: root@127.0.0.1:{port}: connect to host 127.0.0.1 port {port}: Connection refused\n"


def test_a_host_that_never_answers_is_given_up_on(client: SshClient) -> None:
    with silent_listener() as port:
        said = unreachable(client, f"root@127.0.0.1:{port}", "--connect-timeout", "2")
    assert f"root@127.0.0.1:{port}: no answer within 2 s" in said
    assert "is the host up" in said


def empty_bus_dir(tmp_path: Path) -> Path:
    """A /run/dbus with no bus in it: a host whose dbus is not running."""
    directory = tmp_path / "no-bus"
    directory.mkdir()
    return directory


def test_a_refused_key_is_named(tmp_path: Path, client: SshClient) -> None:
    with sshd(tmp_path / "sshd", client, empty_bus_dir(tmp_path), authorized=False) as server:
        said = unreachable(client, server.destination())
    assert "the host refused the login (root@127.0.0.1: Permission denied (publickey).)" in said
    assert "authorized_keys" in said, "the hint says where the key goes"


def test_an_unknown_or_changed_host_key_is_named(tmp_path: Path, client: SshClient) -> None:
    with sshd(tmp_path / "sshd", client, empty_bus_dir(tmp_path)) as server:
        client.known_hosts.write_text("")
        said = unreachable(client, server.destination())
        assert "the host's key is not known here" in said and "ssh root@127.0.0.1" in said
        client.knows(server.port, keygen(tmp_path / "another-key"))
        said = unreachable(client, server.destination())
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in said


def test_a_host_without_the_bridge_is_named(tmp_path: Path, client: SshClient) -> None:
    # The login shell finds no systemd-stdio-bridge on its PATH, as on a host without systemd.
    with sshd(tmp_path / "sshd", client, empty_bus_dir(tmp_path), config=("SetEnv PATH=/nonexistent",)) as server:
        said = unreachable(client, server.destination())
    assert "the host has no systemd-stdio-bridge" in said and "not found" in said


def test_a_host_without_a_system_bus_is_named(tmp_path: Path, client: SshClient) -> None:
    with sshd(tmp_path / "sshd", client, empty_bus_dir(tmp_path)) as server:
        said = unreachable(client, server.destination())
    assert "logged in, but systemd-stdio-bridge there could not connect to the system bus" in said
    assert "Accepted publickey for root" in server.log.read_text()


def test_a_host_without_rastosd_is_named(tmp_path: Path, client: SshClient) -> None:
    with private_bus(STRICT_POLICY) as bus, sshd(tmp_path / "sshd", client, bus_dir(bus.address)) as server:
        said = unreachable(client, server.destination())
    assert said.startswith(f"rastosctl: {server.destination()}: rastosd is not running there")
    assert "systemctl status rastosd.service there" in said


def test_a_destination_that_is_not_one_is_a_usage_error(client: SshClient) -> None:
    for wrong in ("web-1:ssh", "web-1/container", "root@::1", "web-1:70000", "a b"):
        result = client.ctl("-H", wrong, "status")
        assert result.returncode == 2, (wrong, result)
        assert result.stderr.startswith(f"rastosctl: -H {wrong!r}: "), result.stderr


@contextlib.contextmanager
def container(name: str, bus_directory: Path) -> Iterator[None]:
    """A local container as sd-bus finds one: a process in a mount namespace of its own (where
    /run/dbus holds `bus_directory`'s bus), registered under `name` as systemd-machined registers one."""
    machines = Path("/run/systemd/machines")
    created = not machines.exists()
    machines.mkdir(parents=True, exist_ok=True)
    leader = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_NAMESPACE, "sh",
                               str(bus_directory), "sleep", "infinity"])  # fmt: skip
    try:
        (machines / name).write_text(f"LEADER={leader.pid}\nCLASS=container\n")
        yield
    finally:
        (machines / name).unlink(missing_ok=True)
        if created:
            machines.rmdir()
        leader.terminate()
        leader.wait(10)


def test_a_local_container_by_name(rastosd: Rastosd, client: SshClient) -> None:
    name = f"rastos-test-{os.getpid()}"
    with container(name, bus_dir(rastosd.bus.address)):
        inside = client.ctl("-M", name, "--json", "status")
    assert inside.returncode == 0, inside.stderr
    assert json.loads(inside.stdout) == json.loads(rastosd.ctl("--json", "status").stdout)
    missing = client.ctl("-M", name, "status")
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"rastosctl: container {name}: no container of that name is running here")


def test_a_connection_lost_during_a_command_is_named(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], client: SshClient, tmp_path: Path
) -> None:
    bus, scratch, state_dir = daemon_env
    # The job stops at its pre snapshot, so rastosctl is still following it when the connection goes.
    daemon = Rastosd(bus, scratch, state_dir, env={FAILPOINT_VARIABLE: "snapshot-written"})
    daemon.start()
    try:
        with sshd(tmp_path / "sshd", client, bus_dir(bus.address)) as server:
            argv = [*CTL, "-H", server.destination(), "apply", "motd", "text=cut"]
            with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
                                  env=client.env(), start_new_session=True) as following:  # fmt: skip
                # The step's progress crosses the bridge after the daemon reaches its failpoint, so the
                # connection is cut only once rastosctl has printed it: the client's own view, read as it comes.
                lines: list[str] = []
                reader = threading.Thread(target=lambda: lines.extend(iter(following.stderr.readline, "")))  # type: ignore[union-attr]
                reader.start()
                deadline = time.monotonic() + 30
                while "rastos failpoint snapshot-written reached" not in daemon.log_text() or not any(
                    "step 1/1: motd" in line for line in lines
                ):
                    assert time.monotonic() < deadline, (daemon.log_text(), lines)
                    time.sleep(0.05)
                for session in children(server.process.pid):  # sshd's process for this connection
                    os.kill(session, signal.SIGTERM)
                following.wait(timeout=30)
                reader.join(timeout=30)
                stderr = "".join(lines)
        assert following.returncode == 1, stderr
        assert "[  0%] step 1/1: motd" in stderr, "it was following the job"
        assert f"\nrastosctl: {server.destination()}: the connection was lost during the command" in stderr
        assert "rastosctl jobs there" in stderr
    finally:
        daemon.killed_at("snapshot-written")


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]
