"""`firewall`: an nftables ruleset: inbound denied but for the ports named, ssh rate-limited per source.

The rules live in a table of their own (`inet rastos`) in /etc/nftables.conf, which Debian's
nftables.service loads at boot; other tables (a container engine's, libvirt's) are left alone, where
the usual `flush ruleset` would wipe them. The file declares the table, deletes it and defines it anew
in one `nft -f` transaction: loading it twice gives the same rules, and a loaded file never half-applies.

A ruleset is checked with `nft -c` (parsed and validated by the kernel, nothing committed) before it
is written, so a file nftables.service would fail on never reaches /etc. Established connections are
accepted before anything else: the session that applies the rules keeps going whatever they say. A
change is confirm-or-revert (confirm.py): not confirmed in time, the old file comes back and is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ops.actions import Action, Change, CheckedWrite, Output, RunCommand
from ops.base import Op, Plan, file_action
from ops.errors import InvalidParams, OpFailed
from ops.params import CONFIRM_TIMEOUT, Kind, Param, Params
from ops.target import Target, in_target
from rastos.errors import CommandError
from rastos.process import run

RULESET = "/etc/nftables.conf"
TABLE = "rastos"
ENABLED_LINK = "/etc/systemd/system/sysinit.target.wants/nftables.service"
PORT = r"[0-9]{1,5}(-[0-9]{1,5})?"
RATE = r"[0-9]{1,6}/(second|minute|hour)"
INTERFACE = r"[a-zA-Z0-9_.:-]{1,15}"


def check_ports(ports: list[str]) -> str | None:
    for item in ports:
        numbers = [int(n) for n in item.split("-")]
        if not all(1 <= n <= 65535 for n in numbers) or numbers != sorted(numbers):
            return f"{item!r} is not a port (1-65535) or a rising range of ports"
    return None


class FirewallOp(Op):
    name = "firewall"
    description = (
        "nftables: deny inbound but for the ports named, rate-limit ssh per source; checked, confirm-or-revert"
    )
    after = ("network",)  # rules may name interfaces that network makes
    risky = True
    schema = (
        Param("allow_tcp", Kind.STRING_LIST, "TCP ports or ranges open to all, e.g. [\"80\", \"8000-8080\"]",
              default=[], pattern=PORT, pattern_help="a port or a range like 8000-8080", check=check_ports),
        Param("allow_udp", Kind.STRING_LIST, "UDP ports or ranges open to all", default=[], pattern=PORT,
              pattern_help="a port or a range like 8000-8080", check=check_ports),
        Param("ssh_port", Kind.INTEGER, "the ssh port, open with a per-source rate limit (0: closed)", default=22,
              minimum=0, maximum=65535),
        Param("ssh_rate", Kind.STRING, "new ssh connections allowed per source address", default="10/minute",
              pattern=RATE, pattern_help="a count per second, minute or hour, e.g. 10/minute"),
        Param("trusted_interfaces", Kind.STRING_LIST, "interfaces whose inbound traffic is all accepted",
              default=[], pattern=INTERFACE),
        Param("allow_ping", Kind.BOOLEAN, "answer ICMP echo (ICMPv6 neighbour discovery is always on)", default=True),
        Param("forward", Kind.STRING, "policy for forwarded packets", default="drop", choices=("drop", "accept")),
        CONFIRM_TIMEOUT,
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        if not target.has_program("/usr/sbin/nft"):
            raise InvalidParams("op", "nftables is not installed on the target (apt install nftables, or op update)")

    def plan(self, target: Target, params: Params) -> Plan:
        content = render(params)
        actions: list[Action] = []
        old = target.read_text(RULESET)
        if file_action(target, RULESET, content, mode=0o755):
            actions.append(CheckedRuleset(RULESET, content, old))
        if target.files.kind(ENABLED_LINK) != "link":  # systemctl's own link: looked at, not followed
            argv = ("systemctl", "--root={root}", "enable", "nftables.service")
            actions.append(RunCommand("unit nftables.service", argv, (ENABLED_LINK,), makes_links=True))
        if target.live and (actions or loaded_ruleset(target) != expected_table(target, content)):
            actions.append(LoadRuleset(RULESET))
        return Plan(self.name, tuple(actions))

    def revert_actions(self) -> tuple[Action, ...]:
        return (LoadRuleset(RULESET),)


def render(params: Params) -> str:
    input_rules = [
        'iifname "lo" accept',
        "ct state established,related accept",
        # A TCP connection opened before connection tracking was on (no ruleset used it yet) is picked up
        # mid-stream, and its first packet then counts as `new`: without this rule, the session applying
        # the first firewall to a host would freeze. A packet without SYN opens nothing: the kernel
        # answers one for an unknown connection with a reset.
        "ct state new tcp flags & (syn | rst | fin) == 0 accept",
        "ct state invalid drop",
        # Without neighbour discovery IPv6 stops working at all; it is not a service to close.
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, nd-router-solicit } accept",
    ]
    for interface in params["trusted_interfaces"]:
        input_rules.append(f'iifname "{interface}" accept')
    if params["allow_ping"]:
        input_rules += ["icmp type echo-request limit rate 20/second accept",
                        "icmpv6 type echo-request limit rate 20/second accept"]  # fmt: skip
    if params["ssh_port"]:
        port, rate = params["ssh_port"], params["ssh_rate"]
        input_rules += [
            f"tcp dport {port} ct state new meter ssh4 {{ ip saddr limit rate over {rate} }} drop",
            f"tcp dport {port} ct state new meter ssh6 {{ ip6 saddr limit rate over {rate} }} drop",
            f"tcp dport {port} accept",
        ]
    for protocol in ("tcp", "udp"):
        ports = params[f"allow_{protocol}"]
        if ports:
            input_rules.append(f"{protocol} dport {{ {', '.join(ports)} }} accept")
    lines = [
        "#!/usr/sbin/nft -f",
        "# Written by rastosd (op firewall); changes made here are replaced at the next apply.",
        "# Declared, deleted and defined again in one transaction: loading it twice gives the same rules.",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        *(f"\t\t{rule}" for rule in input_rules),
        "\t}",
        "\tchain forward {",
        f"\t\ttype filter hook forward priority filter; policy {params['forward']};",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft(target: Target, *args: str) -> list[str]:
    return in_target(target, ["nft", *args])


def check_ruleset(target: Target, content: str) -> None:
    """`nft -c`: the kernel validates the whole transaction and commits nothing."""
    with target.files.scratch_directory("/etc", ".rastos-nft-check-") as scratch:
        target.files.write(f"{scratch}/ruleset.nft", content, 0o600)
        try:
            run(nft(target, "-c", "-f", f"{scratch}/ruleset.nft"), capture=True)
        except CommandError as error:
            raise OpFailed(f"nft -c refuses the ruleset, left unchanged: {error}") from None


def loaded_ruleset(target: Target) -> str:
    """The table as the kernel has it now, without the elements of sets (the ssh meters fill those
    as clients connect); empty when it is not loaded."""
    result = run(nft(target, "--terse", "list", "table", "inet", TABLE), capture=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def expected_table(target: Target, content: str) -> str:
    """The table as the kernel would print it once `content` is loaded: nft normalises what it reads,
    so the comparison is between two of its own listings, made in a throwaway network namespace."""
    with target.files.scratch_directory("/etc", ".rastos-nft-") as scratch:
        target.files.write(f"{scratch}/ruleset.nft", content, 0o600)
        script = f"nft -f {scratch}/ruleset.nft && nft --terse list table inet {TABLE}"
        argv = ["unshare", "--net", "--", *in_target(target, ["sh", "-c", script])]
        result = run(argv, capture=True, check=False)
    return result.stdout if result.returncode == 0 else "(cannot be loaded)"


@dataclass(frozen=True)
class CheckedRuleset(CheckedWrite):
    """The ruleset file, written only after `nft -c` accepted it (executable: it starts with #!/usr/sbin/nft)."""

    checker: ClassVar[str] = "nft -c"
    what: ClassVar[str] = "ruleset"
    mode: ClassVar[int] = 0o755

    def check(self, target: Target) -> None:
        check_ruleset(target, self.content)


@dataclass(frozen=True)
class LoadRuleset(Action):
    """The file loaded into the running kernel: `nft -f`, one atomic transaction."""

    path: str
    runtime: ClassVar[bool] = True

    def describe(self) -> Change:
        return Change(f"nftables table inet {TABLE}", "load", f"nft -f {self.path}")

    def execute(self, target: Target, output: Output) -> None:
        if target.read_text(self.path) is None:  # a revert to no file: the table goes
            if loaded_ruleset(target):
                run(nft(target, "delete", "table", "inet", TABLE), capture=True)
                output(f"table inet {TABLE} removed")
            return
        run(nft(target, "-f", self.path), capture=True)
        output(f"loaded {self.path}")
