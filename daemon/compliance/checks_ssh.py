"""The OpenSSH server (CIS Debian 5.1), read as sshd itself resolves its files: `sshd -T`. Not applicable
where openssh-server is not installed. Most are remediated by the op ssh, whose drop-in wins over the
main file; the step keeps everything a failed check does not name (facts.Facts.ssh_context)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.compliance.facts import Facts
from daemon.compliance.model import Check, Outcome, Remediation, Severity, failed, not_applicable, passed

WEAK_CIPHERS = ("cbc", "3des", "arcfour", "blowfish", "cast128", "rijndael")
WEAK_MACS = ("md5", "sha1", "umac-64", "ripemd")
WEAK_KEX = ("diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1")


def sshd_check(
    check_id: str, title: str, rationale: str, severity: Severity, keywords: tuple[str, ...],
    ok: Callable[..., bool], wanted: str, fix: dict[str, Any] | None = None, manual: str = "",
) -> Check:  # fmt: skip
    """`ok` gets the first value of each keyword; `fix` is the ssh op's params that make it pass."""

    def evaluate(facts: Facts) -> Outcome:
        sshd = facts.sshd
        if sshd is None:
            return not_applicable("openssh-server is not installed")
        if sshd.error:
            return failed(f"sshd -T refuses the configuration: {sshd.error}", remediable=False)
        values = [sshd.first(keyword) for keyword in keywords]
        shown = ", ".join(f"{keyword} {value or '(unset)'}" for keyword, value in zip(keywords, values, strict=True))
        if ok(*values):
            return passed(f"sshd -T: {shown}")
        refusal = facts.ssh_refusal(judged_with(fix)) if fix is not None else ""
        if refusal:
            return failed(f"sshd -T: {shown} (wants {wanted}); the ssh op cannot fix it here: {refusal}", False)
        return failed(f"sshd -T: {shown} (wants {wanted})")

    remediation = Remediation("ssh", fix) if fix is not None else None
    return Check(check_id, title, rationale, severity, evaluate, remediation, manual)


def judged_with(fix: dict[str, Any]) -> dict[str, Any]:
    """The step a fix may end up in. Passwords off goes with root's login off when that check fails
    too (it does unless root's login is off already): judged together, the key that lets someone in
    must not be root's alone."""
    return fix | {"permit_root_login": "no"} if "password_authentication" in fix else fix


