"""What the checks read from a target, each read once per scan (many checks share `sshd -T`, the
sysctl files, /etc/passwd), and the params that keep the host's current settings for a remediation.

Everything reads the target's own files (its /etc/passwd, not the host's name service) and its own
programs (`sshd -T` through `in_target`); only a live target's running kernel is read in /proc.
"""

from __future__ import annotations

import fnmatch
import re
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from daemon.errors import DaemonError, UnsafePath
from ops import OPS
from ops.certs import current_params
from ops.firewall import ENABLED_LINK
from ops.params import validate
from ops.rootfs import Links
from ops.ssh import ALGORITHM, refuse_lockout
from ops.sysctl import Persisted, live_path, persisted
from ops.target import Target, in_target, read_colon_file
from rastos.errors import RastosError
from rastos.process import run

SSHD = "/usr/sbin/sshd"
NFT = "/usr/sbin/nft"
# The file the compliance remediation's sysctl step writes: after the admin's own 90-rastos, so the
# benchmark's values win where both set a key.
COMPLIANCE_SYSCTL = "95-rastos-compliance"


@dataclass(frozen=True)
class Sshd:
    """sshd's effective configuration, as `sshd -T` prints it: every value of a keyword, in order.
    (ops/ssh.py's `effective_config` keeps one value per keyword; AllowUsers and Port may have
    several, and a remediation that kept only the last would lock the others out.)"""

    options: dict[str, list[str]]
    error: str = ""  # sshd -T refused the configuration

    def first(self, keyword: str) -> str:
        values = self.options.get(keyword, [])
        return values[0] if values else ""

    def all(self, keyword: str) -> list[str]:
        return self.options.get(keyword, [])


@dataclass(frozen=True)
class FileStatus:
    mode: int  # permission bits only
    uid: int
    gid: int
    is_dir: bool


