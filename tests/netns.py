"""Network namespaces for the network and firewall op tests: a host under test and a client, joined
by a veth pair, made with iproute2 and removed afterwards whatever happened."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns

# An echo server: one line back for each line received, many connections at once.
ECHO_SERVER = """
import socket, sys, threading
def serve(connection):
    with connection:
        for line in connection.makefile("rb"):
            connection.sendall(line)
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


@dataclass
class Pair:
    host: str  # the namespace the op acts in
    client: str
    host_link: str = ""  # the host's end of the veth pair
    host_address: str = "10.199.0.1"
    client_address: str = "10.199.0.2"

    def run(self, namespace: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True,
                              check=check, timeout=60)  # fmt: skip

    def can_connect(self, port: int, timeout: float = 1.0, address: str | None = None) -> bool:
        probe = (
            f"import socket; socket.create_connection(('{address or self.host_address}', {port}), timeout={timeout})"
        )
        return self.run(self.client, sys.executable, "-c", probe, check=False).returncode == 0

    @contextlib.contextmanager
    def serving(self, *ports: int) -> Iterator[None]:
        servers = [
            subprocess.Popen(["ip", "netns", "exec", self.host, sys.executable, "-c", ECHO_SERVER, str(port)])
            for port in ports
        ]
        try:
            for port in ports:
                deadline = time.monotonic() + 10
                while not self.can_connect(port):
                    assert time.monotonic() < deadline, f"the echo server on {port} did not come up"
            yield
        finally:
            for server in servers:
                server.kill()
                server.wait()

    @contextlib.contextmanager
    def inside_host(self) -> Iterator[None]:
        """This process (and what it starts) in the host namespace for the block."""
        netns.pushns(self.host)
        try:
            yield
        finally:
            netns.popns()


@contextlib.contextmanager
def namespace_pair() -> Iterator[Pair]:
    suffix = f"{os.getpid()}-{time.monotonic_ns() % 100000}"
    veth_host, veth_client = f"rh{suffix[-8:]}", f"rc{suffix[-8:]}"
    pair = Pair(f"rastos-h-{suffix}", f"rastos-c-{suffix}", veth_host)
    try:
        for name in (pair.host, pair.client):
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", veth_host, "netns", pair.host, "type", "veth", "peer", "name",
                        veth_client, "netns", pair.client], check=True)  # fmt: skip
        for name, veth, address in ((pair.host, veth_host, pair.host_address),
                                    (pair.client, veth_client, pair.client_address)):  # fmt: skip
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", veth], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", veth, "up"], check=True)
        yield pair
    finally:
        for name in (pair.host, pair.client):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        assert not any(Path("/run/netns").glob(f"rastos-*-{suffix}"))
