"""An inventory: the hosts rastosctl reaches over SSH, their groups, and the variables workflows take there.

    [[host]]
    name = "web-1"                  # how the host is shown and selected
    address = "192.0.2.11"          # default: the name; a name or an address ssh can reach
    user = "admin"                  # default: ssh's own (~/.ssh/config, else the local user)
    port = 2222                     # default: ssh's own
    vars = { allow_tcp = ["8080"] } # this host's values of workflow variables

    [group.web]
    hosts = ["web-1", "web-2"]
    vars = { allow_tcp = ["80", "443"] }

Read into frozen dataclasses here, once; every error names the file and the key. A key nobody reads is
an error, not a warning, and so is a variable that no workflow declares: a typo must not be a no-op.
A host takes its groups' variables (a variable two of its groups set differently must be set by the
host itself), then its own; `--set` on the command line comes last.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.ctl_target import USER, Target, parse_destination
from ops.declared import list_workflows
from rastos.errors import RastosError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ALL = "all"  # every host: --limit all, and a name no group may take
HOST_KEYS = ("name", "address", "user", "port", "vars")
GROUP_KEYS = ("hosts", "vars")


@dataclass(frozen=True)
class InventoryHost:
    name: str
    target: Target
    groups: tuple[str, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Inventory:
    source: Path
    hosts: tuple[InventoryHost, ...]
    groups: Mapping[str, tuple[str, ...]]

    def select(self, limits: Sequence[str]) -> list[InventoryHost]:
        """The hosts named by `limits` (hosts or groups; each may be a comma-separated list), in the
        inventory's order; every host without a limit."""
        names = [name.strip() for limit in limits for name in limit.split(",") if name.strip()] or [ALL]
        by_name = {host.name: host for host in self.hosts}
        chosen: set[str] = set()
        for name in names:
            if name == ALL:
                chosen |= set(by_name)
            elif name in self.groups:
                chosen |= set(self.groups[name])
            elif name in by_name:
                chosen.add(name)
            else:
                known = ", ".join([ALL, *self.groups]) if self.groups else ALL
                raise RastosError(f"{self.source}: --limit {name!r}: no host or group of that name",
                                  hint=f"its groups: {known}")  # fmt: skip
        return [host for host in self.hosts if host.name in chosen]


