"""The update op's backend on Arch Linux targets: libalpm in process (rastos/alpm.py), not pacman.

Its configuration is the target's /etc/pacman.conf (repositories, mirrors through Include, signature
levels, IgnorePkg), read inside the target root. Plans are libalpm's own dry resolution: a sync
transaction (sysupgrade and the packages named) prepared under no lock and released, so a plan writes
nothing; the apply is the same transaction committed. Arch publishes no separate security updates, so
`security_only` is refused (the op says so by field); autoremove removes orphans, packages installed
as dependencies that nothing requires any more, with what they alone pulled in (pacman -Rs).

What libalpm refuses (a conflict, an unsatisfied dependency, a file on disk no package owns) leaves
the root untouched and fails the step with the packages named; an extraction that fails part way is
undone with the job's pre snapshot, as for apt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from ops.errors import OpFailed
from ops.packages import PackageBackend, Transition, UnknownPackages
from ops.rootfs import Links
from ops.target import Target
from rastos.alpm import Alpm, AlpmError, PackageChange, UnknownTargets
from rastos.errors import RastosError
from rastos.pacman_conf import read_pacman_conf

log = logging.getLogger("rastos.daemon.pacman")


def is_arch(target: Target) -> bool:
    """/etc/os-release says Arch (or a derivative: ID_LIKE), or pacman and its database are there."""
    text = target.read_text("/etc/os-release", links=Links.SYSTEM) or ""  # a link to ../usr/lib/os-release
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    names = [fields.get("ID", "").strip("\"'"), *fields.get("ID_LIKE", "").strip("\"'").split()]
    if "arch" in names:
        return True
    return not fields and target.has_program("/usr/bin/pacman") and target.is_dir("/var/lib/pacman/local")


def transition(change: PackageChange) -> Transition:
    verb = "install" if change.verb == "install" else "remove" if change.verb == "remove" else "upgrade"
    return Transition(change.name, verb, change.old, change.new)


class PacmanBackend(PackageBackend):
    name = "pacman"
    security_archive = False

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._alpm: Alpm | None = None

    @property
    def alpm(self) -> Alpm:
        """The session, opened on first use: an op that never asks never reads pacman.conf."""
        if self._alpm is None:
            try:
                self._alpm = Alpm(read_pacman_conf(self.target.root), progress=log.debug)
            except RastosError as error:
                raise OpFailed(str(error)) from None
        return self._alpm

    def has_lists(self) -> bool:
        return self.alpm.has_databases()

    def installed(self) -> dict[str, str]:
        return self.alpm.installed()

    def upgradable(self, security_only: bool, install: Sequence[str] = ()) -> list[Transition]:
        _refuse_security_only(security_only)
        with alpm_errors():
            return [transition(change) for change in self.alpm.plan(install, sysupgrade=True)]

    def installable(self, names: Sequence[str]) -> list[Transition]:
        with alpm_errors():
            return [transition(change) for change in self.alpm.plan(names)]

    def removable(self) -> list[Transition]:
        with alpm_errors():
            orphans = self.alpm.orphans()
            return [transition(change) for change in self.alpm.plan_removal(orphans)] if orphans else []

    def refresh(self) -> None:
        with alpm_errors():
            self.alpm.refresh()

    def upgrade(self, security_only: bool, install: Sequence[str] = ()) -> None:
        _refuse_security_only(security_only)
        with alpm_errors():
            self.alpm.install(install, sysupgrade=True)

    def install(self, names: Sequence[str]) -> None:
        with alpm_errors():
            self.alpm.install(names)

    def autoremove(self) -> None:
        with alpm_errors():
            if orphans := self.alpm.orphans():
                self.alpm.remove(orphans)


def _refuse_security_only(security_only: bool) -> None:
    if security_only:
        raise OpFailed("Arch Linux publishes no separate security updates: upgrade everything")


@contextlib.contextmanager
def alpm_errors() -> Iterator[None]:
    """libalpm's errors as the op's: a name no repository has is UnknownPackages, the rest OpFailed."""
    try:
        yield
    except UnknownTargets as error:
        raise UnknownPackages(error.names, str(error)) from None
    except AlpmError as error:
        raise OpFailed(str(error)) from None