class Facts:
    def __init__(self, target: Target) -> None:
        self.target = target

    # Kernel parameters

    @cached_property
    def sysctl(self) -> dict[str, Persisted]:
        return persisted(self.target)

    def running(self, key: str) -> str | None:
        """The running kernel's value on a live target; None when it has no such key."""
        try:
            return live_path(key).read_text().strip()
        except FileNotFoundError:
            return None

    # Files and accounts

    def status(self, absolute: str) -> FileStatus | None:
        """The file itself (a symlink is not followed: its target lies inside the root)."""
        info = self.target.files.lstat(absolute)
        if info is None:
            return None
        return FileStatus(info.st_mode & 0o7777, info.st_uid, info.st_gid, stat.S_ISDIR(info.st_mode))

    def exists(self, absolute: str) -> bool:
        return self.target.files.kind(absolute) is not None

    def text(self, absolute: str) -> str | None:
        """A system file's text, through the distribution's own links (root's, inside the root)."""
        try:
            return self.target.read_text(absolute, links=Links.SYSTEM)
        except (FileNotFoundError, UnsafePath):
            return None

    def names(self, directory: str, pattern: str = "*") -> list[str]:
        """Names in a system directory matching a glob pattern, sorted (hidden ones only when asked)."""
        try:
            names = self.target.files.names(directory, links=Links.SYSTEM)
        except UnsafePath:
            return []
        return [name for name in names if fnmatch.fnmatchcase(name, pattern)]

    @cached_property
    def passwd(self) -> list[list[str]]:
        return read_colon_file(self.target, "/etc/passwd")

    @cached_property
    def shadow(self) -> list[list[str]]:
        return read_colon_file(self.target, "/etc/shadow")

    @cached_property
    def groups(self) -> list[list[str]]:
        return read_colon_file(self.target, "/etc/group")

    def gid(self, group: str) -> int | None:
        for entry in self.groups:
            if entry[0] == group and len(entry) >= 3 and entry[2].isdigit():
                return int(entry[2])
        return None

    @cached_property
    def login_defs(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for line in (self.text("/etc/login.defs") or "").splitlines():
            words = line.split(None, 1)
            if len(words) == 2 and not words[0].startswith("#"):
                values[words[0]] = words[1].strip()
        return values

    # OpenSSH

    @cached_property
    def sshd(self) -> Sshd | None:
        """None when the OpenSSH server is not installed."""
        if not self.target.has_program(SSHD):
            return None
        try:
            output = run(in_target(self.target, [SSHD, "-T"], ["sshd"]), capture=True).stdout
        except RastosError as error:
            return Sshd({}, str(error).splitlines()[0] if str(error) else "sshd -T failed")
        options: dict[str, list[str]] = {}
        for line in output.splitlines():
            keyword, _, value = line.partition(" ")
            options.setdefault(keyword, []).append(value)
        return Sshd(options)

    @cached_property
    def ssh_context(self) -> dict[str, Any]:
        """The ssh op's params that say what sshd does now: a remediation overrides only what a failed
        check needs, so the port, the users allowed and the algorithms chosen stay as they are."""
        sshd = self.sshd
        if sshd is None or sshd.error:
            return {}
        algorithms = {
            param: [name for name in sshd.first(keyword).split(",") if re.fullmatch(ALGORITHM, name)]
            for param, keyword in (("ciphers", "ciphers"), ("macs", "macs"), ("kex_algorithms", "kexalgorithms"))
        }
        root = sshd.first("permitrootlogin")
        root = "prohibit-password" if root == "without-password" else root  # sshd -T's older name for it
        return {
            "port": int(sshd.first("port") or 22),
            "password_authentication": sshd.first("passwordauthentication") == "yes",
            # forced-commands-only: the op cannot say it; a step that does not set it is refused (ssh_refusal)
            "permit_root_login": root if root in ("no", "prohibit-password", "yes") else "no",
            "max_auth_tries": min(max(int(sshd.first("maxauthtries") or 3), 1), 10),
            "allow_users": [user for line in sshd.all("allowusers") for user in line.split()],
            "allow_groups": [group for line in sshd.all("allowgroups") for group in line.split()],
            "x11_forwarding": sshd.first("x11forwarding") == "yes",
            "client_alive_interval": min(max(int(sshd.first("clientaliveinterval") or 0), 0), 3600),
            **algorithms,
        }

    def ssh_refusal(self, overrides: dict[str, Any]) -> str:
        """Why an ssh step from the current settings with `overrides` cannot be applied here ("" if it can):
        sshd listens on several ports (the op keeps one), or the op would refuse it (a lockout)."""
        sshd = self.sshd
        if sshd is None:
            return "openssh-server is not installed"
        if sshd.error:
            return f"sshd -T refuses the configuration: {sshd.error}"
        if len(set(sshd.all("port"))) > 1:
            return f"sshd listens on ports {', '.join(sshd.all('port'))}; the ssh op manages one: change it by hand"
        root = sshd.first("permitrootlogin")
        if root not in ("no", "without-password", "prohibit-password", "yes") and "permit_root_login" not in overrides:
            return f"PermitRootLogin {root} is more than the ssh op can keep: remediate ssh-no-root-login with it"
        op = OPS["ssh"]
        try:
            params = validate(op.schema, self.ssh_context | overrides)
            op.check(self.target, params)
            refuse_lockout(self.target, params)
        except DaemonError as error:
            return str(error)
        return ""

    # Firewall

    @property
    def nftables_installed(self) -> bool:
        return self.target.has_program(NFT)

    @property
    def nftables_enabled(self) -> bool:
        return self.target.files.kind(ENABLED_LINK) == "link"

    @cached_property
    def firewall_context(self) -> dict[str, Any]:
        """The firewall op's params that keep what the host serves: sshd's port, and on a live system
        the ports something listens on beyond loopback, and forwarding where the host forwards."""
        context: dict[str, Any] = {"ssh_port": int(self.ssh_context.get("port", 22))}
        if self.target.live:
            ssh = str(context["ssh_port"])
            context["allow_tcp"] = [port for port in listening_ports("tcp") if port != ssh]
            context["allow_udp"] = listening_ports("udp")
            if self.running("net.ipv4.ip_forward") == "1" or self.running("net.ipv6.conf.all.forwarding") == "1":
                context["forward"] = "accept"  # a router or a container host: forwarding is its job
        return context

    # The certs op's host certificate

    @cached_property
    def certs_context(self) -> dict[str, Any]:
        """The certs op's params that keep the CA and the certificate's names: a renewal renames nothing."""
        return current_params(self.target)

    # The compliance sysctl file

    @cached_property
    def sysctl_context(self) -> dict[str, Any]:
        """What the compliance file holds now: a later remediation keeps it, adding sets to it."""
        settings: dict[str, str] = {}
        for line in (self.text(f"/etc/sysctl.d/{COMPLIANCE_SYSCTL}.conf") or "").splitlines():
            key, equals, value = line.partition("=")
            if equals and not line.lstrip().startswith(("#", ";")):
                settings[key.strip()] = value.strip()
        return {"name": COMPLIANCE_SYSCTL, "settings": settings}


def listening_ports(protocol: str) -> list[str]:
    """Ports with a socket listening beyond loopback, from /proc/net (the daemon's network namespace)."""
    listening_state = "0A" if protocol == "tcp" else "07"  # TCP_LISTEN; an unconnected UDP socket
    ports: set[int] = set()
    for name in (protocol, protocol + "6"):
        try:
            lines = Path("/proc/net", name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, _, port = fields[1].rpartition(":")
            if fields[3] == listening_state and not is_loopback(address):
                ports.add(int(port, 16))
    return [str(port) for port in sorted(ports)]


def is_loopback(hex_address: str) -> bool:
    """/proc/net's addresses: IPv4 as one little-endian word, IPv6 as four."""
    if len(hex_address) == 8:
        return hex_address.endswith("7F")  # 127.x.x.x, stored backwards
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return words == bytes(15) + b"\x01" or (words[:12] == bytes(10) + b"\xff\xff" and words[12] == 127)


def mode_text(mode: int) -> str:
    return f"{mode:04o}"
