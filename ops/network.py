"""`network`: one link's addresses, gateway, routes, MTU and DNS: a systemd-networkd file for every boot,
and the same state made at once on the running system through netlink (pyroute2).

One step configures one link (a pipeline holds one step per link), in
/etc/systemd/network/50-rastos-LINK.network. On the live system the link is brought to the same state
directly: wanted addresses added, other global addresses removed (static configuration only: with DHCP
the lease's addresses are not ours to remove), the MTU set, the default route and the routes replaced.
networkd is then reloaded so it agrees and takes DNS. A link configuration can cut the host off, so the
change is confirm-or-revert (confirm.py): not confirmed in time, the old file comes back and the link is
brought back to it the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ops.actions import Action, Change, FollowUp, Output, RemoveFile
from ops.base import Op, Plan, file_action, joined
from ops.errors import InvalidParams, OpFailed
from ops.params import CONFIRM_TIMEOUT, Kind, Param, Params
from ops.target import Target

LINK = r"[a-zA-Z0-9_.-]{1,15}"
NETWORK_DIR = "/etc/systemd/network"
MARKER = "# Written by rastosd (op network); changes made here are replaced at the next apply."


def network_file(link: str) -> str:
    return f"{NETWORK_DIR}/50-rastos-{link}.network"


def check_interfaces(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            return f"{value!r} is not an address with its prefix length, like 192.0.2.10/24"
        if "/" not in value:
            return f"{value!r} needs its prefix length, like {value}/24"
    return None


def check_addresses(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IP address"
    return None


def check_gateway(value: str) -> str | None:
    return check_addresses([value]) if value else None


def check_routes(values: list[str]) -> str | None:
    for value in values:
        destination, _, gateway = value.partition(" via ")
        try:
            ipaddress.ip_network(destination.strip(), strict=True)
            ipaddress.ip_address(gateway.strip())
        except ValueError:
            return f"{value!r} is not a route like '198.51.100.0/24 via 192.0.2.1'"
    return None


@dataclass(frozen=True)
class LinkConfig:
    """What a step wants of a link, in the form both the file and netlink are made from."""

    link: str
    dhcp: str
    addresses: tuple[str, ...]
    gateway: str
    routes: tuple[tuple[str, str], ...]  # (destination network, gateway)
    dns: tuple[str, ...]
    mtu: int | None

    @classmethod
    def from_params(cls, params: Params) -> LinkConfig:
        routes = tuple(
            (str(ipaddress.ip_network(d.strip())), g.strip())
            for d, _, g in (r.partition(" via ") for r in params["routes"])
        )
        addresses = tuple(str(ipaddress.ip_interface(a)) for a in params["addresses"])
        return cls(params["interface"], params["dhcp"], addresses, params["gateway"], routes, tuple(params["dns"]),
                   params["mtu"])  # fmt: skip

    @classmethod
    def from_file(cls, link: str, text: str) -> LinkConfig:
        """Our own file read back (a revert brings the link back to the restored one)."""
        sections: dict[str, list[dict[str, list[str]]]] = {}
        current: dict[str, list[str]] = {}
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                current = {}
                sections.setdefault(stripped, []).append(current)
            elif "=" in stripped and not stripped.startswith("#"):
                key, _, value = stripped.partition("=")
                current.setdefault(key, []).append(value)
        network = (sections.get("[Network]") or [{}])[0]
        link_section = (sections.get("[Link]") or [{}])[0]
        routes = tuple((r["Destination"][0], r["Gateway"][0]) for r in sections.get("[Route]", []))
        mtu = link_section.get("MTUBytes", [""])[0]
        return cls(link, network.get("DHCP", ["no"])[0], tuple(network.get("Address", [])),
                   network.get("Gateway", [""])[0], routes, tuple(network.get("DNS", [])),
                   int(mtu) if mtu else None)  # fmt: skip

    def render(self) -> str:
        lines = [MARKER, "[Match]", f"Name={self.link}", ""]
        if self.mtu is not None:
            lines += ["[Link]", f"MTUBytes={self.mtu}", ""]
        lines += ["[Network]", f"DHCP={self.dhcp}"]
        lines += [f"Address={address}" for address in self.addresses]
        if self.gateway:
            lines.append(f"Gateway={self.gateway}")
        lines += [f"DNS={server}" for server in self.dns]
        for destination, gateway in self.routes:
            lines += ["", "[Route]", f"Destination={destination}", f"Gateway={gateway}"]
        return "\n".join(lines) + "\n"


class NetworkOp(Op):
    name = "network"
    description = "Configure a link: addresses, gateway, routes, MTU, DNS (networkd file + netlink); confirm-or-revert"
    risky = True
    schema = (
        Param("interface", Kind.STRING, "the link's name, e.g. eth0", required=True, pattern=LINK),
        Param("state", Kind.STRING, "present, or absent to remove the file (the link keeps its state until "
              "networkd reloads)", default="present", choices=("present", "absent")),
        Param("dhcp", Kind.STRING, "DHCP: no, yes, ipv4 or ipv6", default="no", choices=("no", "yes", "ipv4", "ipv6")),
        Param("addresses", Kind.STRING_LIST, "static addresses with prefix length", default=[],
              check=check_interfaces),
        Param("gateway", Kind.STRING, "default gateway", default="", check=check_gateway),
        Param("routes", Kind.STRING_LIST, "routes, each 'NETWORK via GATEWAY'", default=[], check=check_routes),
        Param("dns", Kind.STRING_LIST, "DNS servers for this link", default=[], check=check_addresses),
        Param("mtu", Kind.INTEGER, "MTU in bytes", minimum=576, maximum=65535),
        CONFIRM_TIMEOUT,
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        if params["state"] == "present" and params["dhcp"] == "no" and not params["addresses"]:
            raise InvalidParams("params.addresses", "a link without DHCP needs at least one address")
        if target.live and params["state"] == "present":
            links = live_links()
            if params["interface"] not in links:
                raise InvalidParams("params.interface", f"no link {params['interface']!r}; links: {joined(links)}")

    def plan(self, target: Target, params: Params) -> Plan:
        path = network_file(params["interface"])
        if params["state"] == "absent":
            actions: list[Action] = [RemoveFile(path)] if target.exists(path) else []
            if actions:
                actions.append(FollowUp("try-reload-or-restart", "systemd-networkd.service"))
            return Plan(self.name, tuple(actions))
        wanted = LinkConfig.from_params(params)
        existing = target.read_text(path)
        if existing is not None and not existing.startswith(MARKER):
            raise OpFailed(f"{path} exists and was not written by rastosd; move it away or merge it by hand")
        actions = file_action(target, path, wanted.render())
        if target.live:
            changes = link_changes(wanted)
            if changes.needed:
                actions.append(changes)
        if actions:
            actions.append(FollowUp("try-reload-or-restart", "systemd-networkd.service"))
        return Plan(self.name, tuple(actions))

    def revert_actions(self) -> tuple[Action, ...]:
        return (ReapplyNetworkFiles(), FollowUp("try-reload-or-restart", "systemd-networkd.service"))


def live_links() -> list[str]:
    """The links of this network namespace. Not through pyroute2: check() runs on the daemon's event
    loop, where pyroute2's synchronous API (an event loop of its own) cannot run."""
    return sorted(name for _, name in socket.if_nameindex())


