"""`user`: a local account, its groups, shell, SSH keys, sudo rights, password lock and expiry, made
present or absent.

Accounts are changed with shadow's own useradd/usermod/userdel (`--prefix`, so a scratch root works
as well as `/`), never by editing /etc/passwd by hand: they keep shadow, gshadow and the lock files
consistent. Facts are read from the target's files, not the host's name service.

Sudo rights are a drop-in of their own, /etc/sudoers.d/rastos-NAME (0440), checked with the target's
`visudo -c` on a scratch copy before it is put in place: sudo refuses to run at all while any of its
files has a syntax error, so a broken file must never reach /etc/sudoers.d. An account removed takes
its drop-in with it (a later account of that name must not inherit root).

`locked` is the password lock (`usermod --lock`: a `!` before the hash in /etc/shadow). It stops
password logins only: with Debian's sshd (UsePAM yes) a locked account still logs in with a key. An
account that has no password at all (useradd's `!`) has nothing to unlock, so `locked = false` leaves
it as it is. `expires` ends the account on that day for every kind of login, keys included (PAM's
account check, which sshd runs).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import ClassVar

from ops.actions import Action, CheckedWrite, MakeDirectory, RemoveFile, RunCommand
from ops.base import Op, Plan, file_action
from ops.errors import InvalidParams, OpFailed
from ops.params import Kind, Param, Params
from ops.target import Target, in_target, read_colon_file
from rastos.errors import CommandError
from rastos.process import run

USER_NAME = r"[a-z_][a-z0-9_-]{0,31}"
SHELL = r"/[A-Za-z0-9_./-]+"
KEY_LINE = r"(ssh|ecdsa|sk)-[a-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\n\r]*)?"
ACCOUNT_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")
SUDOERS_DIR = "/etc/sudoers.d"
DEFAULT_SHELL = "/bin/bash"
VISUDO = "/usr/sbin/visudo"
EPOCH = datetime.date(1970, 1, 1)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    comment: str
    home: str
    shell: str
    groups: frozenset[str]
    password: str = "!"  # /etc/shadow's second field
    expires: int | None = None  # days since 1970-01-01; None: never

    @property
    def locked(self) -> bool:
        return self.password.startswith("!")

    @property
    def has_password(self) -> bool:
        """A hash behind the lock: something `usermod --unlock` can give back."""
        return self.password.lstrip("!") not in ("", "*")


def parse_date(value: str) -> str | None:
    """A problem with an `expires` value, or None."""
    if value == "":
        return None
    try:
        day = datetime.date.fromisoformat(value)
    except ValueError as error:
        return f"{value!r} is not a date YYYY-MM-DD ({error})"
    if day <= EPOCH:
        return f"{value!r} is not after 1970-01-01"
    return None


def epoch_days(value: str) -> int | None:
    return (datetime.date.fromisoformat(value) - EPOCH).days if value else None


def today() -> int:
    return int(time.time() // 86400)


def expired_accounts(target: Target) -> set[str]:
    """Accounts past their expiry day: PAM refuses them every login, with a key too."""
    now = today()
    return {entry[0] for entry in read_colon_file(target, "/etc/shadow")
            if len(entry) > 7 and entry[7].lstrip("-").isdigit() and 0 <= int(entry[7]) <= now}  # fmt: skip


class UserOp(Op):
    name = "user"
    description = (
        "Create, change or remove a local user: uid, groups, shell, comment, SSH authorized keys, sudo rights, "
        "password lock and account expiry"
    )
    schema = (
        Param("name", Kind.STRING, "the login name", required=True, pattern=USER_NAME,
              pattern_help="a lower-case letter or _, then up to 31 lower-case letters, digits, _ or -"),
        Param("state", Kind.STRING, "present or absent", default="present", choices=("present", "absent")),
        Param("uid", Kind.INTEGER, "numeric user id; chosen by useradd when left out", minimum=1, maximum=60000),
        Param("groups", Kind.STRING_LIST, "supplementary groups (exactly these)", default=[], pattern=USER_NAME),
        Param("shell", Kind.STRING, f"login shell; left out: {DEFAULT_SHELL} for a new account, an existing one keeps "
              "its own (so the shell the zsh op set stays)", pattern=SHELL),
        Param("comment", Kind.STRING, "the GECOS field", default="", pattern=r"[^:\n\r]{0,128}"),
        Param("authorized_keys", Kind.STRING_LIST, "SSH public keys; ~/.ssh/authorized_keys holds exactly these",
              default=[], pattern=KEY_LINE, pattern_help="one OpenSSH public key line: TYPE BASE64 [COMMENT]",
              max_length=16384),  # an RSA-16384 key's line is ~2.8 KB: room for options and a comment
        Param("sudo", Kind.BOOLEAN, f"may run anything as root with sudo ({SUDOERS_DIR}/rastos-NAME)",
              default=False),
        Param("sudo_nopasswd", Kind.BOOLEAN, "with sudo: without typing the password", default=False),
        Param("locked", Kind.BOOLEAN, "password logins refused (usermod --lock); SSH keys still work",
              default=False),
        Param("expires", Kind.STRING, "the day the account ends, YYYY-MM-DD (\"\": never)", default="",
              pattern=r"(\d{4}-\d{2}-\d{2})?", pattern_help="a date YYYY-MM-DD, or \"\" for never", check=parse_date),
        Param("remove_home", Kind.BOOLEAN, "with state absent: remove the home directory too", default=False),
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        if params["sudo_nopasswd"] and not params["sudo"]:
            raise InvalidParams("params.sudo_nopasswd", "needs sudo true")
        existing = {entry[0] for entry in read_colon_file(target, "/etc/group")}
        for index, group in enumerate(params["groups"]):
            if group not in existing:
                raise InvalidParams(f"params.groups[{index}]", f"group {group!r} does not exist on the target")

    def plan(self, target: Target, params: Params) -> Plan:
        account = read_account(target, params["name"])
        if params["state"] == "absent":
            return Plan(self.name, tuple(plan_removal(target, account, params)))
        return Plan(self.name, tuple(plan_account(target, account, params)))

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = super().verify(target, params)
        if params["state"] == "present" and params["sudo"] and not problems:
            try:
                run(in_target(target, [VISUDO, "-c", "-q"]), capture=True)
            except CommandError as error:
                problems.append(f"visudo -c refuses the sudoers files: {error}")
        return problems


def read_account(target: Target, name: str) -> Account | None:
    for entry in read_colon_file(target, "/etc/passwd"):
        if entry[0] == name and len(entry) >= 7:
            members = read_colon_file(target, "/etc/group")
            groups = frozenset(group[0] for group in members if len(group) >= 4 and name in group[3].split(","))
            shadow = next((line for line in read_colon_file(target, "/etc/shadow") if line[0] == name), [])
            password = shadow[1] if len(shadow) > 1 else "!"
            expiry = shadow[7] if len(shadow) > 7 else ""
            expires = int(expiry) if expiry.isdigit() else None  # "" or -1: never
            return Account(name, int(entry[2]), int(entry[3]), entry[4], entry[5], entry[6], groups, password, expires)
    return None


def plan_account(target: Target, account: Account | None, params: Params) -> list[Action]:
    name: str = params["name"]
    groups = sorted(params["groups"])
    actions: list[Action] = []
    if account is None:
        # useradd leaves the password field at "!": locked, and nothing to unlock.
        shell = params["shell"] or DEFAULT_SHELL
        argv = ["useradd", "--prefix", "{root}", "--create-home", "--user-group", "--shell", shell]
        argv += ["--comment", params["comment"]]
        if params["uid"] is not None:
            argv += ["--uid", str(params["uid"])]
        if groups:
            argv += ["--groups", ",".join(groups)]
        if params["expires"]:
            argv += ["--expiredate", params["expires"]]
        actions.append(RunCommand(f"user {name}", (*argv, name), ACCOUNT_FILES))
        home = f"/home/{name}"
    else:
        argv = ["usermod", "--prefix", "{root}", *changed_fields(account, params, groups)]
        if len(argv) > 3:
            actions.append(RunCommand(f"user {name}", (*argv, name), ACCOUNT_FILES))
        home = account.home
    actions += plan_keys(target, name, home, params["authorized_keys"])
    actions += plan_sudo(target, name, params)
    return actions


def changed_fields(account: Account, params: Params, groups: list[str]) -> list[str]:
    """usermod's options for what differs from the params."""
    argv: list[str] = []
    if params["uid"] is not None and params["uid"] != account.uid:
        argv += ["--uid", str(params["uid"])]
    if params["shell"] is not None and params["shell"] != account.shell:
        argv += ["--shell", params["shell"]]
    if params["comment"] != account.comment:
        argv += ["--comment", params["comment"]]
    if frozenset(groups) != account.groups:
        argv += ["--groups", ",".join(groups)]
    if params["locked"] and not account.locked:
        argv += ["--lock"]
    elif not params["locked"] and account.locked and account.has_password:
        argv += ["--unlock"]
    if epoch_days(params["expires"]) != account.expires:
        argv += ["--expiredate", params["expires"]]  # "" clears it
    return argv


