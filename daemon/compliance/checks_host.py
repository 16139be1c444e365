"""The firewall, login banners, sudo, updates (CIS Debian 4, 1.7, 5.2, 1.9) and the host certificate.

The firewall is judged by what boots: nftables.service enabled and /etc/nftables.conf dropping what
no rule accepts on input. The op firewall writes exactly that (keeping sshd's port, and on a live
system the ports something listens on: facts.Facts.firewall_context), confirm-or-revert."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable

from daemon.compliance.facts import Facts
from daemon.compliance.model import Check, Outcome, Remediation, Severity, failed, not_applicable, passed
from ops.certs import HOST_CERT, RENEW_BEFORE_DAYS, load_cert
from ops.firewall import RULESET

BANNER = "Authorized access only. Activity on this system is monitored and recorded.\n"
# getty's escapes for the machine, release, system name and version: what an attacker wants to know.
ESCAPES = re.compile(r"\\[mrsv]")
INPUT_DROP = re.compile(r"hook\s+input\b[^;}]*;\s*policy\s+drop\s*;")
UNATTENDED = re.compile(r'^\s*APT::Periodic::Unattended-Upgrade\s+"1"\s*;', re.MULTILINE)


def nftables_enabled(facts: Facts) -> Outcome:
    if not facts.nftables_installed:
        return failed("nftables is not installed: apt install nftables, then remediate", remediable=False)
    if not facts.nftables_enabled:
        return failed("nftables.service is not enabled: no ruleset is loaded at boot")
    if not facts.exists(RULESET):
        return failed(f"nftables.service is enabled but {RULESET} is missing")
    return passed(f"nftables.service is enabled and loads {RULESET}")


def input_policy_drop(facts: Facts) -> Outcome:
    if not facts.nftables_installed:
        return failed("nftables is not installed: apt install nftables, then remediate", remediable=False)
    text = facts.text(RULESET)
    if text is None:
        return failed(f"{RULESET} is missing")
    if INPUT_DROP.search(text):
        return passed(f"{RULESET} has an input chain with policy drop")
    return failed(f"no input chain in {RULESET} has policy drop: inbound traffic is accepted by default")


def banner_without_system(*paths: str) -> Callable[[Facts], Outcome]:
    def evaluate(facts: Facts) -> Outcome:
        names = operating_system_names(facts)
        problems, present = [], []
        for path in paths:
            text = facts.text(path)
            if text is None:
                continue
            present.append(path)
            named = [name for name in names if name.lower() in text.lower()] + ESCAPES.findall(text)
            if named:
                problems.append(f"{path} names the system ({named[0]!r})")
        if problems:
            return failed("; ".join(problems))
        return passed(f"{', '.join(present)} name no system") if present else passed(f"no {' or '.join(paths)}")

    return evaluate


def operating_system_names(facts: Facts) -> list[str]:
    """What os-release calls the system (Debian), which a banner should not tell."""
    names = []
    for line in (facts.text("/etc/os-release") or facts.text("/usr/lib/os-release") or "").splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "NAME") and (value := value.strip().strip('"')):
            names.append(value.split()[0])
    return list(dict.fromkeys(names)) or ["Debian"]


def sudo_use_pty(facts: Facts) -> Outcome:
    if not facts.exists("/usr/bin/sudo"):
        return not_applicable("sudo is not installed")
    files = ["/etc/sudoers", *(f"/etc/sudoers.d/{name}" for name in facts.names("/etc/sudoers.d"))]
    found = ""
    for path in files:
        for line in (facts.text(path) or "").splitlines():
            if re.match(r"^\s*Defaults\b.*\b!use_pty\b", line):
                return failed(f"{path} turns use_pty off")
            if re.match(r"^\s*Defaults\b.*\buse_pty\b", line):
                found = path
    return passed(f"Defaults use_pty in {found}") if found else failed("no Defaults use_pty in sudoers")


def automatic_updates(facts: Facts) -> Outcome:
    if not facts.exists("/usr/bin/unattended-upgrade"):
        return failed("unattended-upgrades is not installed: security updates wait for someone to apply them")
    for name in facts.names("/etc/apt/apt.conf.d"):
        if UNATTENDED.search(facts.text(f"/etc/apt/apt.conf.d/{name}") or ""):
            return passed(f'APT::Periodic::Unattended-Upgrade "1" in /etc/apt/apt.conf.d/{name}')
    return failed('unattended-upgrades is installed but APT::Periodic::Unattended-Upgrade is not "1"')


def host_certificate_not_expiring(facts: Facts) -> Outcome:
    if not facts.exists(HOST_CERT):
        return not_applicable(f"no host certificate from the certs op ({HOST_CERT})")
    cert = load_cert(facts.target, HOST_CERT)
    if cert is None:
        return failed(f"{HOST_CERT} cannot be read")
    expiry = cert.not_valid_after_utc
    left = (expiry - datetime.datetime.now(datetime.UTC)).days
    if left < 0:
        return failed(f"{HOST_CERT} expired on {expiry:%Y-%m-%d}")
    if left < RENEW_BEFORE_DAYS:
        return failed(f"{HOST_CERT} expires on {expiry:%Y-%m-%d}, in {left} days (wants {RENEW_BEFORE_DAYS} or more)")
    return passed(f"{HOST_CERT} is valid until {expiry:%Y-%m-%d} ({left} days)")


HOST_CHECKS = (
    Check("firewall-enabled", "A firewall ruleset is loaded at boot",
          "Without a ruleset at boot, every service that listens is reachable from everywhere.",
          Severity.HIGH, nftables_enabled, Remediation("firewall", {})),
    Check("firewall-input-drop", "Inbound traffic is dropped unless a rule accepts it",
          "A default-deny input policy keeps a service started by accident (or by an attacker) unreachable.",
          Severity.HIGH, input_policy_drop, Remediation("firewall", {})),
    Check("banner-motd", "The message of the day does not name the system",
          "Naming the distribution and release tells an attacker which exploits to try.",
          Severity.LOW, banner_without_system("/etc/motd"), Remediation("motd", {"text": BANNER})),
    Check("banner-issue", "Login banners before a login do not name the system",
          "/etc/issue and issue.net are shown before anyone logged in: to anyone at all.",
          Severity.LOW, banner_without_system("/etc/issue", "/etc/issue.net"),
          manual=f"write a neutral notice to /etc/issue and /etc/issue.net, e.g. {BANNER.strip()!r}"),
    Check("sudo-use-pty", "sudo runs commands in a pseudo-terminal",
          "Without a pty, a command run with sudo can push input into the caller's terminal after it ends.",
          Severity.MEDIUM, sudo_use_pty, manual="Defaults use_pty in /etc/sudoers.d/use-pty (visudo -f)"),
    Check("certs-host-not-expiring", "The host certificate is not about to expire",
          "An expired certificate stops every client that checks it, all at once and without warning.",
          Severity.MEDIUM, host_certificate_not_expiring, Remediation("certs", {})),
    Check("updates-automatic", "Security updates are installed automatically",
          "Most compromises use known, fixed vulnerabilities; a fix applied next month is a month late.",
          Severity.MEDIUM, automatic_updates,
          manual="apt install unattended-upgrades; dpkg-reconfigure -plow unattended-upgrades"),
)  # fmt: skip
