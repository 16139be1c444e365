"""Real SSH for rastosctl -H and inventories: OpenSSH's sshd on a port of 127.0.0.1, started by the test
with a host key and an authorized key of its own, and the real ssh client with a configuration that
knows them (the `ssh` first on PATH runs /usr/bin/ssh -F that file: sd-bus runs `ssh` from PATH).

Each sshd runs in a mount namespace of its own where /run/dbus is a private bus's directory, so that
on it the unchanged systemd-stdio-bridge, run by ssh as on any host, reaches that bus as the system
bus: a private rastosd is then "another host" in every way but the network.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon_fixtures import CHECKOUT, logged_process

SSHD = Path("/usr/sbin/sshd")
SYSTEM_BUS_DIR = Path("/run/dbus")  # where the bridge looks for system_bus_socket
CTL = [sys.executable, "-c", "import sys; from daemon.cli import ctl_main; sys.exit(ctl_main())"]  # rastosctl
# In the namespace: /run/dbus becomes the given directory, then the command runs (sshd, or a container's
# first process); the values are arguments, never pasted into the script.
IN_NAMESPACE = 'mount --bind -- "$1" /run/dbus && shift && exec "$@"'


def bus_dir(address: str) -> Path:
    """The directory of a private bus (tests/daemon_fixtures.py), whose socket is system_bus_socket."""
    return Path(address.removeprefix("unix:path=")).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path`; returns the public key's line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SshClient:
    """The client side: a key, the hosts' keys it knows, and `ssh` on PATH with that configuration."""

    directory: Path
    key: Path = field(init=False)
    public_key: str = field(init=False)
    known_hosts: Path = field(init=False)
    bin: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = self.directory / "id_ed25519"
        self.public_key = keygen(self.key)
        self.known_hosts = self.directory / "known_hosts"
        self.known_hosts.touch()
        config = self.directory / "ssh_config"
        config.write_text(
            "Host *\n"
            f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n  IdentityAgent none\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n"
        )
        config.chmod(0o600)
        self.bin = self.directory / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {shlex.quote(str(config))} "$@"\n')
        wrapper.chmod(0o755)

    def knows(self, port: int, host_key: str) -> None:
        with self.known_hosts.open("a") as known:
            known.write(f"[127.0.0.1]:{port} {' '.join(host_key.split()[:2])}\n")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "PYTHONPATH": str(CHECKOUT)}

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """rastosctl with this client's ssh; in a session of its own, without a terminal ssh could ask on."""
        return subprocess.run([*CTL, *args], capture_output=True, text=True, check=False, timeout=timeout, cwd=CHECKOUT,
                              env=self.env(), start_new_session=True)  # fmt: skip


@pytest.fixture
def client(tmp_path: Path) -> SshClient:
    """The test's ssh client, with a key of its own."""
    return SshClient(tmp_path / "client")


@dataclass
class Sshd:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    host_key: str

    def destination(self, user: str = "root") -> str:
        return f"{user}@127.0.0.1:{self.port}"


@contextlib.contextmanager
def sshd(
    directory: Path, client: SshClient, bus_dir: Path, *, config: tuple[str, ...] = (), authorized: bool = True
) -> Iterator[Sshd]:
    """sshd on 127.0.0.1 that lets in any user with `client`'s key (unless not `authorized`), whose
    system bus is the one in `bus_dir`. `config`: more sshd_config lines. Known to `client` at once."""
    directory.mkdir(parents=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    SYSTEM_BUS_DIR.mkdir(exist_ok=True)  # the mount point in the namespace
    host_key = keygen(directory / "host_key")
    # sshd reads the keys as the user logging in, who cannot read the test's temporary directory.
    keys_dir = Path(tempfile.mkdtemp(prefix="rastos-sshd-", dir="/run"))
    try:
        keys_dir.chmod(0o755)
        (keys_dir / "authorized_keys").write_text(client.public_key + "\n" if authorized else "")
        port = free_port()
        lines = [
            f"ListenAddress 127.0.0.1:{port}", f"HostKey {directory / 'host_key'}",
            f"AuthorizedKeysFile {keys_dir / 'authorized_keys'}", "StrictModes no",  # the host key is under /tmp
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "PidFile none", *config,
        ]  # fmt: skip
        (directory / "sshd_config").write_text("\n".join(lines) + "\n")
        with running_sshd(directory, bus_dir) as (process, log):
            client.knows(port, host_key)
            yield Sshd(port, process, log, host_key)
    finally:
        shutil.rmtree(keys_dir)


@contextlib.contextmanager
def running_sshd(directory: Path, bus_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = directory / "sshd.log"
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_NAMESPACE, "sh", str(bus_dir),
            str(SSHD), "-D", "-e", "-f", str(directory / "sshd_config")]  # fmt: skip
    with logged_process(argv, log, "Server listening", "sshd listening", 10) as process:
        yield process, log


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and then never says a word (a hung host, a black hole past a
    load balancer): ssh waits for the banner that never comes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port: int = listener.getsockname()[1]
        yield port


# Sockets bound for closed_port(), kept until the test process ends.
_HELD_PORTS: list[socket.socket] = []


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused. It stays bound (never listening) for
    the rest of the run: a port only probed free could meanwhile become a listener's, or the source
    port the kernel picks for a connection on loopback, which then connects to itself."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(held)
    port: int = held.getsockname()[1]
    return port
