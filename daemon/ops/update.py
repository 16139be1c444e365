"""`update`: packages refreshed and upgraded through the distribution's package manager: apt on Debian,
libalpm on Arch Linux (daemon/ops/packages_pacman.py; `backend_for` chooses by /etc/os-release).

The plan is read from the package lists as they are, with apt's own simulation (`apt-get -s`, which
changes nothing): one change per package, old -> new version. Refreshing the lists (`apt-get update`)
is not a change worth a job of its own: it alters nothing the host runs, and a plan that always held
it would never be empty, so every run would take snapshots and report "changed". The refresh is the
first action of an apply that has something to do, or whose lists were never fetched (a fresh image,
where nothing can be planned). So a plan is as current as the lists: what the mirror published since
they were fetched shows once they are refreshed (by an apply, or apt's daily timer where it refreshes).
An apply upgrades what the refreshed lists offer, which may be more than planned, and its output names
every package that changed, old and new version, from dpkg's database before and after.

Why dist-upgrade and not upgrade: a stable release's fixes sometimes come as new packages, above all
the kernel (a new ABI is a new linux-image-* package that linux-image-amd64 depends on) and renamed
libraries; `upgrade` never installs a new package, so it would leave exactly those behind. What
dist-upgrade would also remove is planned and shown like every other change. `security_only` takes
the packages whose candidate comes from a "-security" archive and upgrades just those (`install
--only-upgrade`, which still pulls in new dependencies they need).

dpkg never asks: `--force-confdef --force-confold` keeps a configuration file the admin (or an op)
changed and takes the package's where it was not touched, as unattended-upgrades does.

A package transaction names no files a restore could put back: its changes are whole packages, and
dpkg's database without the files it describes would lie. The job's pre snapshot is how it is undone
(`rastosctl snapshot rollback`). In a dry run's shadow, apt's simulation stands in for the transaction:
the shadow's upper layer is memory, and a full upgrade downloaded into it could exhaust it.

On Arch the same plan comes from libalpm's dry resolution (sysupgrade and the packages named), the
transaction is libalpm's, and the rest is as above: the refresh first, one step per package, checked.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from daemon.errors import InvalidParams, OpFailed, UnsafePath
from daemon.ops.base import Action, Change, Op, Output, Plan, Target, in_target, joined
from daemon.ops.params import Kind, Param, Params
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


def backend_for(target: Target) -> PackageBackend:
    # Imported here: the pacman backend builds on this module (and imports pyalpm only when used).
    from daemon.ops.packages_pacman import PacmanBackend, is_arch

    if is_arch(target):
        return PacmanBackend(target)
    if target.has_program("/usr/bin/apt-get"):
        return AptBackend(target)
    raise OpFailed("no package manager rastOS knows on the target (apt, or libalpm on Arch Linux)")


# How each backend's steps read in a plan: the refresh, and the transaction of the scope.
REFRESH_COMMAND = {"apt": "apt-get update", "pacman": "pacman -Sy"}
UPGRADE_COMMAND = {"apt": "apt-get dist-upgrade", "pacman": "pacman -Su"}


@dataclass(frozen=True)
class RefreshLists(Action):
    """The package lists fetched again; the first thing an apply with something to do does."""

    manager: str = "apt"

    def describe(self) -> Change:
        command = REFRESH_COMMAND[self.manager]
        return Change("package lists", "refresh", f"{command} (a plan reads the lists as they were)")

    def execute(self, target: Target, output: Output) -> None:
        if target.simulated:
            output("dry run: the package lists are not refreshed")
            return
        backend_for(target).refresh()
        output("refreshed the package lists")


@dataclass(frozen=True)
class PackageTransaction(Action):
    """The upgrade of the scope, the installs and the autoremove, against the lists as they are when it
    runs. Its output names every package that changed, old and new version, from dpkg before and after."""

    security_only: bool
    install: tuple[str, ...]
    autoremove: bool
    manager: str = "apt"

    def describe(self) -> Change:
        if self.security_only:
            steps = ["apt-get install --only-upgrade <security updates>"]
            steps += [f"apt-get install {' '.join(self.install)}"] if self.install else []
        else:
            steps = [" ".join((UPGRADE_COMMAND[self.manager], *self.install))]  # one transaction
        if self.autoremove:
            steps.append("apt-get autoremove" if self.manager == "apt" else "pacman -Rs <orphans>")
        return Change("packages", "run", "; ".join(steps))

    def execute(self, target: Target, output: Output) -> None:
        backend = backend_for(target)
        if target.simulated:
            self.simulate(backend, output)
            return
        before = backend.installed()
        backend.upgrade(self.security_only, self.install)
        if self.autoremove:
            backend.autoremove()
        changes = changed_between(before, backend.installed())
        for change in changes:
            output(f"{change.verb} {change.name} {change.shown}")
        output(f"{len(changes)} package(s) changed")

    def simulate(self, backend: PackageBackend, output: Output) -> None:
        """A dry run on a shadow: apt's simulation says what the transaction would do."""
        for change in expected_changes(backend, self.security_only, self.install, self.autoremove):
            output(f"dry run: would {change.verb} {change.name} {change.shown}")


