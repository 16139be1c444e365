"""Modes and owners of the files that hold accounts, keys and configuration (CIS Debian 7.1 and 5.1).
No op changes modes, so each says what to run instead. A file is judged by itself, not through a
symlink; the group may be named, as in Debian's `root:shadow 0640` for /etc/shadow."""

from __future__ import annotations

from collections.abc import Callable

from daemon.compliance.facts import Facts, FileStatus
from daemon.compliance.model import Check, Outcome, Severity, failed, not_applicable, passed

Paths = Callable[[Facts], list[str]]


def listed(*paths: str) -> tuple[Paths, str]:
    return (lambda facts: list(paths)), " ".join(paths)


def host_keys(public: bool) -> tuple[Paths, str]:
    pattern = "ssh_host_*_key.pub" if public else "ssh_host_*_key"

    def paths(facts: Facts) -> list[str]:
        return [f"/etc/ssh/{name}" for name in facts.names("/etc/ssh", pattern)]

    return paths, f"/etc/ssh/{pattern}"


def sshd_configuration() -> tuple[Paths, str]:
    def paths(facts: Facts) -> list[str]:
        included = facts.names("/etc/ssh/sshd_config.d", "*.conf")
        return ["/etc/ssh/sshd_config", *(f"/etc/ssh/sshd_config.d/{name}" for name in included)]

    return paths, "/etc/ssh/sshd_config /etc/ssh/sshd_config.d/*.conf"


def mode_check(
    check_id: str, title: str, rationale: str, severity: Severity, files: tuple[Paths, str], most: int,
    groups: tuple[str, ...] = ("root",), required: bool = False, needs: str = "",
) -> Check:  # fmt: skip
    """Each path owned by root, its group one of `groups`, no mode bit beyond `most`. `needs`: a
    program whose absence makes the check not applicable (no sshd: its keys do not matter)."""
    paths, where = files
    group_text = "|".join(groups)

    def evaluate(facts: Facts) -> Outcome:
        if needs and not facts.exists(needs):
            return not_applicable(f"no {needs} here: nothing to check")
        allowed = {gid for gid in (facts.gid(name) for name in groups) if gid is not None} | {0}
        shown, problems = [], []
        for path in paths(facts):
            status = facts.status(path)
            if status is None:
                if required:
                    problems.append(f"{path} is missing")
                continue
            shown.append(f"{path} {status.mode:04o}")
            problems += judge(path, status, most, allowed, group_text)
        if problems:
            return failed("; ".join(problems))
        if not shown:
            return not_applicable("none of the files exists")
        return passed(", ".join(shown) if len(shown) <= 3 else f"{len(shown)} files at most {most:04o}, root's")

    manual = f"chown root:{groups[-1]} {where} && chmod {most:04o} {where}"
    return Check(check_id, title, rationale, severity, evaluate, None, manual)


def judge(path: str, status: FileStatus, most: int, gids: set[int], group_text: str) -> list[str]:
    problems = []
    if status.mode & ~most:
        problems.append(f"{path} has mode {status.mode:04o} (at most {most:04o})")
    if status.uid != 0:
        problems.append(f"{path} is owned by uid {status.uid}, not root")
    if status.gid not in gids:
        problems.append(f"{path} has group id {status.gid}, not {group_text}")
    return problems


def sticky_tmp(facts: Facts) -> Outcome:
    problems, shown = [], []
    for path in ("/tmp", "/var/tmp"):
        status = facts.status(path)
        if status is None or not status.is_dir:
            continue
        shown.append(f"{path} {status.mode:04o}")
        if status.mode & 0o002 and not status.mode & 0o1000:
            problems.append(f"{path} is world-writable without the sticky bit ({status.mode:04o})")
    if problems:
        return failed("; ".join(problems))
    return passed(", ".join(shown)) if shown else not_applicable("no /tmp or /var/tmp")


ACCOUNT_FILE = "holds every account; written by anyone, it makes anyone root"
FILE_CHECKS = (
    mode_check("file-passwd", "/etc/passwd is root's and not writable by others",
               f"/etc/passwd {ACCOUNT_FILE}.", Severity.HIGH, listed("/etc/passwd"), 0o644, required=True),
    mode_check("file-group", "/etc/group is root's and not writable by others",
               "/etc/group says who is in sudo and adm: written by anyone, it makes anyone an admin.",
               Severity.HIGH, listed("/etc/group"), 0o644, required=True),
    mode_check("file-shadow", "/etc/shadow is readable by root and group shadow only",
               "/etc/shadow holds the password hashes: read by anyone, they are cracked offline.",
               Severity.HIGH, listed("/etc/shadow"), 0o640, ("root", "shadow"), required=True),
    mode_check("file-gshadow", "/etc/gshadow is readable by root and group shadow only",
               "/etc/gshadow holds group password hashes and group administrators.",
               Severity.HIGH, listed("/etc/gshadow"), 0o640, ("root", "shadow"), required=True),
    mode_check("file-account-backups", "Backups of passwd and group are root's and not writable by others",
               "passwd- and group- are what shadow's tools restore from: written by anyone, they make anyone root.",
               Severity.MEDIUM, listed("/etc/passwd-", "/etc/group-"), 0o644),
    mode_check("file-shadow-backups", "Backups of shadow and gshadow are as closed as the files",
               "shadow- and gshadow- hold yesterday's hashes: as secret as today's.",
               Severity.MEDIUM, listed("/etc/shadow-", "/etc/gshadow-"), 0o640, ("root", "shadow")),
    mode_check("file-ssh-host-keys", "SSH host private keys are readable by root only",
               "Whoever reads a host key can impersonate the server to every client that trusts it.",
               Severity.HIGH, host_keys(public=False), 0o600, needs="/usr/sbin/sshd"),
    mode_check("file-ssh-host-public-keys", "SSH host public keys are not writable by others",
               "A replaced public key makes clients that learn it from here trust another server.",
               Severity.LOW, host_keys(public=True), 0o644, needs="/usr/sbin/sshd"),
    mode_check("file-sshd-config", "sshd's configuration is root's and not writable by others",
               "Whoever writes sshd's configuration decides who logs in, as whom, with what.",
               Severity.HIGH, sshd_configuration(), 0o644, needs="/usr/sbin/sshd"),
    mode_check("file-sudoers", "sudoers is root's and read-only",
               "sudoers decides who becomes root; sudo itself refuses a sudoers file others may write.",
               Severity.HIGH, listed("/etc/sudoers"), 0o440, needs="/usr/bin/sudo"),
    mode_check("file-crontab", "The system crontab is root's alone",
               "Commands in /etc/crontab run as root: only root may read or change it.",
               Severity.MEDIUM, listed("/etc/crontab"), 0o600, needs="/etc/crontab"),
    mode_check("file-banners", "Login banners are root's and not writable by others",
               "A banner anyone may write can show users false instructions before they log in.",
               Severity.LOW, listed("/etc/motd", "/etc/issue", "/etc/issue.net"), 0o644),
    Check("file-tmp-sticky", "World-writable temporary directories are sticky",
          "Without the sticky bit, any user may delete or replace another user's files in /tmp.",
          Severity.MEDIUM, sticky_tmp, manual="chmod +t /tmp /var/tmp"),
)  # fmt: skip