def plan_keys(target: Target, name: str, home: str, keys: list[str]) -> list[Action]:
    path = f"{home}/.ssh/authorized_keys"
    if not keys:
        return [RemoveFile(path)] if target.exists(path) else []
    content = "# Managed by rastosd (op user); changes made here are replaced at the next apply.\n"
    content += "".join(key + "\n" for key in keys)
    return [*ssh_dir(target, name, home), *file_action(target, path, content, mode=0o600, owner=name)]


def ssh_dir(target: Target, name: str, home: str) -> list[Action]:
    if target.is_dir(f"{home}/.ssh"):
        return []
    return [MakeDirectory(f"{home}/.ssh", 0o700, owner=name)]


def sudoers_path(name: str) -> str:
    return f"{SUDOERS_DIR}/rastos-{name}"  # no dot in it: sudo's includedir skips names with one


def plan_sudo(target: Target, name: str, params: Params) -> list[Action]:
    path = sudoers_path(name)
    if not params["sudo"]:
        return [RemoveFile(path)] if target.exists(path) else []
    if not target.has_program(VISUDO):
        raise OpFailed('sudo is not installed on the target: install it first (op update, packages ["sudo"])')
    rule = f"{name} ALL=(ALL:ALL) {'NOPASSWD: ' if params['sudo_nopasswd'] else ''}ALL\n"
    content = "# Managed by rastosd (op user); changes made here are replaced at the next apply.\n" + rule
    if not file_action(target, path, content, mode=0o440):
        return []
    return [CheckedSudoers(path, content, target.read_text(path))]


