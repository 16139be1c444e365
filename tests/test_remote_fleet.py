"""rastosctl --inventory: one command on two real rastosd hosts reached through real sshds, and a third
host that cannot be reached; each host's record, the final table, the exit status, --fail-fast,
--parallel and the inventory's variables."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_fixtures import CHECKOUT, STRICT_POLICY, Rastosd, private_bus, scratch_root
from tests.ssh_fixtures import CTL, SshClient, Sshd, bus_dir, closed_port, silent_listener, sshd

pytestmark = pytest.mark.root
# Host b has an account with uid 1500 already, so a step that creates one with that uid fails there only.
PIPELINE = (
    '[[step]]\nop = "motd"\nparams = { text = "fleet" }\n[[step]]\nop = "user"\nparams = { name = "svc", uid = 1500 }\n'
)


@dataclass
class Fleet:
    a: Rastosd
    b: Rastosd
    ssh_a: Sshd
    ssh_b: Sshd
    client: SshClient
    directory: Path

    def inventory(self, *order: str, extra: str = "") -> Path:
        """An inventory of hosts a, b and c (c's port refuses connections), in this order; group web is
        a and b."""
        entries = {
            "a": f'address = "127.0.0.1"\nuser = "root"\nport = {self.ssh_a.port}\n',
            "b": f'address = "127.0.0.1"\nuser = "root"\nport = {self.ssh_b.port}\nvars = {{ ssh_port = 2200 }}\n',
            "c": f'address = "127.0.0.1"\nuser = "root"\nport = {closed_port()}\n',
        }
        text = "".join(f'[[host]]\nname = "{name}"\n{entries[name]}\n' for name in order or ("a", "b", "c"))
        path = self.directory / f"inventory-{len(list(self.directory.glob('inventory-*')))}.toml"
        path.write_text(text + '[group.web]\nhosts = ["a", "b"]\nvars = { ssh_port = 2222 }\n' + extra)
        return path


@contextlib.contextmanager
def second_rastosd(directory: Path) -> Iterator[Rastosd]:
    directory.mkdir()
    with private_bus(STRICT_POLICY) as bus, scratch_root(directory) as scratch:
        daemon = Rastosd(bus, scratch, directory / "state")
        daemon.start()
        try:
            yield daemon
        finally:
            assert daemon.stop() == 0, daemon.log_text()


@pytest.fixture
def fleet(rastosd: Rastosd, tmp_path: Path) -> Iterator[Fleet]:
    client = SshClient(tmp_path / "client")
    with (
        second_rastosd(tmp_path / "b") as b,
        sshd(tmp_path / "sshd-a", client, bus_dir(rastosd.bus.address)) as ssh_a,
        sshd(tmp_path / "sshd-b", client, bus_dir(b.bus.address)) as ssh_b,
    ):
        passwd = b.scratch.root / "etc/passwd"
        passwd.write_text(passwd.read_text() + "taken:x:1500:1500::/nonexistent:/usr/sbin/nologin\n")
        yield Fleet(rastosd, b, ssh_a, ssh_b, client, tmp_path)


def records(stdout: str) -> dict[str, dict[str, Any]]:
    """--json's records by host: one JSON object a line."""
    found = [json.loads(line) for line in stdout.splitlines()]
    return {record["host"]: record for record in found}


def blocks(stdout: str) -> dict[str, str]:
    """Each host's block of text output by host (they come in the order the hosts ended)."""
    parts = ("\n" + stdout).split("\n== ")[1:]
    return {part.split(" ", 1)[0]: "== " + part for part in parts}


def test_every_host_runs_the_command_and_each_is_reported(fleet: Fleet) -> None:
    steps = fleet.directory / "site.toml"
    steps.write_text(PIPELINE)
    inventory = fleet.inventory()
    ran = fleet.client.ctl("--inventory", str(inventory), "--json", "pipeline", "run", str(steps))
    by_host = records(ran.stdout)
    assert set(by_host) == {"a", "b", "c"}, ran
    assert by_host["a"]["outcome"] == "changed" and by_host["a"]["exit"] == 0
    assert [s["state"] for s in by_host["a"]["result"]["steps"]] == ["changed", "changed"]
    assert by_host["b"]["outcome"] == "failed" and by_host["b"]["exit"] == 3, "b's step failed"
    assert [s["state"] for s in by_host["b"]["result"]["steps"]] == ["changed", "failed"], "&& on each host"
    assert by_host["c"]["outcome"] == "unreachable" and by_host["c"]["result"] is None
    assert by_host["c"]["error"]["reason"] == "unreachable"
    assert "Connection refused" in by_host["c"]["error"]["message"]
    assert ran.returncode == 3, "the exit status of the first host that did not succeed, b"
    assert (fleet.a.scratch.root / "etc/motd").read_text() == "fleet\n", "b's failure did not stop a"
    assert (fleet.b.scratch.root / "etc/motd").read_text() == "fleet\n"

    again = fleet.client.ctl("--inventory", str(inventory), "--limit", "web", "pipeline", "run", str(steps))
    assert again.returncode == 3
    shown = blocks(again.stdout)
    assert set(shown) == {"a", "b"}, "--limit web leaves c out"
    assert shown["a"].startswith(f"== a (root@127.0.0.1:{fleet.ssh_a.port}): unchanged\njob ")
    assert shown["b"].startswith(f"== b (root@127.0.0.1:{fleet.ssh_b.port}): failed\njob ")
    lines = again.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("HOST "))) :]
    assert table[0].split() == ["HOST", "RESULT", "EXIT", "TIME", "ERROR"]
    assert table[1].split()[:3] == ["a", "unchanged", "0"]
    assert table[2].split()[:3] == ["b", "failed", "3"] and "job " in table[2], "the failed job's first line"
    assert table[3:] == ["", "2 hosts: 1 unchanged, 1 failed"]


