"""Accounts, root's PATH and password policy (CIS Debian 7.2 and 5.4), from the target's own files."""

from __future__ import annotations

import re
from collections import Counter

from daemon.compliance.facts import Facts
from daemon.compliance.model import Check, Outcome, Severity, failed, not_applicable, passed
from ops.sysctl import resolve_in_target

NO_LOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")
# Debian's system accounts whose shell is a command, not a login: they do one thing and end.
SPECIAL_SHELLS = {"sync": "/bin/sync", "shutdown": "/sbin/shutdown", "halt": "/sbin/halt"}
STRONG_HASHES = ("YESCRYPT", "SHA512")


def some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shadowed_passwords(facts: Facts) -> Outcome:
    exposed = [entry[0] for entry in facts.passwd if len(entry) > 1 and entry[1] != "x"]
    if exposed:
        return failed(f"/etc/passwd holds a password field other than x for {some(exposed)}")
    return passed(f"all {len(facts.passwd)} accounts keep their password in /etc/shadow")


def no_empty_passwords(facts: Facts) -> Outcome:
    if not facts.shadow:
        return failed("/etc/shadow is missing or empty")
    empty = [entry[0] for entry in facts.shadow if len(entry) > 1 and entry[1] == ""]
    if empty:
        return failed(f"empty password field in /etc/shadow: {some(empty)}")
    return passed(f"no empty password field among {len(facts.shadow)} accounts")


def only_root_uid_0(facts: Facts) -> Outcome:
    zero = [entry[0] for entry in facts.passwd if len(entry) > 2 and entry[2] == "0"]
    if zero != ["root"]:
        return failed(f"accounts with uid 0: {some(zero) or 'none'} (only root may have it)")
    return passed("only root has uid 0")


def root_gid_0(facts: Facts) -> Outcome:
    root = next((entry for entry in facts.passwd if entry[0] == "root" and len(entry) > 3), None)
    if root is None:
        return failed("/etc/passwd has no root")
    return passed("root's group is 0") if root[3] == "0" else failed(f"root's group is {root[3]}, not 0")


def unique_ids(facts: Facts) -> Outcome:
    problems = []
    for kind, entries, column in (("uid", facts.passwd, 2), ("gid", facts.groups, 2), ("user name", facts.passwd, 0),
                                  ("group name", facts.groups, 0)):  # fmt: skip
        counts = Counter(entry[column] for entry in entries if len(entry) > column)
        problems += [f"{kind} {value} is used {count} times" for value, count in sorted(counts.items()) if count > 1]
    return failed("; ".join(problems[:5])) if problems else passed("user and group ids and names are unique")


def groups_exist(facts: Facts) -> Outcome:
    gids = {entry[2] for entry in facts.groups if len(entry) > 2}
    missing = [f"{entry[0]} ({entry[3]})" for entry in facts.passwd if len(entry) > 3 and entry[3] not in gids]
    if missing:
        return failed(f"primary groups missing from /etc/group: {some(missing)}")
    return passed("every account's primary group exists")


def system_accounts_no_login(facts: Facts) -> Outcome:
    first_user = int(facts.login_defs.get("UID_MIN", "1000"))
    loose = []
    for entry in facts.passwd:
        if len(entry) < 7 or entry[0] == "root" or not entry[2].isdigit() or int(entry[2]) >= first_user:
            continue
        if entry[6] in NO_LOGIN or SPECIAL_SHELLS.get(entry[0]) == entry[6]:
            continue
        loose.append(f"{entry[0]} ({entry[6]})")
    if loose:
        return failed(f"system accounts with a login shell: {some(loose)}")
    return passed(f"system accounts below uid {first_user} have no login shell")


def root_path(facts: Facts) -> Outcome:
    """Every PATH root gets at login: no empty or relative entry (the current directory), every
    directory root's and not writable by others (or a program there runs as root)."""
    paths = root_path_values(facts)
    if not paths:
        return not_applicable("no PATH for root is set in login.defs, /etc/profile or root's profile")
    problems: list[str] = []
    for source, value in paths:
        for entry in value.split(":"):
            problems += [f"{problem} ({source})" for problem in path_entry_problems(facts, entry)]
    if problems:
        return failed("; ".join(dict.fromkeys(problems)))
    return passed(f"{len(paths)} PATH settings for root, every directory root's alone")


