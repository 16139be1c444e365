"""Kernel parameters (CIS Debian 1.5 and 3.3): read where systemd-sysctl reads them at boot, and on a
live target in the running kernel too. A key no file sets fails: the kernel's default depends on how it
was built, and the benchmark asks for the value to be set, not assumed. Each check is remediated by the
op sysctl's tuning set its keys come from, so the values the checks want are the sets' own."""

from __future__ import annotations

from collections.abc import Callable

from daemon.compliance.facts import Facts
from daemon.compliance.model import Check, Outcome, Remediation, Severity, failed, not_applicable, passed
from ops.sysctl import SETS

Accept = Callable[[str], bool]


def exactly(wanted: str) -> tuple[Accept, str]:
    return (lambda value: value == wanted), wanted


def at_least(minimum: int) -> tuple[Accept, str]:
    return (lambda value: value.lstrip("-").isdigit() and int(value) >= minimum), f"{minimum} or more"


def sysctl_check(
    check_id: str, title: str, rationale: str, severity: Severity, set_name: str, keys: tuple[str, ...],
    accept: tuple[Accept, str] | None = None,
) -> Check:  # fmt: skip
    ok, wanted = accept or exactly(SETS[set_name][keys[0]])

    def evaluate(facts: Facts) -> Outcome:
        for key in keys:
            running = facts.running(key) if facts.target.live else None
            if facts.target.live and running is None:
                return not_applicable(f"the running kernel has no {key}")
            setting = facts.sysctl.get(key)
            if setting is None:
                now = f"; the kernel has {running} now" if running is not None else ""
                return failed(f"{key} is set in no sysctl.d file (wants {wanted}){now}")
            if not ok(setting.value):
                return failed(f"{key} = {setting.value} in {setting.source} (wants {wanted})")
            if running is not None and not ok(" ".join(running.split())):
                return failed(f"{key} is {running} in the running kernel, {setting.value} in {setting.source}")
        sources = sorted({facts.sysctl[key].source for key in keys})
        shown = f"{keys[0]} = {facts.sysctl[keys[0]].value}" if len(keys) == 1 else f"{len(keys)} keys as wanted"
        return passed(f"{shown} ({', '.join(sources)})")

    return Check(check_id, title, rationale, severity, evaluate, Remediation("sysctl", {"sets": [set_name]}))


def all_default(*suffixes: str, families: tuple[str, ...] = ("ipv4",)) -> tuple[str, ...]:
    """net.ipvN.conf.{all,default}.SUFFIX: the interfaces there are, and those that come up later."""
    return tuple(f"net.{family}.conf.{which}.{suffix}" for suffix in suffixes for family in families
                 for which in ("all", "default"))  # fmt: skip