def none_of(weak: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda listing: not any(part in name for name in listing.split(",") for part in weak)


def number_in(low: int, high: int) -> Callable[[str], bool]:
    return lambda value: value.isdigit() and low <= int(value) <= high


DROP_IN = "in a file of /etc/ssh/sshd_config.d read before the others (sshd keeps the first value)"
SSH_CHECKS = (
    sshd_check("ssh-no-root-login", "root cannot log in over SSH",
               "Logins as a named user, then sudo, leave a trail of who did what; root is every attacker's guess.",
               Severity.HIGH, ("permitrootlogin",), lambda v: v == "no", "no", {"permit_root_login": "no"}),
    sshd_check("ssh-no-password-auth", "SSH logins need a key, not a password",
               "Passwords are guessed and reused; keys are neither. The op keeps an account with a key able to log in.",
               Severity.MEDIUM, ("passwordauthentication",), lambda v: v == "no", "no",
               {"password_authentication": False}),
    sshd_check("ssh-no-empty-passwords", "SSH refuses empty passwords",
               "An account with an empty password would be open to anyone who knows its name.",
               Severity.HIGH, ("permitemptypasswords",), lambda v: v == "no", "no", {}),
    sshd_check("ssh-max-auth-tries", "SSH allows at most 4 authentication attempts per connection",
               "Fewer attempts per connection slow a brute-force attack and make it visible in the log.",
               Severity.MEDIUM, ("maxauthtries",), number_in(1, 4), "4 or fewer", {"max_auth_tries": 3}),
    sshd_check("ssh-no-x11-forwarding", "SSH X11 forwarding is off",
               "A server needs no X11; a forwarded display lets the server's side reach the client's screen.",
               Severity.LOW, ("x11forwarding",), lambda v: v == "no", "no", {"x11_forwarding": False}),
    sshd_check("ssh-idle-timeout", "Idle SSH sessions are probed and ended",
               "A session left open on an unattended client is a session anyone at that client can use.",
               Severity.LOW, ("clientaliveinterval", "clientalivecountmax"),
               lambda interval, count: number_in(1, 3600)(interval) and number_in(1, 10)(count),
               "an interval of 1-3600 s and a count of 1-10", {"client_alive_interval": 300}),
    sshd_check("ssh-login-grace-time", "Unauthenticated SSH connections end within a minute",
               "Half-open logins hold sshd's slots: a long grace time makes that denial of service cheap.",
               Severity.LOW, ("logingracetime",), number_in(1, 60), "1-60 seconds", {}),
    sshd_check("ssh-strong-ciphers", "SSH offers no weak ciphers",
               "CBC modes, 3DES, RC4 and Blowfish have practical attacks; strong AEAD ciphers are everywhere.",
               Severity.MEDIUM, ("ciphers",), none_of(WEAK_CIPHERS), "no CBC, 3DES, RC4 or Blowfish",
               {"ciphers": []}),
    sshd_check("ssh-strong-macs", "SSH offers no weak MACs",
               "MD5, SHA-1 and 64-bit tags are too weak to authenticate a long-lived session's packets.",
               Severity.MEDIUM, ("macs",), none_of(WEAK_MACS), "no MD5, SHA-1 or 64-bit MACs", {"macs": []}),
    sshd_check("ssh-strong-kex", "SSH offers no SHA-1 key exchange",
               "Key exchanges over SHA-1 or 1024-bit groups (Logjam) no longer protect a session's keys.",
               Severity.MEDIUM, ("kexalgorithms",), none_of(WEAK_KEX), "no SHA-1 Diffie-Hellman",
               {"kex_algorithms": []}),
    sshd_check("ssh-log-level", "sshd logs at INFO or VERBOSE",
               "Below INFO, logins and failed attempts go unrecorded; VERBOSE also names the key used.",
               Severity.LOW, ("loglevel",), lambda v: v.upper() in ("INFO", "VERBOSE"), "INFO or VERBOSE",
               manual=f"LogLevel VERBOSE {DROP_IN}"),
    sshd_check("ssh-no-hostbased-auth", "SSH host-based authentication is off",
               "Host-based trust lets anyone with root on a trusted host log in here as any user.",
               Severity.MEDIUM, ("hostbasedauthentication",), lambda v: v == "no", "no",
               manual=f"HostbasedAuthentication no {DROP_IN}"),
    sshd_check("ssh-ignore-rhosts", "SSH ignores .rhosts files",
               "A user's .rhosts would let other hosts in without any authentication.",
               Severity.MEDIUM, ("ignorerhosts",), lambda v: v == "yes", "yes", manual=f"IgnoreRhosts yes {DROP_IN}"),
    sshd_check("ssh-no-user-environment", "SSH users cannot set sshd's environment",
               "An environment a user sets (LD_PRELOAD) can work around command restrictions on their key.",
               Severity.MEDIUM, ("permituserenvironment",), lambda v: v == "no", "no",
               manual=f"PermitUserEnvironment no {DROP_IN}"),
    sshd_check("ssh-access-limited", "SSH logins are limited to named users or groups",
               "Without a list, every account with a shell may log in, also ones made for a service.",
               Severity.LOW, ("allowusers", "allowgroups", "denyusers", "denygroups"), lambda *v: any(v),
               "AllowUsers, AllowGroups, DenyUsers or DenyGroups",
               manual='the ssh op\'s allow_groups, e.g. rastosctl apply ssh allow_groups=\'["sudo"]\''),
)  # fmt: skip
