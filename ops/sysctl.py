"""`sysctl`: kernel parameters, persisted in one file of /etc/sysctl.d and set at once on a live system.

Besides keys given one by one (`settings`), a step may name tuning *sets* (`sets`): security, network,
performance. Their keys are merged with `settings`, and an explicit setting wins over a set's. A set is
tuning anyone may want whole; what each key is for is said beside it below.

A set's key that the target's kernel cannot take is left out, and the file says so: on a live system a
key /proc/sys lacks (a kernel built without Yama has no kernel.yama.*), and a value that needs a module
the kernel does not have (BBR, fq). A key given explicitly is refused instead (`check`): a typo there
must not pass silently. What the sets set is also what daemon/compliance checks, so both read `SETS`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ops.actions import Action, RemoveFile, WriteSysctl
from ops.base import Op, Plan, file_action
from ops.errors import InvalidParams, UnsafePath
from ops.params import Kind, Param, Params
from ops.rootfs import Links
from ops.target import Target

KEY = r"[a-z0-9_]+(\.[a-z0-9_-]+)+"
VALUE = r"[^\n\r]{1,4096}"
NAME = r"[0-9]{2}-[a-z0-9-]{1,48}"

SETS: dict[str, dict[str, str]] = {
    "security": {
        # Kernel addresses in /proc and logs hidden even from root: they give KASLR away to an exploit.
        "kernel.kptr_restrict": "2",
        # The kernel log only for CAP_SYSLOG: it leaks addresses and hardware details to any user.
        "kernel.dmesg_restrict": "1",
        # ptrace only of one's own descendants: a compromised process cannot read another's memory.
        "kernel.yama.ptrace_scope": "1",
        # No BPF programs for unprivileged users: a frequent source of kernel exploits.
        "kernel.unprivileged_bpf_disabled": "1",
        # Constants blinded in JIT-compiled BPF for every user: makes JIT spraying much harder.
        "net.core.bpf_jit_harden": "2",
        # No hard links to files one does not own: the classic /tmp race against setuid programs.
        "fs.protected_hardlinks": "1",
        # Symlinks in sticky world-writable directories followed only for their owner (/tmp races).
        "fs.protected_symlinks": "1",
        # No O_CREAT opens of another user's FIFO in a sticky directory: data spoofing in /tmp.
        "fs.protected_fifos": "2",
        # The same for regular files: a planted file in /tmp is not opened as one's own.
        "fs.protected_regular": "2",
        # No core dumps of setuid programs: they hold secrets (shadow hashes) of another user.
        "fs.suid_dumpable": "0",
        # Full address space layout randomisation: stack, mmap, heap and vDSO at random places.
        "kernel.randomize_va_space": "2",
        # No magic SysRq from the keyboard or serial console: it reboots or kills without a login.
        "kernel.sysrq": "0",
        # perf events only for the privileged (Debian's level 3): a large attack surface and side channel.
        "kernel.perf_event_paranoid": "3",
    },
    "network": {
        # Reverse path filtering: drop packets whose source could not be answered over that interface.
        "net.ipv4.conf.all.rp_filter": "1",
        # ...and for interfaces that come up later.
        "net.ipv4.conf.default.rp_filter": "1",
        # ICMP redirects rewrite the routing table from outside: a host is not told its routes.
        "net.ipv4.conf.all.accept_redirects": "0",
        # ...interfaces that come up later.
        "net.ipv4.conf.default.accept_redirects": "0",
        # ...the same for IPv6.
        "net.ipv6.conf.all.accept_redirects": "0",
        # ...IPv6, interfaces that come up later.
        "net.ipv6.conf.default.accept_redirects": "0",
        # "Secure" redirects come from a gateway, which is exactly who a spoofer pretends to be.
        "net.ipv4.conf.all.secure_redirects": "0",
        # ...interfaces that come up later.
        "net.ipv4.conf.default.secure_redirects": "0",
        # A host that is no router sends no redirects.
        "net.ipv4.conf.all.send_redirects": "0",
        # ...interfaces that come up later.
        "net.ipv4.conf.default.send_redirects": "0",
        # Source-routed packets choose their own way in, around filters: dropped.
        "net.ipv4.conf.all.accept_source_route": "0",
        # ...interfaces that come up later.
        "net.ipv4.conf.default.accept_source_route": "0",
        # ...the same for IPv6.
        "net.ipv6.conf.all.accept_source_route": "0",
        # ...IPv6, interfaces that come up later.
        "net.ipv6.conf.default.accept_source_route": "0",
        # Packets with impossible source addresses logged: the trace of spoofing or a misrouting.
        "net.ipv4.conf.all.log_martians": "1",
        # ...interfaces that come up later.
        "net.ipv4.conf.default.log_martians": "1",
        # SYN cookies when the backlog is full: a SYN flood does not keep real clients out.
        "net.ipv4.tcp_syncookies": "1",
        # No answers to broadcast pings: the host is no amplifier in a smurf attack.
        "net.ipv4.icmp_echo_ignore_broadcasts": "1",
        # Bogus ICMP error responses (RFC 1122 violations) not logged: they only fill the log.
        "net.ipv4.icmp_ignore_bogus_error_responses": "1",
    },
    "performance": {
        # Keep the page cache and swap out only under real pressure: a server's working set stays in RAM.
        "vm.swappiness": "10",
        # Fair queueing with per-flow pacing: one bulk flow cannot starve the others; BBR's companion.
        "net.core.default_qdisc": "fq",
        # BBR paces by measured bandwidth and delay, not by loss: much better on long or lossy paths.
        "net.ipv4.tcp_congestion_control": "bbr",
        # Probe the path MTU when ICMP "fragmentation needed" is filtered somewhere (a PMTU black hole).
        "net.ipv4.tcp_mtu_probing": "1",
    },
}
# Set values the kernel takes only with a module (built in or loadable): left out when it lacks it.
NEEDS_MODULE = {("net.ipv4.tcp_congestion_control", "bbr"): "tcp_bbr", ("net.core.default_qdisc", "fq"): "sch_fq"}
# Where systemd-sysctl reads its files from, the first directory winning for a file name.
SYSCTL_DIRECTORIES = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d")


class SysctlOp(Op):
    name = "sysctl"
    description = (
        "Set kernel parameters, one by one or as tuning sets: /etc/sysctl.d/NAME.conf holds exactly these keys, "
        "applied at once"
    )
    schema = (
        Param("settings", Kind.STRING_MAP, "key -> value, e.g. {\"vm.swappiness\": \"10\"}; these win over sets",
              default={}, key_pattern=KEY, pattern=VALUE),
        Param("sets", Kind.STRING_LIST, "tuning sets merged in: security, network, performance", default=[],
              choices=tuple(SETS)),
        Param("name", Kind.STRING, "the file's name without .conf, ordered by its number", default="90-rastos",
              pattern=NAME),
    )  # fmt: skip

    def plan(self, target: Target, params: Params) -> Plan:
        wanted = wanted_settings(target, params)
        path = f"/etc/sysctl.d/{params['name']}.conf"
        if not wanted.settings:  # nothing asked for (no settings, no sets): the file goes
            return Plan(self.name, (RemoveFile(path),) if target.exists(path) else ())
        actions: list[Action] = file_action(target, path, render(params["sets"], wanted))
        if target.live:
            for key, value in sorted(wanted.settings.items()):
                current = read_live(key)
                if normalize(current) != normalize(value):
                    actions.append(WriteSysctl(key, value, current))
        return Plan(self.name, tuple(actions))

    def check(self, target: Target, params: Params) -> None:
        if target.live:
            for key in params["settings"]:
                if not live_path(key).is_file():
                    raise InvalidParams(f"params.settings.{key}", "this kernel has no such parameter")

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = super().verify(target, params)
        if target.live:
            problems += [
                f"{key} is {read_live(key)!r}, not {value!r}"
                for key, value in wanted_settings(target, params).settings.items()
                if normalize(read_live(key)) != normalize(value)
            ]
        return problems


@dataclass(frozen=True)
class Wanted:
    settings: dict[str, str]  # what the file holds: the sets' keys, then the explicit settings over them
    left_out: tuple[str, ...]  # set keys the target's kernel cannot take


def wanted_settings(target: Target, params: Params) -> Wanted:
    explicit: dict[str, str] = params["settings"]
    merged: dict[str, str] = {}
    left_out: list[str] = []
    for name in dict.fromkeys(params["sets"]):
        for key, value in SETS[name].items():
            if key in explicit:
                continue
            if kernel_lacks(target, key, value):
                left_out.append(key)
            else:
                merged[key] = value
    return Wanted(merged | explicit, tuple(left_out))


def render(sets: list[str], wanted: Wanted) -> str:
    lines = ["# Written by rastosd (op sysctl); changes made here are replaced at the next apply."]
    if sets:
        lines.append(f"# Sets: {', '.join(dict.fromkeys(sets))}; explicit settings win over them.")
    if wanted.left_out:
        lines.append(f"# Left out, this kernel cannot take them: {', '.join(sorted(wanted.left_out))}")
    lines += [f"{key} = {value}" for key, value in sorted(wanted.settings.items())]
    return "\n".join(lines) + "\n"


def kernel_lacks(target: Target, key: str, value: str) -> bool:
    """Whether the kernel the target runs (live) or boots (its own modules) cannot take a set's value."""
    if target.live and not live_path(key).is_file():
        return True
    module = NEEDS_MODULE.get((key, value))
    if module is None:
        return False
    if target.live:
        available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
        if key == "net.ipv4.tcp_congestion_control" and available.is_file() and value in available.read_text().split():
            return False
        return not has_module(Path("/usr/lib/modules", os.uname().release), module)
    kernels = [f"/usr/lib/modules/{name}" for name in target.files.names("/usr/lib/modules")]
    kernels = [kernel for kernel in kernels if target.is_dir(kernel)]
    return not kernels or not all(has_module_in(target, kernel, module) for kernel in kernels)


