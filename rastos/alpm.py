"""libalpm, pacman's library, through pyalpm: Arch Linux roots bootstrapped and upgraded in process.

One `Alpm` session is a libalpm handle on a root with its own database path, the sync databases of
the configured repositories, and callbacks that turn libalpm's events, progress and downloads into
short notes (`installing systemd (45/150)`) for whoever shows progress: the image builder's display,
the daemon's log. Every operation is a real libalpm transaction; a plan is one that is prepared
(dependencies resolved) and released without commit, under no lock, so it writes nothing.

Failures become `AlpmError`s that name the packages: unsatisfied dependencies, conflicting packages,
conflicting files, targets no repository offers. libalpm checks everything it can before it touches
the root (dependencies, conflicts, downloads, signatures and checksums, conflicting files, disk
space): a transaction refused by any of these leaves the root as it was. One that fails while it
extracts (a full disk, an unreadable archive) leaves it part way; callers own that case (the builder
removes its partial root, the daemon's job has its snapshot from before).

pyalpm is imported only when a session opens: the daemon runs on Debian, where it is absent, and
inside Arch images it is the distribution's `pyalpm` package. Two flaws of pyalpm (0.10, for libalpm
13 to 15) shape the code: a conflict found while preparing is handed to Python as if it were a
missing dependency, which crashes the process, so transactions are prepared with libalpm's conflict
check off and `conflicts()` below checks the resolved set with libalpm's own satisfier instead; and
callbacks are global to the process, so each operation attaches its own before it starts.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rastos.alpm_feedback import Feedback, Progress
from rastos.errors import RastosError
from rastos.process import run

log = logging.getLogger("rastos.alpm")

KEY_MISSING = "required key missing from keyring"  # libalpm's log line, naming neither key nor package
UNSIGNED = re.compile(r"failed retrieving file '(.+?)\.pkg\.tar[^']*\.sig'")

# libalpm's signature levels (alpm.h, the same values in pyalpm.SIG_*): a bit that requires a
# signature, one that makes it optional, and two that accept keys of marginal or unknown trust.
SIG_PACKAGE, SIG_PACKAGE_OPTIONAL, SIG_PACKAGE_MARGINAL_OK, SIG_PACKAGE_UNKNOWN_OK = 1, 2, 4, 8
SIG_DATABASE, SIG_DATABASE_OPTIONAL, SIG_DATABASE_MARGINAL_OK, SIG_DATABASE_UNKNOWN_OK = 1024, 2048, 4096, 8192
# What Arch's own pacman.conf says: packages must be signed by a trusted key, databases may be.
SIG_REQUIRED = SIG_PACKAGE | SIG_DATABASE | SIG_DATABASE_OPTIONAL


class AlpmError(RastosError):
    """libalpm refused or failed; the message names the packages, databases or files concerned."""


class UnknownTargets(AlpmError):
    def __init__(self, names: Sequence[str], repositories: Sequence[str]) -> None:
        offered = ", ".join(repositories) or "no repository"
        super().__init__(f"no package named {', '.join(names)} in the repositories ({offered})")
        self.names = list(names)


class UnsatisfiedDependencies(AlpmError):
    def __init__(self, missing: Sequence[tuple[str, str, str | None]]) -> None:
        def one(target: str, dependency: str, causing: str | None) -> str:
            return f"{target} needs {dependency}" + (f", which installing {causing} removes" if causing else "")

        super().__init__(
            "unsatisfied dependencies: " + "; ".join(one(*item) for item in missing),
            hint="the configured repositories offer nothing that satisfies them",
        )
        self.missing = list(missing)


class PackageConflicts(AlpmError):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__(
            "conflicting packages: " + "; ".join(f"{a} conflicts with {b}" for a, b in pairs),
            hint="they cannot be installed together: drop one of them",
        )
        self.pairs = list(pairs)


class FileConflicts(AlpmError):
    def __init__(self, conflicts: Sequence[tuple[str, str, str | None]]) -> None:
        def one(target: str, path: str, other: str | None) -> str:
            return f"{path} of {target} is also in {other}" if other else f"{path} of {target} exists on disk"

        super().__init__(
            "conflicting files, nothing was changed: " + "; ".join(one(*item) for item in conflicts),
            hint="a file on disk that no package owns is never overwritten: move it away first",
        )
        self.conflicts = list(conflicts)


@dataclass(frozen=True)
class Repository:
    name: str
    servers: tuple[str, ...]  # full URLs of the repository's directory ($repo and $arch replaced)
    siglevel: int = SIG_REQUIRED


@dataclass(frozen=True)
class AlpmOptions:
    """Where a session works, every path as the host sees it."""

    root: Path
    repositories: tuple[Repository, ...]
    architecture: str = "x86_64"
    dbpath: Path | None = None  # default ROOT/var/lib/pacman
    cachedir: Path | None = None  # downloaded packages; default ROOT/var/cache/pacman/pkg
    gpgdir: Path | None = None  # pacman's keyring; default ROOT/etc/pacman.d/gnupg
    logfile: Path | None = None  # default ROOT/var/log/pacman.log
    ignore: tuple[str, ...] = ()  # IgnorePkg: never upgraded
    no_upgrade: tuple[str, ...] = ()  # NoUpgrade: files kept, the new one written as .pacnew
    no_extract: tuple[str, ...] = ()

    def path(self, given: Path | None, default: str) -> Path:
        return given if given is not None else self.root / default


@dataclass(frozen=True)
class PackageChange:
    name: str
    verb: str  # install, upgrade, downgrade, reinstall, remove
    old: str | None
    new: str | None


def pyalpm_module() -> Any:
    try:
        import pyalpm
    except ImportError:
        raise AlpmError(
            "libalpm's Python binding pyalpm is not installed",
            hint="on Arch Linux: pacman -S pyalpm; on a Debian build host: ./setup-host",
        ) from None
    return pyalpm


class Alpm:
    """A libalpm handle on `options.root`. Not for two threads at once (pyalpm's callbacks are global)."""

    def __init__(self, options: AlpmOptions, progress: Progress | None = None) -> None:
        self.pyalpm = pyalpm_module()
        self.options = options
        self.dbpath = options.path(options.dbpath, "var/lib/pacman")
        self.gpgdir = options.path(options.gpgdir, "etc/pacman.d/gnupg")
        try:
            handle = self.pyalpm.Handle(str(options.root), str(self.dbpath))
        except self.pyalpm.error as error:
            raise AlpmError(f"libalpm cannot open {options.root} (database {self.dbpath}): {reason(error)}") from None
        handle.arch = [options.architecture]
        handle.cachedirs = [f"{options.path(options.cachedir, 'var/cache/pacman/pkg')}/"]
        handle.gpgdir = str(self.gpgdir)
        handle.logfile = str(options.path(options.logfile, "var/log/pacman.log"))
        handle.ignorepkgs = list(options.ignore)
        handle.noupgrades = list(options.no_upgrade)
        handle.noextracts = list(options.no_extract)
        for repository in options.repositories:
            db = handle.register_syncdb(repository.name, repository.siglevel)
            db.servers = list(repository.servers)
        self.handle = handle
        self.feedback = Feedback(progress, options.root)

    # --- facts: these change nothing -----------------------------------------------------------

    def installed(self) -> dict[str, str]:
        return {pkg.name: pkg.version for pkg in self.handle.get_localdb().pkgcache}

    def inventory(self) -> list[tuple[str, str, str]]:
        """Every installed package as (name, version, architecture), by name."""
        return sorted((pkg.name, pkg.version, pkg.arch) for pkg in self.handle.get_localdb().pkgcache)

    def has_databases(self) -> bool:
        """Whether every configured repository's database was fetched once."""
        sync = self.dbpath / "sync"
        return all((sync / f"{repository.name}.db").is_file() for repository in self.options.repositories)

    def orphans(self) -> list[str]:
        """Packages installed as dependencies that nothing requires or optionally uses any more."""
        return sorted(
            pkg.name
            for pkg in self.handle.get_localdb().pkgcache
            if pkg.reason == self.pyalpm.PKG_REASON_DEPEND and not pkg.compute_requiredby()
            and not pkg.compute_optionalfor()
        )  # fmt: skip

    def plan(self, install: Sequence[str] = (), *, sysupgrade: bool = False) -> list[PackageChange]:
        """What installing `install` (and upgrading everything, with `sysupgrade`) would change, by
        the databases as they are: libalpm's own resolution, never committed, under no lock."""
        return self._sync(install, sysupgrade, commit=False)

    def plan_removal(self, names: Sequence[str]) -> list[PackageChange]:
        return self._remove(names, commit=False)

    # --- changes ---------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Fetch the repositories' databases; a database that cannot be fetched is an error."""
        failed = []
        with self._operation():
            for db in self.handle.get_syncdbs():
                try:
                    db.update(force)
                except self.pyalpm.error as error:
                    failed.append(f"{db.name} ({' '.join(db.servers) or 'no server'})")
                    log.error("cannot fetch the %s database: %s", db.name, reason(error))
            if failed:
                raise AlpmError(
                    f"cannot fetch the package database of {', '.join(failed)}: {self._why('it failed')}",
                    hint="this host must reach the repository: check the mirror URL and the network",
                )

    def install(self, install: Sequence[str] = (), *, sysupgrade: bool = False) -> list[PackageChange]:
        """Install `install` (and upgrade everything, with `sysupgrade`) in one transaction."""
        return self._sync(install, sysupgrade, commit=True)

    def remove(self, names: Sequence[str]) -> list[PackageChange]:
        """Remove `names` and the dependencies they alone needed (pacman -Rs)."""
        return self._remove(names, commit=True)

    # --- transactions ------------------------------------------------------------------------------

    def _sync(self, install: Sequence[str], sysupgrade: bool, *, commit: bool) -> list[PackageChange]:
        targets = self.find(install)
        # Targets first: libalpm's sysupgrade leaves out what is already in the transaction.
        with self._operation(), self._transaction(commit, needed=True) as trans:
            try:
                for pkg in targets:
                    trans.add_pkg(pkg)
                if sysupgrade:
                    trans.sysupgrade(downgrade=False)
            except self.pyalpm.error as error:
                raise AlpmError(f"libalpm cannot add {', '.join(install) or 'the upgrade'}: {reason(error)}") from None
            self._prepare(trans)
            changes = self._changes(trans)
            if pairs := self.conflicts(trans):
                raise PackageConflicts(pairs)
            if commit and changes:
                self._commit(trans)
        return changes

    def _remove(self, names: Sequence[str], *, commit: bool) -> list[PackageChange]:
        local = self.handle.get_localdb()
        unknown = [name for name in names if local.get_pkg(name) is None]
        if unknown:
            raise AlpmError(f"not installed: {', '.join(unknown)}")
        with self._operation(), self._transaction(commit, recurse=True) as trans:
            for name in names:
                trans.remove_pkg(local.get_pkg(name))
            self._prepare(trans)
            changes = self._changes(trans)
            if commit and changes:
                self._commit(trans)
        return changes

    def find(self, names: Sequence[str]) -> list[Any]:
        """Each name's package from the first repository that has it, or else one that provides it
        (as pacman -S does); names no repository offers raise UnknownTargets, all of them at once."""
        dbs = self.handle.get_syncdbs()
        found, unknown = [], []
        for name in names:
            pkg = next((p for db in dbs if (p := db.get_pkg(name)) is not None), None)
            if pkg is None:
                pkg = next((p for db in dbs if (p := self.pyalpm.find_satisfier(db.pkgcache, name)) is not None), None)
            if pkg is None:
                unknown.append(name)
            else:
                found.append(pkg)
        if unknown:
            raise UnknownTargets(unknown, [db.name for db in dbs])
        return found

    def conflicts(self, trans: Any) -> list[tuple[str, str]]:
        """Pairs of packages that conflict after this transaction: between packages it adds, and
        between one it adds and one that stays installed (libalpm's satisfier decides, so versioned
        conflicts and provisions count as libalpm counts them)."""
        adding = list(trans.to_add)
        leaving = {pkg.name for pkg in adding} | {pkg.name for pkg in trans.to_remove}
        staying = [pkg for pkg in self.handle.get_localdb().pkgcache if pkg.name not in leaving]
        pairs: dict[frozenset[str], tuple[str, str]] = {}
        for pkg in adding:
            for other in self._conflicting(pkg, [p for p in adding if p.name != pkg.name] + staying):
                pairs.setdefault(frozenset((pkg.name, other)), (pkg.name, other))
        for pkg in staying:
            for other in self._conflicting(pkg, adding):
                pairs.setdefault(frozenset((pkg.name, other)), (other, pkg.name))
        return sorted(pairs.values())

    def _conflicting(self, pkg: Any, pool: list[Any]) -> list[str]:
        found = []
        for spec in pkg.conflicts:
            found += [other.name for other in pool if self.pyalpm.find_satisfier([other], spec) is not None]
        return found

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        self.feedback.attach(self.handle)
        yield

    @contextlib.contextmanager
    def _transaction(self, commit: bool, **flags: bool) -> Iterator[Any]:
        try:
            # A plan takes no lock: it writes nothing, and a running transaction must not block it.
            trans = self.handle.init_transaction(nolock=not commit, noconflicts=True, **flags)
        except self.pyalpm.error as error:
            if "lock" in reason(error):
                raise AlpmError(
                    f"pacman's database {self.dbpath} is locked: another package transaction is running",
                    hint=f"wait for it; if none runs, remove the stale lock {self.dbpath / 'db.lck'}",
                ) from None
            raise AlpmError(f"libalpm cannot start a transaction: {reason(error)}") from None
        try:
            yield trans
        finally:
            trans.release()

    def _prepare(self, trans: Any) -> None:
        try:
            trans.prepare()
        except self.pyalpm.error as error:
            data = error.args[2] if len(error.args) > 2 else None
            if isinstance(data, list) and data and all(isinstance(item, tuple) for item in data):
                raise UnsatisfiedDependencies([tuple(item) for item in data]) from None
            raise AlpmError(f"libalpm cannot prepare the transaction: {self._why(reason(error))}") from None

    def _commit(self, trans: Any) -> None:
        try:
            trans.commit()
        except self.pyalpm.error as error:
            data = error.args[2] if len(error.args) > 2 else None
            if isinstance(data, list) and data and all(isinstance(item, tuple) for item in data):
                root = str(self.options.root).rstrip("/")
                raise FileConflicts([(t, path.removeprefix(root), other) for t, path, other in data]) from None
            # A package the database has no signature for: libalpm looks for FILE.sig beside it.
            unsigned = [m.group(1) for line in self.feedback.errors if (m := UNSIGNED.search(line))]
            if unsigned:
                raise AlpmError(
                    f"no signature for {', '.join(dict.fromkeys(unsigned))} in the repository, which must be "
                    "signed (SigLevel Required); nothing was installed",
                    hint="sign the packages (repo-add takes FILE.sig into the database), or trust the repository: "
                    "SigLevel = Never in pacman.conf, distribution.check_signatures = false in an image profile",
                ) from None
            missing_key = any(KEY_MISSING in line for line in self.feedback.errors)
            if missing_key and (strangers := self._unknown_signers(trans)):
                raise AlpmError(
                    "signed by a key the keyring does not hold: "
                    + ", ".join(f"{package} (key {key})" for package, key in strangers)
                    + f"; nothing was installed (keyring {self.gpgdir})",
                    hint="a packager's key is added with pacman-key --add and --lsign-key, Arch's with "
                    "pacman-key --populate archlinux (a current archlinux-keyring)",
                ) from None
            raise AlpmError(f"the package transaction failed: {self._why(reason(error))}") from None

    def _unknown_signers(self, trans: Any) -> list[tuple[str, str]]:
        """Each package to install whose signature's key the keyring lacks, with that key's id:
        libalpm only says that some key is missing."""
        gpgdir = str(self.gpgdir)
        found = []
        with tempfile.TemporaryDirectory(prefix="rastos-sig-") as scratch:
            for pkg in trans.to_add:
                if not pkg.base64_sig:
                    continue
                signature = Path(scratch) / f"{pkg.name}.sig"
                signature.write_bytes(base64.b64decode(pkg.base64_sig))
                packets = run(["gpg", "--homedir", gpgdir, "--batch", "--list-packets", signature],
                              capture=True, check=False).stdout  # fmt: skip
                for key in dict.fromkeys(re.findall(r"keyid ([0-9A-F]{16})", packets)):
                    known = run(["gpg", "--homedir", gpgdir, "--batch", "--list-keys", key], capture=True, check=False)
                    if known.returncode != 0:
                        found.append((f"{pkg.name}-{pkg.version}", key))
        return found

    def _changes(self, trans: Any) -> list[PackageChange]:
        local = self.handle.get_localdb()
        changes = []
        for pkg in trans.to_add:
            old = local.get_pkg(pkg.name)
            changes.append(PackageChange(pkg.name, self._verb(old, pkg), old.version if old else None, pkg.version))
        changes += [PackageChange(pkg.name, "remove", pkg.version, None) for pkg in trans.to_remove]
        return changes

    def _verb(self, old: Any, new: Any) -> str:
        if old is None:
            return "install"
        order = self.pyalpm.vercmp(new.version, old.version)
        return "upgrade" if order > 0 else "downgrade" if order < 0 else "reinstall"

    def _why(self, fallback: str) -> str:
        """libalpm's own error lines of this operation (the file and server that failed, ...)."""
        return "; ".join(dict.fromkeys(self.feedback.errors)) or fallback


def reason(error: Exception) -> str:
    """libalpm's words for an error pyalpm raised: 'could not satisfy dependencies', ..."""
    match = re.search(r"pm_errno \d+ \((.*?)\)(?:, |$)", str(error))
    return match.group(1) if match else str(error)
