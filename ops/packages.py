"""The package managers the update op drives: what they have, what a transaction would change (their
own dry runs), and the transaction itself. apt here; libalpm in packages_pacman.py, built on the same
`PackageBackend`. The op (update.py) chooses one by the target (`backend_for`).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ops.errors import OpFailed
from ops.target import Target, in_target
from rastos.errors import CommandError
from rastos.process import run

# Debian policy 5.6.7: lower case letters, digits, + - and ., at least two long, starting alphanumeric;
# Arch's names may also hold _ and @ (python-typing_extensions). A name one distribution cannot have
# is refused by its package manager, naming it.
PACKAGE = r"[a-z0-9@_][a-z0-9@_+.-]+"
INST = re.compile(r"^Inst (?P<name>\S+) (?:\[(?P<old>[^\]]+)\] )?\((?P<new>\S+)(?P<releases>[^)]*)\)")
REMV = re.compile(r"^Remv (?P<name>\S+)(?: \[(?P<old>[^\]]+)\])?")
UNKNOWN = re.compile(r"Unable to locate package (\S+)|Package '?([^' ]+)'? has no installation candidate")
# Every apt-get run: no questions, untranslated output (it is parsed), no changelog pager.
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none", "LC_ALL": "C.UTF-8"}
# A simulation reads the lists and dpkg's state and writes nothing: no lock taken or waited for, the
# binary caches built in memory (a stale /var/cache/apt/*.bin would otherwise be rewritten by a plan),
# and the planner's log (/var/log/apt/eipp.log.xz, written even by a simulation) sent nowhere.
SIMULATE = ("-s", "-o", "Debug::NoLocking=1", "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Dir::Log::Planner=/dev/null")  # fmt: skip
# dpkg's questions answered as unattended-upgrades does; apt's daily job may hold the lock a while.
DPKG_OPTIONS = ("-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
                "-o", "DPkg::Lock::Timeout=120")  # fmt: skip


@dataclass(frozen=True)
class Transition:
    """One package's change: installed, upgraded or removed. `new` is None for a removal, and for a
    package to install that the lists do not know yet (its version is known once they are refreshed)."""

    name: str
    verb: str  # install, upgrade, remove
    old: str | None
    new: str | None
    security: bool = False

    @property
    def shown(self) -> str:
        new = self.new or ("(none)" if self.verb == "remove" else "(the version the refreshed lists offer)")
        return f"{self.old or '(none)'} -> {new}"


def parse_simulation(output: str) -> list[Transition]:
    """apt-get -s output: `Inst name [old] (new Label:Version/Archive, ... [arch])` and `Remv name [old]`."""
    found: dict[str, Transition] = {}
    for line in output.splitlines():
        if match := INST.match(line):
            releases = re.sub(r"\s*\[[^\]]*\]\s*$", "", match["releases"]).split(",")
            security = any(release.strip().rpartition("/")[2].endswith("-security") for release in releases)
            verb = "upgrade" if match["old"] else "install"
            found[match["name"]] = Transition(match["name"], verb, match["old"], match["new"], security)
        elif match := REMV.match(line):
            found[match["name"]] = Transition(match["name"], "remove", match["old"], None)
    return list(found.values())


def changed_between(before: dict[str, str], after: dict[str, str]) -> list[Transition]:
    """What dpkg's database says changed, by package."""
    changes = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old != new:
            verb = "install" if old is None else "remove" if new is None else "upgrade"
            changes.append(Transition(name, verb, old, new))
    return changes


class UnknownPackages(Exception):
    """Packages the lists do not know (or offer no version of)."""

    def __init__(self, names: list[str], message: str) -> None:
        super().__init__(message)
        self.names = names


class PackageBackend(ABC):
    """What the update op (and any op that needs a package) asks of a distribution's package manager.
    A pacman backend is a sibling of AptBackend, chosen in `backend_for`. The facts (has_lists,
    installed, upgradable, installable, removable) change nothing; the rest carry out."""

    name: ClassVar[str]
    # Whether the distribution publishes security updates apart (Debian's -security archive).
    security_archive: ClassVar[bool] = True

    def __init__(self, target: Target) -> None:
        self.target = target

    @abstractmethod
    def has_lists(self) -> bool:
        """Whether the package lists were ever fetched (none: nothing can be planned from them)."""

    @abstractmethod
    def installed(self) -> dict[str, str]:
        """Installed packages and their versions."""

    @abstractmethod
    def upgradable(self, security_only: bool, install: Sequence[str] = ()) -> list[Transition]:
        """What upgrading that scope, and installing `install`, would change by the lists as they are;
        raises UnknownPackages for a name in `install` the lists lack."""

    @abstractmethod
    def installable(self, names: Sequence[str]) -> list[Transition]:
        """What installing `names` would change; raises UnknownPackages for names the lists lack."""

    @abstractmethod
    def removable(self) -> list[Transition]:
        """Packages installed as dependencies that nothing needs any more."""

    @abstractmethod
    def refresh(self) -> None: ...

    @abstractmethod
    def upgrade(self, security_only: bool, install: Sequence[str] = ()) -> None: ...

    @abstractmethod
    def install(self, names: Sequence[str]) -> None: ...

    @abstractmethod
    def autoremove(self) -> None: ...


