"""`user`: a local account, its groups, shell and SSH keys, made present or absent.

Accounts are changed with shadow's own useradd/usermod/userdel (`--prefix`, so a scratch root works
as well as `/`), never by editing /etc/passwd by hand: they keep shadow, gshadow and the lock files
consistent. Facts are read from the target's files, not the host's name service.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.ops.base import (
    Action,
    MakeDirectory,
    Op,
    Plan,
    RemoveFile,
    RunCommand,
    Target,
    file_action,
    read_colon_file,
)
from daemon.ops.params import Kind, Param, Params

USER_NAME = r"[a-z_][a-z0-9_-]{0,31}"
SHELL = r"/[A-Za-z0-9_./-]+"
KEY_LINE = r"(ssh|ecdsa|sk)-[a-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\n\r]*)?"
ACCOUNT_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    comment: str
    home: str
    shell: str
    groups: frozenset[str]


class UserOp(Op):
    name = "user"
    description = "Create, change or remove a local user: uid, groups, shell, comment, SSH authorized keys"
    schema = (
        Param("name", Kind.STRING, "the login name", required=True, pattern=USER_NAME,
              pattern_help="a lower-case letter or _, then up to 31 lower-case letters, digits, _ or -"),
        Param("state", Kind.STRING, "present or absent", default="present", choices=("present", "absent")),
        Param("uid", Kind.INTEGER, "numeric user id; chosen by useradd when left out", minimum=1, maximum=60000),
        Param("groups", Kind.STRING_LIST, "supplementary groups (exactly these)", default=[], pattern=USER_NAME),
        Param("shell", Kind.STRING, "login shell", default="/bin/bash", pattern=SHELL),
        Param("comment", Kind.STRING, "the GECOS field", default="", pattern=r"[^:\n\r]{0,128}"),
        Param("authorized_keys", Kind.STRING_LIST, "SSH public keys; ~/.ssh/authorized_keys holds exactly these",
              default=[], pattern=KEY_LINE, pattern_help="one OpenSSH public key line: TYPE BASE64 [COMMENT]"),
        Param("remove_home", Kind.BOOLEAN, "with state absent: remove the home directory too", default=False),
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        from daemon.errors import InvalidParams

        existing = {entry[0] for entry in read_colon_file(target, "/etc/group")}
        for index, group in enumerate(params["groups"]):
            if group not in existing:
                raise InvalidParams(f"params.groups[{index}]", f"group {group!r} does not exist on the target")

    def plan(self, target: Target, params: Params) -> Plan:
        account = read_account(target, params["name"])
        if params["state"] == "absent":
            return Plan(self.name, tuple(plan_removal(account, params)))
        return Plan(self.name, tuple(plan_account(target, account, params)))


def read_account(target: Target, name: str) -> Account | None:
    for entry in read_colon_file(target, "/etc/passwd"):
        if entry[0] == name and len(entry) >= 7:
            members = read_colon_file(target, "/etc/group")
            groups = frozenset(group[0] for group in members if len(group) >= 4 and name in group[3].split(","))
            return Account(name, int(entry[2]), int(entry[3]), entry[4], entry[5], entry[6], groups)
    return None


def plan_account(target: Target, account: Account | None, params: Params) -> list[Action]:
    name: str = params["name"]
    groups = sorted(params["groups"])
    actions: list[Action] = []
    if account is None:
        argv = ["useradd", "--prefix", "{root}", "--create-home", "--user-group", "--shell", params["shell"]]
        argv += ["--comment", params["comment"]]
        if params["uid"] is not None:
            argv += ["--uid", str(params["uid"])]
        if groups:
            argv += ["--groups", ",".join(groups)]
        actions.append(RunCommand(f"user {name}", (*argv, name), ACCOUNT_FILES))
        home = f"/home/{name}"
    else:
        argv = ["usermod", "--prefix", "{root}"]
        if params["uid"] is not None and params["uid"] != account.uid:
            argv += ["--uid", str(params["uid"])]
        if params["shell"] != account.shell:
            argv += ["--shell", params["shell"]]
        if params["comment"] != account.comment:
            argv += ["--comment", params["comment"]]
        if frozenset(groups) != account.groups:
            argv += ["--groups", ",".join(groups)]
        if len(argv) > 3:
            actions.append(RunCommand(f"user {name}", (*argv, name), ACCOUNT_FILES))
        home = account.home
    actions += plan_keys(target, name, home, params["authorized_keys"])
    return actions


def plan_keys(target: Target, name: str, home: str, keys: list[str]) -> list[Action]:
    path = f"{home}/.ssh/authorized_keys"
    if not keys:
        return [RemoveFile(path)] if target.path(path).exists() else []
    content = "# Managed by rastosd (op user); changes made here are replaced at the next apply.\n"
    content += "".join(key + "\n" for key in keys)
    return [*ssh_dir(target, name, home), *file_action(target, path, content, mode=0o600, owner=name)]


def ssh_dir(target: Target, name: str, home: str) -> list[Action]:
    if target.path(f"{home}/.ssh").is_dir():
        return []
    return [MakeDirectory(f"{home}/.ssh", 0o700, owner=name)]


def plan_removal(account: Account | None, params: Params) -> list[Action]:
    if account is None:
        return []
    argv = ["userdel", "--prefix", "{root}", *(["--remove"] if params["remove_home"] else []), account.name]
    return [RunCommand(f"user {account.name}", tuple(argv), ACCOUNT_FILES)]