@dataclass(frozen=True)
class LinkChanges(Action):
    """The running link brought to what the file says, through netlink."""

    config: LinkConfig
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    mtu: tuple[int, int] | None = None  # (old, new)
    up: bool = False
    routes: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # to replace: (destination, gateway)
    runtime: ClassVar[bool] = True

    @property
    def needed(self) -> bool:
        return bool(self.add or self.remove or self.mtu or self.up or self.routes)

    def describe(self) -> Change:
        parts = [f"add {a}" for a in self.add] + [f"remove {a}" for a in self.remove]
        if self.mtu:
            parts.append(f"mtu {self.mtu[0]} -> {self.mtu[1]}")
        if self.up:
            parts.append("set up")
        parts += [f"route {d} via {g}" for d, g in self.routes]
        return Change(f"link {self.config.link}", "set", "; ".join(parts))

    def execute(self, target: Target, output: Output) -> None:
        apply_link(self.config, output, self.remove)


def read_link(link: str) -> dict[str, Any]:
    from pyroute2 import IPRoute

    with IPRoute() as netlink:
        indexes = netlink.link_lookup(ifname=link)
        if not indexes:
            raise OpFailed(f"link {link} does not exist")
        index = indexes[0]
        info = netlink.get_links(index)[0]
        addresses = [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in netlink.get_addr(index=index) if a["scope"] == 0
        ]  # fmt: skip  (scope 0: global; link-local ones are the kernel's)
        routes = set()
        for family in (2, 10):
            for route in netlink.get_routes(family=family, table=254):
                if route.get_attr("RTA_OIF") != index or route.get_attr("RTA_GATEWAY") is None:
                    continue
                destination = route.get_attr("RTA_DST")
                network = "default" if destination is None else f"{destination}/{route['dst_len']}"
                routes.add((network, str(route.get_attr("RTA_GATEWAY"))))
        return {"index": index, "mtu": info.get_attr("IFLA_MTU"), "up": bool(info["flags"] & 1),
                "addresses": {str(ipaddress.ip_interface(a)) for a in addresses}, "routes": routes}  # fmt: skip