def load_inventory(path: Path, known_variables: Iterable[str] | None = None) -> Inventory:
    """`known_variables`: those some workflow declares (default: every workflow's, as rastosctl finds them)."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise RastosError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise RastosError(f"{path}: not valid TOML: {error}") from None
    if known_variables is None:
        known_variables = {name for workflow in list_workflows() for name in workflow.variables}
    return _Reader(path, frozenset(known_variables)).inventory(document)


@dataclass
class _Reader:
    path: Path
    known_variables: frozenset[str]

    def fail(self, key: str, message: str, hint: str | None = None) -> RastosError:
        return RastosError(f"{self.path}: {key}: {message}", hint=hint)

    def inventory(self, document: dict[str, Any]) -> Inventory:
        for key in document:
            if key not in ("host", "group"):
                raise self.fail(key, "unknown key", hint="an inventory has [[host]] tables and [group.NAME] tables")
        hosts = self.hosts(document.get("host", []))
        groups = self.groups(document.get("group", {}), {host.name for host in hosts})
        finished = []
        for host in hosts:
            memberships = tuple(group for group, (members, _) in groups.items() if host.name in members)
            variables = self.variables_of(host, memberships, groups)
            finished.append(InventoryHost(host.name, host.target, memberships, variables))
        return Inventory(self.path, tuple(finished), {name: members for name, (members, _) in groups.items()})

    def hosts(self, entries: Any) -> list[InventoryHost]:
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise self.fail("host", "write each host as a [[host]] table")
        hosts: list[InventoryHost] = []
        for index, entry in enumerate(entries):
            host = self.host(f"host[{index}]", entry)
            for earlier_index, earlier in enumerate(hosts):
                if earlier.name == host.name:
                    raise self.fail(f"host[{index}].name", f"duplicate host {host.name!r} (also host[{earlier_index}])")
                if earlier.target == host.target:
                    raise self.fail(f"host[{index}]", f"duplicate host: {host.name!r} is {host.target}, as "
                                    f"{earlier.name!r} (host[{earlier_index}]) is")  # fmt: skip
            hosts.append(host)
        return hosts

    def host(self, key: str, entry: dict[str, Any]) -> InventoryHost:
        self.known_keys(key, entry, HOST_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise self.fail(f"{key}.name", f"a host needs a name of letters, digits, '.', '_' and '-', got {name!r}")
        address, user, port = entry.get("address", name), entry.get("user"), entry.get("port")
        if not isinstance(address, str) or any(c in address for c in "@/") or address.count(":") == 1:
            raise self.fail(f"{key}.address", f"must be a host name or an IP address, got {address!r}")
        if user is not None and (not isinstance(user, str) or not re.fullmatch(USER, user)):
            raise self.fail(f"{key}.user", f"must be a user name, got {user!r}")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
            raise self.fail(f"{key}.port", f"must be a number from 1 to 65535, got {port!r}")
        host = f"[{address}]" if ":" in address else address
        destination = f"{user + '@' if user else ''}{host}{f':{port}' if port else ''}"
        try:
            target = parse_destination(destination)
        except RastosError:
            raise self.fail(f"{key}.address", f"must be a host name or an IP address, got {address!r}") from None
        return InventoryHost(name, target, variables=self.variables(f"{key}.vars", entry.get("vars", {})))

    def groups(self, table: Any, hosts: set[str]) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        if not isinstance(table, dict):
            raise self.fail("group", "write each group as a [group.NAME] table")
        groups = {}
        for name, entry in table.items():
            key = f"group.{name}"
            if not NAME.fullmatch(name) or name == ALL:
                raise self.fail(key, f"a group's name is letters, digits, '.', '_' and '-', and not {ALL!r}")
            if name in hosts:
                raise self.fail(key, f"{name!r} is a host's name too: --limit {name} would mean either")
            if not isinstance(entry, dict):
                raise self.fail(key, "write the group as a table: hosts = [...], vars = {...}")
            self.known_keys(key, entry, GROUP_KEYS)
            members = entry.get("hosts", [])
            if not isinstance(members, list) or not all(isinstance(member, str) for member in members):
                raise self.fail(f"{key}.hosts", "must be a list of host names")
            for member in members:
                if member not in hosts:
                    raise self.fail(f"{key}.hosts", f"unknown host {member!r}", hint="declare it in a [[host]] table")
                if members.count(member) > 1:
                    raise self.fail(f"{key}.hosts", f"duplicate host {member!r}")
            groups[name] = (tuple(members), self.variables(f"{key}.vars", entry.get("vars", {})))
        return groups

    def known_keys(self, key: str, entry: dict[str, Any], known: tuple[str, ...]) -> None:
        for name in entry:
            if name not in known:
                raise self.fail(f"{key}.{name}", "unknown key", hint=f"known keys: {', '.join(known)}")

    def variables(self, key: str, table: Any) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(key, "must be a table of workflow variables: vars = { name = value }")
        for name in table:
            if name not in self.known_variables:
                known = ", ".join(sorted(self.known_variables)) or "none"
                raise self.fail(f"{key}.{name}", "no workflow has this variable", hint=f"their variables: {known}")
        return dict(table)

    def variables_of(
        self, host: InventoryHost, memberships: tuple[str, ...], groups: Mapping[str, tuple[Any, dict[str, Any]]]
    ) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        came_from: dict[str, str] = {}
        for group in memberships:
            for name, value in groups[group][1].items():
                if name in merged and merged[name] != value and name not in host.variables:
                    other = came_from[name]
                    raise self.fail(f"group.{group}.vars.{name}",
                                    f"host {host.name!r} is also in group {other!r}, which sets it otherwise",
                                    hint=f"set it for the host: vars = {{ {name} = ... }} in its [[host]]")  # fmt: skip
                merged[name], came_from[name] = value, group
        return {**merged, **host.variables}