@dataclass(frozen=True)
class PackageStep(Action):
    """One package's planned change, checked after the transaction: a planned upgrade or install that
    did not happen fails the step (a planned removal the refreshed lists no longer need is only said)."""

    transition: Transition

    def describe(self) -> Change:
        origin = " (security)" if self.transition.security else ""
        return Change(f"package {self.transition.name}", self.transition.verb, self.transition.shown + origin)

    def execute(self, target: Target, output: Output) -> None:
        if target.simulated:
            return
        change = self.transition
        now = backend_for(target).installed().get(change.name)
        if change.verb == "remove":
            if now is not None:
                output(f"{change.name} was not removed after all: the refreshed lists keep it ({now})")
        elif now is None or now == change.old:
            planned = f"planned {change.verb} {change.shown}"
            raise OpFailed(f"package {change.name}: {planned}, but it is at {now or '(none)'}")


class UpdateOp(Op):
    name = "update"
    description = (
        "Refresh the package lists and upgrade the packages (all, or security updates only), install the ones "
        "named; the output names every package changed, old and new version"
    )
    schema = (
        Param("refresh", Kind.BOOLEAN, "fetch the package lists first (apt-get update, pacman -Sy)", default=True),
        Param("security_only", Kind.BOOLEAN, "upgrade only packages whose new version comes from a -security archive",
              default=False),
        Param("packages", Kind.STRING_LIST, "packages to install as well, e.g. [\"htop\"]", default=[], pattern=PACKAGE,
              pattern_help="a package name: lower case letters, digits, + - and ."),
        Param("autoremove", Kind.BOOLEAN, "remove packages installed as dependencies that nothing needs any more",
              default=False),
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        backend = backend_for_params(target)
        if params["security_only"] and not backend.security_archive:
            raise InvalidParams("params.security_only", f"{backend.name} hosts have no separate security updates")
        missing = [name for name in params["packages"] if name not in backend.installed()]
        if params["refresh"] or not missing:
            return  # a package the old lists lack may be in the refreshed ones: apt says so when applied
        try:
            backend.installable(missing)
        except UnknownPackages as error:
            index = params["packages"].index(error.names[0]) if error.names[0] in params["packages"] else None
            field = "params.packages" if index is None else f"params.packages[{index}]"
            problem = f"the package lists offer no {joined(error.names)} (refresh them: refresh true)"
            raise InvalidParams(field, problem) from None

    def plan(self, target: Target, params: Params) -> Plan:
        backend = backend_for(target)
        installed = backend.installed()
        missing = tuple(name for name in params["packages"] if name not in installed)
        changes = expected_changes(backend, params["security_only"], missing, params["autoremove"], params["refresh"])
        never_fetched = params["refresh"] and not backend.has_lists()
        if not changes and not never_fetched:
            return Plan(self.name, ())
        actions: list[Action] = [RefreshLists(backend.name)] if params["refresh"] else []
        actions.append(PackageTransaction(params["security_only"], missing, params["autoremove"], backend.name))
        actions += [PackageStep(change) for change in sorted(changes, key=lambda change: change.name)]
        return Plan(self.name, tuple(actions))

    def verify(self, target: Target, params: Params) -> list[str]:
        backend = backend_for(target)
        problems = []
        left = backend.upgradable(params["security_only"])
        if left:
            scope = "security updates" if params["security_only"] else "upgrades"
            problems.append(f"{scope} still pending: {joined([f'{c.name} {c.shown}' for c in left])}")
        installed = backend.installed()
        absent = [name for name in params["packages"] if name not in installed]
        if absent:
            problems.append(f"not installed: {joined(absent)}")
        if params["autoremove"] and (removable := backend.removable()):
            problems.append(f"still removable: {joined([change.name for change in removable])}")
        if params["refresh"] and not backend.has_lists():
            problems.append("the package lists were never fetched")
        return problems


def expected_changes(
    backend: PackageBackend, security_only: bool, install: Sequence[str], autoremove: bool, refresh: bool = True
) -> list[Transition]:
    """What a transaction would change by the lists as they are, one entry per package. A package to
    install that the lists do not know is listed without a version when a refresh comes first (the
    refreshed lists may know it); without one, it is an error."""
    try:
        changes = backend.upgradable(security_only, install)
    except UnknownPackages as error:
        if not refresh:
            raise OpFailed(f"the package lists offer no {joined(error.names)}: {error}") from None
        changes = backend.upgradable(security_only) + [Transition(name, "install", None, None) for name in install]
    by_name = {change.name: change for change in changes}
    if autoremove:
        by_name.update({change.name: change for change in backend.removable() if change.name not in by_name})
    return list(by_name.values())


def backend_for_params(target: Target) -> PackageBackend:
    """The backend for a check: a target without one is refused as a parameter problem of the op."""
    try:
        return backend_for(target)
    except UnsafePath:
        raise
    except OpFailed as error:
        raise InvalidParams("op", str(error)) from None
