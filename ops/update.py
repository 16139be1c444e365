"""`update`: packages refreshed and upgraded through the distribution's package manager: apt on Debian,
libalpm on Arch Linux (ops/packages_pacman.py; `backend_for` chooses by /etc/os-release).

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

from collections.abc import Sequence
from dataclasses import dataclass

from ops.actions import Action, Change, Output
from ops.base import Op, Plan, joined
from ops.errors import InvalidParams, OpFailed, UnsafePath
from ops.packages import PACKAGE, AptBackend, PackageBackend, Transition, UnknownPackages, changed_between
from ops.params import Kind, Param, Params
from ops.target import Target


def backend_for(target: Target) -> PackageBackend:
    # Imported when asked for, not at the daemon's start: a Debian host never needs the Arch backend.
    from ops.packages_pacman import PacmanBackend, is_arch

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