def has_module(directory: Path, module: str) -> bool:
    """A module built into the running kernel or loadable, from the kernel's own module lists."""
    return any(_lists_module(listing.read_text(), module) for listing in
               (directory / "modules.builtin", directory / "modules.dep") if listing.is_file())  # fmt: skip


def has_module_in(target: Target, kernel: str, module: str) -> bool:
    """The same for a kernel the target boots (its modules directory in the target)."""
    return any(_lists_module(target.read_text(f"{kernel}/{listing}") or "", module)
               for listing in ("modules.builtin", "modules.dep"))  # fmt: skip


def _lists_module(listing: str, module: str) -> bool:
    return re.search(rf"/{re.escape(module)}\.ko(\.[a-z]+)?(:|$)", listing, re.MULTILINE) is not None


def live_path(key: str) -> Path:
    return Path("/proc/sys", *key.split("."))


def read_live(key: str) -> str:
    try:
        return live_path(key).read_text().strip()
    except FileNotFoundError:
        return "(no such key)"


def normalize(value: str) -> str:
    """The kernel prints vectors with tabs; a profile writes them with spaces."""
    return " ".join(value.split())


@dataclass(frozen=True)
class Persisted:
    value: str
    source: str  # the file that sets it last, as the target names it


def persisted(target: Target) -> dict[str, Persisted]:
    """What systemd-sysctl sets at boot, read as it reads: *.conf of its directories, a file name in an
    earlier directory hiding the same name in later ones, all files in name order, the last assignment
    winning. Keys with globs (systemd's net.ipv4.conf.*.x) are not expanded."""
    files: dict[str, str] = {}
    for directory in SYSCTL_DIRECTORIES:
        # merged /usr: /lib/sysctl.d is /usr/lib/sysctl.d again, its names already taken
        for name in target.files.names(directory, links=Links.SYSTEM):
            if name.endswith(".conf"):
                files.setdefault(name, f"{directory}/{name}")
    values: dict[str, Persisted] = {}
    for name in sorted(files):
        text = read_in_target(target, files[name])
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key = key.strip().lstrip("-").replace("/", ".")
            if not any(c in key for c in "*?["):
                values[key] = Persisted(value.strip(), files[name])
    return values


def read_in_target(target: Target, absolute: str) -> str:
    """A file's text with the distribution's links resolved inside the target (Debian's 99-sysctl.conf
    points to ../sysctl.conf; a link to /dev/null masks a file); "" when it is missing or no regular
    file. A link root did not make is refused (UnsafePath)."""
    try:
        kind = target.files.kind(absolute, links=Links.SYSTEM)
    except FileNotFoundError:
        return ""  # a dangling link
    return (target.read_text(absolute, links=Links.SYSTEM) or "") if kind == "file" else ""


def resolve_in_target(target: Target, absolute: str) -> str | None:
    """`absolute` with the distribution's links on the way followed as the target sees them: an
    absolute link is the target's path, never the host's. None for a loop of links or a link root did
    not make."""
    try:
        return target.files.resolve(absolute)
    except UnsafePath:
        return None