def wanted_routes(config: LinkConfig) -> set[tuple[str, str]]:
    routes = set(config.routes)
    if config.gateway:
        routes.add(("default", config.gateway))
    return routes


def link_changes(config: LinkConfig) -> LinkChanges:
    now = read_link(config.link)
    add = tuple(sorted(set(config.addresses) - now["addresses"]))
    remove = tuple(sorted(now["addresses"] - set(config.addresses))) if config.dhcp == "no" else ()
    mtu = (now["mtu"], config.mtu) if config.mtu is not None and now["mtu"] != config.mtu else None
    routes = tuple(sorted(wanted_routes(config) - now["routes"]))
    return LinkChanges(config, add, remove, mtu, not now["up"], routes)


def apply_link(config: LinkConfig, output: Output, remove: tuple[str, ...] | None = None) -> None:
    from pyroute2 import IPRoute

    now = read_link(config.link)
    index = now["index"]
    if remove is None:
        remove = tuple(sorted(now["addresses"] - set(config.addresses))) if config.dhcp == "no" else ()
    with IPRoute() as netlink:
        if config.mtu is not None and now["mtu"] != config.mtu:
            netlink.link("set", index=index, mtu=config.mtu)
            output(f"{config.link}: mtu {config.mtu}")
        if not now["up"]:
            netlink.link("set", index=index, state="up")
            output(f"{config.link}: up")
        # Add before remove: a host moved from one address to another is never left with none.
        for address in sorted(set(config.addresses) - now["addresses"]):
            interface = ipaddress.ip_interface(address)
            netlink.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            output(f"{config.link}: added {address}")
        if any(ipaddress.ip_interface(address).version == 4 for address in remove):
            # Deleting a subnet's first (primary) IPv4 address deletes the others in it too, unless they
            # are promoted: the new address would vanish with the old. networkd sets this on its links.
            Path(f"/proc/sys/net/ipv4/conf/{config.link}/promote_secondaries").write_text("1\n")
        for address in remove:
            interface = ipaddress.ip_interface(address)
            netlink.addr("del", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            output(f"{config.link}: removed {address}")
        for destination, gateway in sorted(wanted_routes(config) - now["routes"]):
            family = 10 if ":" in gateway else 2
            network = ("::/0" if family == 10 else "0.0.0.0/0") if destination == "default" else destination
            netlink.route("replace", dst=network, gateway=gateway, oif=index, family=family)
            output(f"{config.link}: route {destination} via {gateway}")


@dataclass(frozen=True)
class ReapplyNetworkFiles(Action):
    """After a revert: every link with a file of ours brought back to that file."""

    runtime: ClassVar[bool] = True

    def describe(self) -> Change:
        return Change("links with rastosd network files", "set", "brought back to their files")

    def execute(self, target: Target, output: Output) -> None:
        for name in target.files.names(NETWORK_DIR):
            if not (name.startswith("50-rastos-") and name.endswith(".network")):
                continue
            link = name.removeprefix("50-rastos-").removesuffix(".network")
            text = target.read_text(f"{NETWORK_DIR}/{name}") or ""
            if text.startswith(MARKER):
                apply_link(LinkConfig.from_file(link, text), output)