@dataclass(frozen=True)
class CheckedSudoers(CheckedWrite):
    """A sudoers drop-in, written only after the target's visudo accepted it."""

    checker: ClassVar[str] = "visudo -c"
    what: ClassVar[str] = "rule"
    mode: ClassVar[int] = 0o440

    def check(self, target: Target) -> None:
        check_with_visudo(target, self.content)


def check_with_visudo(target: Target, content: str) -> None:
    """`visudo -cf` on a scratch copy in the target (a dot in its name: sudo itself never reads it)."""
    with target.files.scratch_directory("/etc", ".rastos-visudo-") as scratch:
        target.files.write(f"{scratch}/rule", content, 0o440)
        try:
            run(in_target(target, [VISUDO, "-c", "-f", f"{scratch}/rule"]), capture=True)
        except CommandError as error:
            raise OpFailed(f"visudo -c refuses the sudo rule, left unchanged: {error}") from None


def plan_removal(target: Target, account: Account | None, params: Params) -> list[Action]:
    sudoers = sudoers_path(params["name"])
    actions: list[Action] = [RemoveFile(sudoers)] if target.exists(sudoers) else []
    if account is None:
        return actions
    argv = ["userdel", "--prefix", "{root}", *(["--remove"] if params["remove_home"] else []), account.name]
    return [RunCommand(f"user {account.name}", tuple(argv), ACCOUNT_FILES), *actions]
