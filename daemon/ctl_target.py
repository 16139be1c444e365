"""Where rastosctl finds rastosd: this host's system bus (or a bus address), another host's system bus
over SSH (`-H [USER@]HOST[:PORT]`), or a local container's (`-M NAME`); and, when it cannot get there,
which of the ways it failed, told apart from what ssh and sd-bus report.

sd-bus itself reaches a remote bus: it starts `ssh -xT [-p PORT] -- [USER@]HOST systemd-stdio-bridge`
with the connection's socket as ssh's stdin and stdout, and the caller's stderr as ssh's. Every way
that fails looks the same on the bus (the connection ends: "Connection terminated"); only ssh's own
words say which it was, so ssh's stderr goes to a file of this connection's, read when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import IO

from sdbus import (
    DbusNameHasNoOwnerError,
    DbusNoReplyError,
    DbusServiceUnknownError,
    SdBus,
    SdBusBaseError,
    SdBusLibraryError,
    sd_bus_open_system,
    sd_bus_open_system_machine,
    sd_bus_open_system_remote,
)

from daemon.bus.interfaces import BUS_NAME, ROOT_PATH, ManagerInterface
from rastos.errors import RastosError

# A name or an IPv4 address (an IPv6 address comes in brackets), and the user as ssh and useradd take it.
HOST = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?"
USER = r"[A-Za-z_][A-Za-z0-9._-]{0,31}\$?"
DESTINATION = re.compile(
    rf"(?:(?P<user>{USER})@)?(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>{HOST}))(?::(?P<port>[0-9]{{1,5}}))?"
)
MACHINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EHOSTDOWN = 112  # sd-bus's answer for a container name that machined does not list
CONNECT_TIMEOUT = 20.0  # below sd-bus's own 25 s for a call, so ours is the one that says it


class Via(StrEnum):
    LOCAL = "local"
    SSH = "ssh"
    MACHINE = "machine"


@dataclass(frozen=True)
class Target:
    via: Via = Via.LOCAL
    host: str = ""  # SSH: the host's name or address; MACHINE: the container's name
    user: str | None = None
    port: int | None = None
    bus_address: str | None = None  # LOCAL: a bus other than the system bus (tests, a private bus)

    @property
    def destination(self) -> str:
        """[USER@]HOST[:PORT] as sd-bus parses it: an IPv6 address in brackets, so its colons are not a port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}{f':{self.port}' if self.port else ''}"

    def __str__(self) -> str:
        if self.via is Via.SSH:
            return self.destination
        if self.via is Via.MACHINE:
            return f"container {self.host}"
        return f"the bus at {self.bus_address}" if self.bus_address else "the system bus"


