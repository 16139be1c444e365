"""`hostname`: the static host name (/etc/hostname), its /etc/hosts line, and the running kernel's."""

from __future__ import annotations

import re
import socket

from ops.actions import Action, SetKernelHostname
from ops.base import Op, Plan, file_action
from ops.params import Kind, Param, Params
from ops.target import Target

# RFC 1123 labels, at most 64 characters in all (the kernel's limit).
HOSTNAME = r"(?=.{1,64}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
HOSTS_MARKER = "127.0.1.1"


class HostnameOp(Op):
    name = "hostname"
    description = "Set the host name: /etc/hostname, the 127.0.1.1 line of /etc/hosts, and the running system"
    schema = (
        Param("hostname", Kind.STRING, "the new host name (lower case, RFC 1123)", required=True, pattern=HOSTNAME,
              pattern_help="lower-case letters, digits and inner hyphens, dot-separated labels, 64 at most"),
    )  # fmt: skip

    def plan(self, target: Target, params: Params) -> Plan:
        hostname: str = params["hostname"]
        actions: list[Action] = file_action(target, "/etc/hostname", hostname + "\n")
        actions += file_action(target, "/etc/hosts", hosts_with(target.read_text("/etc/hosts") or "", hostname))
        if target.live and (current := socket.gethostname()) != hostname:
            actions.append(SetKernelHostname(hostname, current))
        return Plan(self.name, tuple(actions))


def hosts_with(hosts: str, hostname: str) -> str:
    """/etc/hosts with the 127.0.1.1 line naming `hostname`; every other line kept as it was."""
    short = hostname.split(".")[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    wanted = f"{HOSTS_MARKER}\t{names}"
    lines = hosts.splitlines()
    for index, line in enumerate(lines):
        if re.match(rf"{re.escape(HOSTS_MARKER)}\s", line):
            lines[index] = wanted
            break
    else:
        lines.insert(1 if lines else 0, wanted)
    return "\n".join(lines) + "\n"