S, N = "security", "network"
KERNEL_CHECKS = (
    sysctl_check("kernel-aslr", "Address space layout randomisation is full",
                 "Random stack, mmap, heap and vDSO addresses make memory corruption exploits guess.",
                 Severity.HIGH, S, ("kernel.randomize_va_space",)),
    sysctl_check("kernel-ptrace-scope", "ptrace is limited to descendants (Yama)",
                 "Otherwise any process may read the memory of every other process of the same user.",
                 Severity.MEDIUM, S, ("kernel.yama.ptrace_scope",), at_least(1)),
    sysctl_check("kernel-suid-dumpable", "setuid programs leave no core dumps",
                 "A setuid program's core dump holds another user's secrets, readable by the caller.",
                 Severity.MEDIUM, S, ("fs.suid_dumpable",)),
    sysctl_check("kernel-kptr-restrict", "Kernel pointers are hidden",
                 "Kernel addresses in /proc and logs defeat KASLR for an exploit.",
                 Severity.MEDIUM, S, ("kernel.kptr_restrict",), at_least(1)),
    sysctl_check("kernel-dmesg-restrict", "The kernel log is for privileged users only",
                 "The kernel log leaks addresses and hardware details to any local user.",
                 Severity.LOW, S, ("kernel.dmesg_restrict",)),
    sysctl_check("kernel-unprivileged-bpf", "Unprivileged BPF is off",
                 "BPF programs loaded by unprivileged users are a frequent path to kernel exploits.",
                 Severity.MEDIUM, S, ("kernel.unprivileged_bpf_disabled",), at_least(1)),
    sysctl_check("kernel-bpf-jit-harden", "The BPF JIT is hardened for every user",
                 "Blinded constants in JIT-compiled BPF make JIT spraying attacks much harder.",
                 Severity.LOW, S, ("net.core.bpf_jit_harden",)),
    sysctl_check("kernel-protected-links", "Hard and symbolic links are protected",
                 "Links to other users' files in /tmp are the classic race against setuid programs.",
                 Severity.MEDIUM, S, ("fs.protected_hardlinks", "fs.protected_symlinks")),
    sysctl_check("kernel-protected-fifos-regular", "FIFOs and files in sticky directories are protected",
                 "A FIFO or file planted in /tmp is not opened as one's own by a privileged program.",
                 Severity.LOW, S, ("fs.protected_fifos", "fs.protected_regular"), at_least(1)),
    sysctl_check("kernel-sysrq", "Magic SysRq keys are off",
                 "SysRq reboots or kills processes from a keyboard or serial console without a login.",
                 Severity.LOW, S, ("kernel.sysrq",)),
    sysctl_check("kernel-perf-paranoid", "perf events are for privileged users",
                 "perf exposes a large kernel attack surface and side channels to unprivileged users.",
                 Severity.LOW, S, ("kernel.perf_event_paranoid",), at_least(2)),
    sysctl_check("net-rp-filter", "Reverse path filtering is strict",
                 "Packets whose source could not be answered over their interface are spoofed: dropped.",
                 Severity.MEDIUM, N, all_default("rp_filter")),
    sysctl_check("net-no-accept-redirects", "ICMP redirects are not accepted (IPv4 and IPv6)",
                 "A redirect rewrites the host's routes from outside, a way to man-in-the-middle it.",
                 Severity.MEDIUM, N, all_default("accept_redirects", families=("ipv4", "ipv6"))),
    sysctl_check("net-no-secure-redirects", "Secure ICMP redirects are not accepted",
                 "A 'secure' redirect only has to come from a gateway, which is who a spoofer pretends to be.",
                 Severity.MEDIUM, N, all_default("secure_redirects")),
    sysctl_check("net-no-send-redirects", "ICMP redirects are not sent",
                 "A host that is no router has no business telling others their routes.",
                 Severity.MEDIUM, N, all_default("send_redirects")),
    sysctl_check("net-no-source-route", "Source-routed packets are refused (IPv4 and IPv6)",
                 "A source-routed packet chooses its own way in, around the filters on the usual path.",
                 Severity.MEDIUM, N, all_default("accept_source_route", families=("ipv4", "ipv6"))),
    sysctl_check("net-log-martians", "Packets with impossible addresses are logged",
                 "Martians are the trace of spoofing or a routing mistake; the log shows both.",
                 Severity.LOW, N, all_default("log_martians")),
    sysctl_check("net-tcp-syncookies", "TCP SYN cookies are on",
                 "With a full backlog, SYN cookies keep answering real clients during a SYN flood.",
                 Severity.MEDIUM, N, ("net.ipv4.tcp_syncookies",)),
    sysctl_check("net-icmp-ignore-broadcasts", "Broadcast pings are ignored",
                 "Answering broadcast pings makes the host an amplifier in a smurf attack.",
                 Severity.LOW, N, ("net.ipv4.icmp_echo_ignore_broadcasts",)),
    sysctl_check("net-icmp-ignore-bogus", "Bogus ICMP error responses are ignored",
                 "Malformed ICMP errors would only fill the log and hide what matters in it.",
                 Severity.LOW, N, ("net.ipv4.icmp_ignore_bogus_error_responses",)),
)  # fmt: skip
