"""`ssh`: OpenSSH server hardening in a drop-in, checked with `sshd -t` before sshd reads it.

The settings go to /etc/ssh/sshd_config.d/10-rastos.conf. Debian's sshd_config includes that directory
first and sshd keeps the first value it reads for a keyword, so the drop-in wins over the main file and
over later drop-ins (cloud-init writes 50-cloud-init.conf, with PasswordAuthentication yes).

Why the session that applies it survives: sshd is *reloaded*, never restarted (a reload re-executes the
listener; running sessions are separate processes and keep going), and the op refuses to turn password
logins off while no account that may log in has an SSH key: the case that locks an admin out. That
check runs when the step is planned, so in a pipeline it sees the key an earlier `user` step installs;
this is why `ssh` comes after `user`.

Before the drop-in is put in place, the whole configuration as it would be (main file, the other
drop-ins, the new one) is checked with `sshd -t` in a scratch directory: a file sshd would refuse
never reaches /etc/ssh, so a crash can leave no configuration behind that keeps sshd from starting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import ClassVar

from ops.actions import Action, CheckedWrite, FollowUp
from ops.base import Op, Plan, file_action
from ops.errors import InvalidParams, OpFailed, UnsafePath
from ops.params import CONFIRM_TIMEOUT, Kind, Param, Params
from ops.rootfs import Links
from ops.target import Target, in_target, read_colon_file
from ops.user import expired_accounts
from rastos.errors import CommandError
from rastos.process import run

DROP_IN = "/etc/ssh/sshd_config.d/10-rastos.conf"
MAIN_CONFIG = "/etc/ssh/sshd_config"
INCLUDED_DIR = "/etc/ssh/sshd_config.d"
INCLUDE = re.compile(r"^\s*Include\s+/etc/ssh/sshd_config\.d/\*\.conf\s*$", re.IGNORECASE | re.MULTILINE)
ALGORITHM = r"[a-z0-9@.+-]{1,64}"
USER = r"[a-z_][a-z0-9_-]{0,31}"

# Preference lists after Mozilla's "modern" OpenSSH guideline and ssh-audit; what the target's OpenSSH
# does not know is left out (ML-KEM came in OpenSSH 9.9), so one default serves bookworm and trixie.
STRONG_KEX = (
    "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256", "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
)  # fmt: skip
STRONG_CIPHERS = (
    "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr",
    "aes192-ctr", "aes128-ctr",
)  # fmt: skip
STRONG_MACS = ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "umac-128-etm@openssh.com")


class SshOp(Op):
    name = "ssh"
    description = "Harden the OpenSSH server: port, no passwords, no root login, strong algorithms; checked, reloaded"
    after = ("user",)  # the keys that replace passwords are installed first
    risky = True
    schema = (
        Param("port", Kind.INTEGER, "the port sshd listens on", default=22, minimum=1, maximum=65535),
        Param("password_authentication", Kind.BOOLEAN, "allow logins with a password", default=False),
        Param("permit_root_login", Kind.STRING, "root logins: no, prohibit-password (keys only) or yes",
              default="no", choices=("no", "prohibit-password", "yes")),
        Param("max_auth_tries", Kind.INTEGER, "authentication attempts per connection", default=3, minimum=1,
              maximum=10),
        Param("allow_users", Kind.STRING_LIST, "only these users may log in (empty: no limit)", default=[],
              pattern=USER),
        Param("allow_groups", Kind.STRING_LIST, "only members of these groups may log in (empty: no limit)",
              default=[], pattern=USER),
        Param("x11_forwarding", Kind.BOOLEAN, "allow X11 forwarding", default=False),
        Param("client_alive_interval", Kind.INTEGER, "seconds between keep-alives to an idle client (0: off)",
              default=300, minimum=0, maximum=3600),
        Param("ciphers", Kind.STRING_LIST, "ciphers (default: the strong ones this OpenSSH knows)", default=[],
              pattern=ALGORITHM),
        Param("macs", Kind.STRING_LIST, "MACs (default: the strong ones this OpenSSH knows)", default=[],
              pattern=ALGORITHM),
        Param("kex_algorithms", Kind.STRING_LIST, "key exchanges (default: the strong ones this OpenSSH knows)",
              default=[], pattern=ALGORITHM),
        CONFIRM_TIMEOUT,
    )  # fmt: skip

    def revert_actions(self) -> tuple[Action, ...]:
        return (FollowUp("try-reload-or-restart", "ssh.service"),)

    def check(self, target: Target, params: Params) -> None:
        if not target.has_program("/usr/sbin/sshd"):
            raise InvalidParams("op", "the OpenSSH server (openssh-server) is not installed on the target")
        socket_enabled = target.files.kind("/etc/systemd/system/sockets.target.wants/ssh.socket") is not None
        if socket_enabled and params["port"] != 22:
            raise InvalidParams("params.port", "ssh.socket is enabled here: its ListenStream, not sshd, holds the port")

    def plan(self, target: Target, params: Params) -> Plan:
        main = target.read_text(MAIN_CONFIG)
        if main is None or not INCLUDE.search(main):
            raise OpFailed(
                f"{MAIN_CONFIG} does not include /etc/ssh/sshd_config.d/*.conf; the drop-in would be ignored"
            )
        refuse_lockout(target, params)
        content = render(params, supported_algorithms(target))
        writes = file_action(target, DROP_IN, content, mode=0o644)
        if not writes:
            return Plan(self.name, ())
        old = target.read_text(DROP_IN)
        return Plan(
            self.name, (CheckedSshdConfig(DROP_IN, content, old), FollowUp("try-reload-or-restart", "ssh.service"))
        )

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = super().verify(target, params)
        effective = effective_config(target)
        wanted = {
            "port": str(params["port"]),
            "passwordauthentication": "yes" if params["password_authentication"] else "no",
            "permitrootlogin": {"prohibit-password": "without-password"}.get(params["permit_root_login"],
                                                                              params["permit_root_login"]),
            "maxauthtries": str(params["max_auth_tries"]),
        }  # fmt: skip
        for key, value in wanted.items():
            if effective.get(key) != value and not (
                key == "permitrootlogin" and effective.get(key) == "prohibit-password"
            ):
                problems.append(f"sshd -T says {key} {effective.get(key)!r}, not {value!r} (another file wins?)")
        return problems


@dataclass(frozen=True)
class CheckedSshdConfig(CheckedWrite):
    """The drop-in, written only after sshd accepted the whole configuration it would make."""

    checker: ClassVar[str] = "sshd -t"
    what: ClassVar[str] = "configuration"

    def check(self, target: Target) -> None:
        check_with_sshd(target, self.content)


def render(params: Params, supported: dict[str, set[str]]) -> str:
    def choose(given: list[str], strong: tuple[str, ...], kind: str) -> str:
        chosen = given or [name for name in strong if name in supported[kind]]
        return ",".join(chosen)

    lines = [
        "# Written by rastosd (op ssh); changes made here are replaced at the next apply.",
        f"Port {params['port']}",
        f"PasswordAuthentication {'yes' if params['password_authentication'] else 'no'}",
        "KbdInteractiveAuthentication no",
        f"PermitRootLogin {params['permit_root_login']}",
        "PermitEmptyPasswords no",
        f"MaxAuthTries {params['max_auth_tries']}",
        f"X11Forwarding {'yes' if params['x11_forwarding'] else 'no'}",
        f"ClientAliveInterval {params['client_alive_interval']}",
        "ClientAliveCountMax 3",
        "LoginGraceTime 30",
        f"KexAlgorithms {choose(params['kex_algorithms'], STRONG_KEX, 'kex')}",
        f"Ciphers {choose(params['ciphers'], STRONG_CIPHERS, 'cipher')}",
        f"MACs {choose(params['macs'], STRONG_MACS, 'mac')}",
    ]
    if params["allow_users"]:
        lines.append(f"AllowUsers {' '.join(params['allow_users'])}")
    if params["allow_groups"]:
        lines.append(f"AllowGroups {' '.join(params['allow_groups'])}")
    return "\n".join(lines) + "\n"


def supported_algorithms(target: Target) -> dict[str, set[str]]:
    return {
        kind: set(run(in_target(target, ["ssh", "-Q", kind]), capture=True).stdout.split())
        for kind in ("kex", "cipher", "mac")
    }


def check_with_sshd(target: Target, drop_in: str) -> None:
    """`sshd -t` on the configuration as it would be, assembled in a scratch directory of the target."""
    drop_in_name = PurePosixPath(DROP_IN).name
    with target.files.scratch_directory("/etc/ssh", ".rastos-sshd-check-") as scratch:
        for name in target.files.names(INCLUDED_DIR):
            if name.endswith(".conf") and name != drop_in_name:
                # sshd reads the distribution's own links there too, so the copy does
                other = target.files.read_bytes(f"{INCLUDED_DIR}/{name}", links=Links.SYSTEM) or b""
                target.files.write(f"{scratch}/sshd_config.d/{name}", other, 0o644)
        target.files.write(f"{scratch}/sshd_config.d/{drop_in_name}", drop_in, 0o644)
        main = INCLUDE.sub(f"Include {scratch}/sshd_config.d/*.conf", target.read_text(MAIN_CONFIG) or "")
        target.files.write(f"{scratch}/sshd_config", main, 0o644)
        try:
            run(in_target(target, ["/usr/sbin/sshd", "-t", "-f", f"{scratch}/sshd_config"], ["sshd"]), capture=True)
        except CommandError as error:
            raise OpFailed(f"sshd -t refuses the new configuration, left unchanged: {error}") from None


def effective_config(target: Target) -> dict[str, str]:
    """What sshd will use, as `sshd -T` prints it (lower-case keywords)."""
    output = run(in_target(target, ["/usr/sbin/sshd", "-T"], ["sshd"]), capture=True).stdout
    return {key: value for key, _, value in (line.partition(" ") for line in output.splitlines())}


def refuse_lockout(target: Target, params: Params) -> None:
    """No passwords and no account with a key that may log in: nobody could log in again. An expired
    account cannot (PAM's account check refuses it, key or not); a password-locked one still can with
    a key, as Debian's sshd has UsePAM yes (only without PAM does sshd refuse a `!` in /etc/shadow)."""
    if params["password_authentication"]:
        return
    groups = {entry[0]: set(entry[3].split(",")) if len(entry) > 3 else set() for entry in
              read_colon_file(target, "/etc/group")}  # fmt: skip
    expired = expired_accounts(target)
    for entry in read_colon_file(target, "/etc/passwd"):
        if len(entry) < 7 or entry[6].endswith(("nologin", "false")) or entry[0] in expired:
            continue
        name, home = entry[0], entry[5]
        if name == "root" and params["permit_root_login"] == "no":
            continue
        if params["allow_users"] and name not in params["allow_users"]:
            continue
        if params["allow_groups"] and not any(name in groups.get(g, set()) for g in params["allow_groups"]):
            continue
        try:
            keys = target.read_text(f"{home}/.ssh/authorized_keys") or ""
        except UnsafePath:
            continue  # a key behind a link is not one to count on (sshd's StrictModes may refuse it too)
        if any(line.strip() and not line.startswith("#") for line in keys.splitlines()):
            return
    raise OpFailed(
        "password logins off, but no account that may log in has an SSH key: nobody could log in again. "
        "Install a key first (op user, authorized_keys) or keep password_authentication true"
    )