def root_path_values(facts: Facts) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    supath = facts.login_defs.get("ENV_SUPATH", "")
    if supath.startswith("PATH="):
        found.append(("/etc/login.defs ENV_SUPATH", supath.removeprefix("PATH=")))
    assignment = re.compile(r"^\s*(?:export\s+)?PATH=(['\"]?)([^'\"\s]*)\1\s*$")
    profile = (facts.text("/etc/profile") or "").splitlines()
    for index, line in enumerate(profile):
        if re.search(r"id -u.*-eq 0", line):  # Debian's: root's branch of the if comes first
            matches = [m for m in map(assignment.match, profile[index + 1 : index + 4]) if m]
            found += [("/etc/profile", matches[0].group(2))] if matches else []
            break
    for source in ("/etc/environment", "/root/.profile", "/root/.bashrc", "/root/.bash_profile"):
        for line in (facts.text(source) or "").splitlines():
            if match := assignment.match(line):
                found.append((source, match.group(2)))
    return found


def path_entry_problems(facts: Facts, entry: str) -> list[str]:
    if entry in ("$PATH", "${PATH}"):
        return []
    if entry == "":
        return ["an empty PATH entry (the current directory)"]
    if "$" in entry:
        return []  # made from another variable: not judged
    if not entry.startswith("/"):
        return [f"relative PATH entry {entry!r}"]
    resolved = resolve_in_target(facts.target, entry)
    status = facts.status(resolved) if resolved is not None else None
    if status is None or not status.is_dir:
        return [f"{entry} is no directory"]
    if status.uid != 0:
        return [f"{entry} is owned by uid {status.uid}"]
    if status.mode & 0o022:
        return [f"{entry} is writable by others ({status.mode:04o})"]
    return []


def password_max_days(facts: Facts) -> Outcome:
    value = facts.login_defs.get("PASS_MAX_DAYS", "")
    if not value.isdigit():
        return failed("PASS_MAX_DAYS is not set in /etc/login.defs")
    if int(value) > 365:
        return failed(f"PASS_MAX_DAYS {value} in /etc/login.defs (wants 365 or fewer)")
    return passed(f"PASS_MAX_DAYS {value}")


def password_hashing(facts: Facts) -> Outcome:
    method = facts.login_defs.get("ENCRYPT_METHOD", "")
    if method.upper() not in STRONG_HASHES:
        return failed(f"ENCRYPT_METHOD {method or '(unset)'} in /etc/login.defs (wants YESCRYPT or SHA512)")
    return passed(f"ENCRYPT_METHOD {method}")


ACCOUNT_CHECKS = (
    Check("accounts-shadowed-passwords", "Password hashes live in /etc/shadow only",
          "/etc/passwd is readable by everyone: a hash there is cracked offline.",
          Severity.HIGH, shadowed_passwords, manual="pwconv"),
    Check("accounts-no-empty-passwords", "No account has an empty password",
          "An empty password lets anyone who knows the account's name log in as it.",
          Severity.HIGH, no_empty_passwords, manual="passwd -l ACCOUNT (lock it) or set a password"),
    Check("accounts-only-root-uid-0", "Only root has uid 0",
          "Every uid 0 account is root under another name, and logins to it name nobody.",
          Severity.HIGH, only_root_uid_0, manual="give the other accounts their own uid, or remove them"),
    Check("accounts-root-gid-0", "root's primary group is 0",
          "Files root makes would otherwise belong to another group, which could then read or change them.",
          Severity.MEDIUM, root_gid_0, manual="usermod -g 0 root"),
    Check("accounts-unique-ids", "User and group ids and names are unique",
          "Two accounts with one uid are one account to the kernel: files and rights are shared.",
          Severity.MEDIUM, unique_ids, manual="give each account and group its own id and name"),
    Check("accounts-groups-exist", "Every account's primary group exists",
          "A group made later with that id would own the account's files.",
          Severity.LOW, groups_exist, manual="groupadd -g GID NAME, or usermod -g"),
    Check("accounts-system-no-login", "System accounts have no login shell",
          "A service account that may log in is a password or key away from a shell.",
          Severity.MEDIUM, system_accounts_no_login, manual="usermod -s /usr/sbin/nologin ACCOUNT"),
    Check("accounts-root-path", "root's PATH has no relative or writable directory",
          "A program placed in a directory of root's PATH that others may write runs as root.",
          Severity.HIGH, root_path, manual="remove the entries named from root's PATH, or fix their owner and mode"),
    Check("login-password-max-days", "Passwords expire within a year",
          "CIS asks for it; NIST 800-63B does not: with keys-only SSH it matters for console logins only.",
          Severity.LOW, password_max_days, manual="PASS_MAX_DAYS 365 in /etc/login.defs; chage -M 365 for accounts"),
    Check("login-password-hashing", "Passwords are hashed with yescrypt or SHA-512",
          "Older hashes (MD5, DES) are cracked orders of magnitude faster.",
          Severity.MEDIUM, password_hashing, manual="ENCRYPT_METHOD YESCRYPT in /etc/login.defs"),
)  # fmt: skip