def parse_destination(text: str, what: str = "-H") -> Target:
    """`[USER@]HOST[:PORT]`, checked here: sd-bus would take `HOST:NAME` for a container and `HOST/NAME`
    for one on that host, and run ssh with whatever it was given."""
    found = DESTINATION.fullmatch(text)
    if found is None:
        raise RastosError(f"{what} {text!r}: write [USER@]HOST[:PORT]", hint="an IPv6 address in brackets: [::1]:22")
    port = int(found["port"]) if found["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise RastosError(f"{what} {text!r}: the port must be from 1 to 65535")
    return Target(Via.SSH, found["ipv6"] or found["host"], found["user"], port)


def parse_machine(text: str) -> Target:
    if not MACHINE.fullmatch(text):
        raise RastosError(f"-M {text!r}: a container's name is letters, digits, '.', '_' and '-'")
    return Target(Via.MACHINE, text)


class Reason(StrEnum):
    """Why rastosd on a target could not be reached; the JSON records and the final table carry it."""

    NO_HOST = "no-host"  # the name does not resolve
    UNREACHABLE = "unreachable"  # no route, refused, timed out, closed before logging in
    NO_ANSWER = "no-answer"  # nothing came back within the connect timeout
    HOST_KEY = "host-key"  # the host's key is unknown or changed
    KEY_REFUSED = "key-refused"  # the host refused our keys
    NO_BRIDGE = "no-bridge"  # logged in, but the host has no systemd-stdio-bridge
    NO_BUS = "no-bus"  # the bridge ran, but could not reach the host's system bus
    NO_DAEMON = "no-daemon"  # the bus answered, but nobody owns org.rastos.Daemon1 there
    NO_CONTAINER = "no-container"
    LOST = "lost"  # the connection ended in the middle of the command
    SSH = "ssh"  # ssh failed in a way not told apart above


class Unreachable(RastosError):
    """rastosd on the target cannot be reached: the command did not run there (or not to its end)."""

    def __init__(self, target: Target, reason: Reason, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{target}: {message}", hint=hint)
        self.target = target
        self.reason = reason


# What ssh says, first match wins: (its words, the reason, what to say, a hint). {host} and {dest} are
# filled in, and {said} with the line of ssh's that matched.
SSH_SAYS: tuple[tuple[re.Pattern[str], Reason, str, str | None], ...] = (
    (re.compile(r"Could not resolve hostname"), Reason.NO_HOST, "no such host: {said}", None),
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED"), Reason.HOST_KEY,
     "the host's key is not the one known for it (ssh: REMOTE HOST IDENTIFICATION HAS CHANGED)",
     "if the host was reinstalled, check its new key and replace the old one in known_hosts"),
    (re.compile(r"Host key verification failed|No \S+ host key is known"), Reason.HOST_KEY,
     "the host's key is not known here (ssh: {said})",
     "check its key, then connect once with ssh {dest} to add it to known_hosts"),
    (re.compile(r"Permission denied \("), Reason.KEY_REFUSED, "the host refused the login ({said})",
     "put your public key in the user's ~/.ssh/authorized_keys there, or load yours into ssh-agent"),
    (re.compile(r"systemd-stdio-bridge: (command )?not found|systemd-stdio-bridge: No such file"), Reason.NO_BRIDGE,
     "the host has no systemd-stdio-bridge, which carries the bus over SSH: {said}",
     "it comes with systemd (every rastOS image has it); rastosctl -H needs systemd on the host"),
    (re.compile(r"connect to host .*|Connection (closed|reset) by .*|kex_exchange_identification.*|"
                r"Connection timed out.*|banner exchange.*"), Reason.UNREACHABLE, "{said}", None),
)  # fmt: skip


@dataclass
class Connection:
    """The bus of one target and, over SSH, what ssh wrote to its stderr so far."""

    target: Target
    bus: SdBus
    ssh_stderr: IO[bytes] | None = None

    def ssh_said(self) -> str:
        if self.ssh_stderr is None:
            return ""
        # pread: ssh writes at the file's shared offset, which a read must not move.
        return os.pread(self.ssh_stderr.fileno(), 65536, 0).decode(errors="replace")

    async def reach(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Read rastosd's version there: a failure to connect shows here, named, rather than in the
        command's first call. (A read, not sdbus's Peer.Ping, which came back without an error from a bus
        where nobody owned the name.) The read starts rastosd where the bus activates it."""
        manager = ManagerInterface.new_proxy(BUS_NAME, ROOT_PATH, self.bus)
        try:
            await asyncio.wait_for(manager.version.get_async(), timeout)
        except TimeoutError:
            raise self.diagnosis(None, f"no answer within {timeout:g} s") from None
        except (DbusServiceUnknownError, DbusNameHasNoOwnerError):
            raise Unreachable(self.target, Reason.NO_DAEMON,
                              f"rastosd is not running there (no one owns {BUS_NAME} on its system bus)",
                              hint="systemctl status rastosd.service there") from None  # fmt: skip
        except DbusNoReplyError as error:
            raise self.diagnosis(error, str(error)) from None

    def diagnosis(self, error: SdBusBaseError | None, what: str) -> Unreachable:
        """What went wrong before rastosd answered, in ssh's words where it said any."""
        said = [line.strip() for line in self.ssh_said().splitlines() if line.strip()]
        for pattern, reason, message, hint in SSH_SAYS:
            for line in said:
                if pattern.search(line):
                    words = {
                        "host": self.target.host,
                        "dest": self.target.destination,
                        "said": line.removeprefix("ssh: "),
                    }
                    return Unreachable(self.target, reason, message.format(**words), hint=hint and hint.format(**words))
        if said:
            return Unreachable(self.target, Reason.SSH, f"ssh failed: {said[-1]}")
        if error is None or "timed out" in what:
            return Unreachable(self.target, Reason.NO_ANSWER, what.lower(),
                               hint="is the host up, and its sshd listening on that port?")  # fmt: skip
        # ssh says nothing of its own when it logged in and ran the bridge, and the bridge (which
        # logs to the host's journal, not to us) could not reach the bus there.
        return Unreachable(self.target, Reason.NO_BUS,
                           "logged in, but systemd-stdio-bridge there could not connect to the system bus",
                           hint="is dbus running there (systemctl status dbus.service)?")  # fmt: skip

    def lost(self, error: SdBusBaseError) -> Unreachable | None:
        """A connection that ends in the middle of a command (ssh killed, the host gone): a call waiting
        then hears "Connection terminated", one made after it sd-bus's ENOTCONN."""
        if self.target.via is Via.LOCAL:
            return None
        if not isinstance(error, SdBusLibraryError) and "terminated" not in str(error):
            return None
        said = [line.strip() for line in self.ssh_said().splitlines() if line.strip()]
        detail = f" ({said[-1]})" if said else ""
        return Unreachable(self.target, Reason.LOST, f"the connection was lost during the command{detail}",
                           hint="rastosctl jobs there shows whether a job it started went on")  # fmt: skip

    def close(self) -> None:
        # Closing the bus ends the ssh it started, and waits for it.
        self.bus.close()
        if self.ssh_stderr is not None:
            self.ssh_stderr.close()


def connect(target: Target) -> Connection:
    if target.via is Via.SSH:
        stderr = tempfile.TemporaryFile()  # noqa: SIM115  (the connection's to close, with the bus)
        with stderr_into(stderr):
            bus = sd_bus_open_system_remote(target.destination)
        return Connection(target, bus, stderr)
    if target.via is Via.MACHINE:
        try:
            return Connection(target, sd_bus_open_system_machine(target.host))
        except SdBusLibraryError as error:
            if f"error number: {EHOSTDOWN}" not in str(error):
                raise
            raise Unreachable(target, Reason.NO_CONTAINER, "no container of that name is running here",
                              hint="machinectl list shows those that are") from None  # fmt: skip
    if target.bus_address:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = target.bus_address
    return Connection(target, sd_bus_open_system())


@contextlib.contextmanager
def stderr_into(file: IO[bytes]) -> Iterator[None]:
    """File descriptor 2 on `file` while sd-bus starts ssh, which inherits it; this process's own
    stderr again after. Nothing else writes meanwhile: the event loop's thread is the only one."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