def test_fail_fast_starts_no_host_after_one_failed(fleet: Fleet) -> None:
    inventory = fleet.inventory("c", "a", "b")
    ran = fleet.client.ctl("--inventory", str(inventory), "--parallel", "1", "--fail-fast", "--json",
                           "apply", "motd", "text=not after c")  # fmt: skip
    by_host = records(ran.stdout)
    assert [by_host[h]["outcome"] for h in "cab"] == ["unreachable", "skipped", "skipped"]
    assert ran.returncode == 1, "c's status: unreachable"
    assert not (fleet.a.scratch.root / "etc/motd").exists()
    without = fleet.client.ctl("--inventory", str(inventory), "--parallel", "1", "--json", "apply", "motd", "text=x")
    assert [records(without.stdout)[h]["outcome"] for h in "cab"] == ["unreachable", "changed", "changed"]


def test_variables_come_from_groups_then_the_host_then_set(fleet: Fleet) -> None:
    inventory = fleet.inventory("a", "b")

    def ssh_ports(*extra: str) -> dict[str, int]:
        shown = fleet.client.ctl("--inventory", str(inventory), "--json", "workflow", "show", "security", *extra)
        assert shown.returncode == 0, shown
        steps = {host: record["result"] for host, record in records(shown.stdout).items()}
        return {host: next(s["params"]["port"] for s in steps[host] if s["op"] == "ssh") for host in steps}

    assert ssh_ports() == {"a": 2222, "b": 2200}
    assert ssh_ports("--set", "ssh_port=22") == {"a": 22, "b": 22}


@dataclass
class BlackHoles:
    """Ports that accept connections and never say a word (hung hosts: ssh waits for a banner that never
    comes), counting how many of their connections were open at once."""

    ports: list[int]
    open_now: int = 0
    most_at_once: int = 0


@contextlib.contextmanager
def black_holes(count: int) -> Iterator[BlackHoles]:
    listeners = []
    for _ in range(count):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        listeners.append(listener)
    holes = BlackHoles([listener.getsockname()[1] for listener in listeners])
    selector = selectors.DefaultSelector()
    for listener in listeners:
        selector.register(listener, selectors.EVENT_READ, "listener")
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for key, _ in selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "listener":
                    connection, _ = sock.accept()
                    selector.register(connection, selectors.EVENT_READ, "connection")
                    holes.open_now += 1
                    holes.most_at_once = max(holes.most_at_once, holes.open_now)
                elif not sock.recv(4096):  # the client gave up and closed
                    selector.unregister(sock)
                    sock.close()
                    holes.open_now -= 1

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield holes
    finally:
        stop.set()
        watcher.join()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