class AptBackend(PackageBackend):
    name = "apt"
    LISTS = "/var/lib/apt/lists"

    def has_lists(self) -> bool:
        return any("_Packages" in name for name in self.target.files.names(self.LISTS))

    def installed(self) -> dict[str, str]:
        native = self._run(["dpkg", "--print-architecture"]).strip()
        fields = "${Package}\t${Architecture}\t${Version}\t${db:Status-Status}\n"
        versions = {}
        for line in self._run(["dpkg-query", "-W", f"-f={fields}"]).splitlines():
            name, architecture, version, status = line.split("\t")
            if status == "installed":  # not config-files (removed) nor half-installed
                versions[name if architecture in (native, "all") else f"{name}:{architecture}"] = version
        return versions

    def upgradable(self, security_only: bool, install: Sequence[str] = ()) -> list[Transition]:
        # dist-upgrade takes packages to install too (apt >= 1.1): one simulation, one transaction.
        if not security_only:
            return self._simulate("dist-upgrade", *install)
        security = [change.name for change in self._simulate("dist-upgrade") if change.security]
        changes = self._simulate("install", "--only-upgrade", *security) if security else []
        return changes + (self._simulate("install", *install) if install else [])

    def installable(self, names: Sequence[str]) -> list[Transition]:
        return self._simulate("install", *names)

    def removable(self) -> list[Transition]:
        return self._simulate("autoremove")

    def refresh(self) -> None:
        self._apt("update", "--error-on=any")  # a list that failed to download is an error, not a warning

    def upgrade(self, security_only: bool, install: Sequence[str] = ()) -> None:
        if not security_only:
            self._apt("dist-upgrade", *DPKG_OPTIONS, *install)
            return
        security = [change.name for change in self._simulate("dist-upgrade") if change.security]
        if security:
            self._apt("install", *DPKG_OPTIONS, "--only-upgrade", *security)
        if install:
            self.install(install)

    def install(self, names: Sequence[str]) -> None:
        self._apt("install", *DPKG_OPTIONS, *names)

    def autoremove(self) -> None:
        self._apt("autoremove", *DPKG_OPTIONS)

    def _simulate(self, command: str, *args: str) -> list[Transition]:
        argv = self._argv(["apt-get", *SIMULATE, command, *args])
        result = run(argv, capture=True, check=False, env=APT_ENV)
        if result.returncode == 0:
            return parse_simulation(result.stdout)
        errors = "; ".join(line for line in result.stderr.splitlines() if line.startswith("E:"))
        unknown = [a or b for a, b in UNKNOWN.findall(result.stderr)]
        if unknown:
            raise UnknownPackages(unknown, errors)
        raise OpFailed(f"apt-get cannot plan {' '.join((command, *args))}: {errors or 'it failed'}")

    def _apt(self, command: str, *args: str) -> None:
        try:
            run(self._argv(["apt-get", "-q", "-y", command, *args]), capture=True, env=APT_ENV)
        except CommandError as error:
            raise OpFailed(f"apt-get {command} failed: {error}") from None

    def _run(self, argv: list[str]) -> str:
        return run(self._argv(argv), capture=True, env=APT_ENV).stdout

    def _argv(self, argv: list[str]) -> list[str]:
        return with_network(self.target, argv)


def with_network(target: Target, argv: Sequence[str]) -> list[str]:
    """in_target's argv, with what apt's downloads need in a scratch root's sandbox: a /tmp its
    unprivileged downloader (_apt) may write, and the caller's resolver where the target's
    /etc/resolv.conf leads into /run (systemd-resolved's stub), which the sandbox replaces."""
    wrapped = in_target(target, argv)
    if target.root == Path("/"):
        return wrapped
    extra = ["--chmod", "1777", "/tmp"]
    link = target.files.readlink("/etc/resolv.conf")
    status = target.files.lstat("/etc/resolv.conf")
    if link is not None and status is not None and status.st_uid == 0:  # root's link: the distribution's
        inside = os.path.normpath(Path("/etc") / link)
        if inside.startswith("/run/") and Path("/etc/resolv.conf").exists():
            # Made first, or bwrap makes the directories 0700 and _apt cannot read the file.
            extra += ["--dir", str(Path(inside).parent), "--ro-bind", "/etc/resolv.conf", inside]
    cut = wrapped.index("--")
    return [*wrapped[:cut], *extra, *wrapped[cut:]]