def test_parallel_bounds_how_many_hosts_are_waited_on_at_once(tmp_path: Path) -> None:
    client = SshClient(tmp_path / "client")
    for parallel, expected in (("3", 3), ("1", 1)):
        with black_holes(3) as holes:
            inventory = tmp_path / "silent.toml"
            inventory.write_text("".join(f'[[host]]\nname = "h{port}"\naddress = "127.0.0.1"\nport = {port}\n'
                                         for port in holes.ports))  # fmt: skip
            ran = client.ctl("--inventory", str(inventory), "--parallel", parallel, "--connect-timeout", "2", "--json",
                             "status")  # fmt: skip
            assert [r["error"]["reason"] for r in records(ran.stdout).values()] == ["no-answer"] * 3
            assert holes.most_at_once == expected, f"--parallel {parallel}: {holes.most_at_once} hosts at once"


def on_a_terminal(client: SshClient, *args: str) -> tuple[int, str]:
    """rastosctl with stdout and stderr on a pseudo-terminal, as in a person's shell; its exit status and
    all it wrote there."""
    controller, terminal = os.openpty()
    env = {**client.env(), "COLUMNS": "200", "TERM": "xterm"}
    with subprocess.Popen([*CTL, *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=CHECKOUT,
                          env=env, start_new_session=True) as process:  # fmt: skip
        os.close(terminal)
        written = b""
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while chunk := os.read(controller, 65536):
                written += chunk
        status = process.wait(60)
    os.close(controller)
    return status, written.decode(errors="replace")


def test_on_a_terminal_each_host_is_shown_live_and_the_table_stays(fleet: Fleet) -> None:
    status, written = on_a_terminal(fleet.client, "--inventory", str(fleet.inventory()), "apply", "motd", "text=tty")
    assert status == 1, written
    assert "\x1b[" in written, "rich drew on the terminal"
    assert f"== a (root@127.0.0.1:{fleet.ssh_a.port}): changed" in written
    assert "step 1: motd changed" in written
    assert "Connection refused" in written
    assert "3 hosts: 2 changed, 1 unreachable" in written
    assert "Traceback" not in written


def ssh_processes(port: int) -> list[str]:
    """The command lines of ssh processes to this port, whoever started them."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv[0].endswith(b"ssh") and str(port).encode() in argv:
                found.append(" ".join(a.decode() for a in argv))
    return found


def test_an_interrupt_ends_every_hosts_ssh(tmp_path: Path) -> None:
    client = SshClient(tmp_path / "client")
    with silent_listener() as one, silent_listener() as two:
        inventory = tmp_path / "silent.toml"
        inventory.write_text("".join(f'[[host]]\nname = "h{port}"\naddress = "127.0.0.1"\nport = {port}\n'
                                     for port in (one, two)))  # fmt: skip
        argv = [*CTL, "--inventory", str(inventory), "status"]
        # SIGINT's default in the child, whatever the test runner set: Python ignores SIGINT for good
        # when it starts with it ignored, and the interrupt would never come.
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
                              env=client.env(), start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as process:  # fmt: skip
            deadline = time.monotonic() + 10
            while not (ssh_processes(one) and ssh_processes(two)):
                assert time.monotonic() < deadline, "rastosctl started no ssh for each host"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=10)
        assert process.returncode == 130, stderr
        assert stderr.endswith("rastosctl: interrupted\n") and "Traceback" not in stderr
        assert ssh_processes(one) == [] and ssh_processes(two) == []


def test_a_dry_run_shows_each_hosts_diff_and_changes_nothing(fleet: Fleet) -> None:
    desired = fleet.directory / "rastos.toml"
    desired.write_text('[motd]\ntext = "desired"\n')
    (fleet.b.scratch.root / "etc/motd").write_text("desired\n")
    inventory = fleet.inventory()
    dry = fleet.client.ctl("--inventory", str(inventory), "--limit", "web", "apply-config", "--file", str(desired),
                           "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry
    shown = blocks(dry.stdout)
    assert shown["a"].startswith(f"== a (root@127.0.0.1:{fleet.ssh_a.port}): changed\n"), "a would change"
    assert "--- step 1: motd" in shown["a"] and "+desired" in shown["a"]
    assert shown["b"].startswith(f"== b (root@127.0.0.1:{fleet.ssh_b.port}): unchanged\n")
    assert "no changes" in shown["b"]
    assert not (fleet.a.scratch.root / "etc/motd").exists(), "a dry run"
    # The desired state is read by rastosctl: over SSH it must be named, never this host's taken for granted.
    implicit = fleet.client.ctl("-H", fleet.ssh_a.destination(), "apply-config", "--dry-run")
    assert implicit.returncode == 2
    assert implicit.stderr.startswith("rastosctl: apply-config reads /etc/rastos/rastos.toml here, not on that host")
