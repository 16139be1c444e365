"""The Arch Linux backend through libalpm (pyalpm), against a pacman repository the tests make.

No Arch mirror is reachable here, so each test writes its packages (a .PKGINFO and files in a
.pkg.tar.gz, as makepkg would leave them), indexes them with Debian's repo-add and serves the
repository as a file:// Server. Everything else is real: libalpm fetches the database, resolves,
downloads, checks checksums and conflicting files, extracts and records. Signatures are not checked
(the packages are unsigned); docs/arch.md says what a real build checks them against.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import btrfsutil
import pyalpm
import pytest

from daemon.errors import InvalidParams
from imagebuilder.events import JsonEvents
from imagebuilder.profile import ProfileError, load_profile
from imagebuilder.profile.load import profile_from_dict, profile_to_dict
from imagebuilder.stages.bootstrap_arch import (
    ArchRecipe,
    build_root,
    build_root_isolated,
    check_arch_host,
    package_set,
)
from ops.base import Plan, execute
from ops.packages import Transition
from ops.packages_pacman import PacmanBackend
from ops.steps import Step, step_from
from ops.target import Target
from ops.update import PackageStep, PackageTransaction, RefreshLists, backend_for
from rastos import alpm as rastos_alpm
from rastos.alpm import (
    Alpm,
    AlpmError,
    FileConflicts,
    PackageConflicts,
    UnknownTargets,
    UnsatisfiedDependencies,
)
from rastos.errors import RastosError
from rastos.pacman_conf import parse_siglevel, read_pacman_conf
from tests.daemon_fixtures import JOB, MANAGER, Rastosd
from tests.op_tree import tree_digest
from tests.pacman_keys import Keys, gpg

CHECKOUT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.root]

BUILT = 1700000000  # every archive member's mtime: the same package bytes each run


@dataclass(frozen=True)
class Link:
    target: str


def package(
    directory: Path,
    name: str,
    version: str,
    files: dict[str, str | bytes | Link] | None,
    relations: dict[str, list[str]],
) -> Path:
    """A package as makepkg leaves it: .PKGINFO first, then its files (a path ending in / is a
    directory, bytes an executable, a Link a symbolic link; `.INSTALL` is the install scriptlet).
    `relations` maps depend, conflict, provides to their values."""
    files = files or {f"usr/share/{name}/{name}.txt": f"{name} {version}\n"}
    info = [f"pkgname = {name}", f"pkgbase = {name}", f"pkgver = {version}", f"pkgdesc = test package {name}",
            f"builddate = {BUILT}", "packager = rastOS tests", "size = 1", "arch = x86_64"]  # fmt: skip
    info += [f"{key} = {value}" for key, values in relations.items() for value in values]
    path = directory / f"{name}-{version}-x86_64.pkg.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for member, content in [(".PKGINFO", "\n".join(info) + "\n"), *files.items()]:
            entry = tarfile.TarInfo(member.rstrip("/"))
            entry.mtime, entry.mode = BUILT, 0o755 if member.endswith("/") or isinstance(content, bytes) else 0o644
            if member.endswith("/"):
                entry.type = tarfile.DIRTYPE
                archive.addfile(entry)
            elif isinstance(content, Link):
                entry.type, entry.linkname = tarfile.SYMTYPE, content.target
                archive.addfile(entry)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                entry.size = len(data)
                archive.addfile(entry, io.BytesIO(data))
    return path


@dataclass
class Repo:
    """A pacman repository named `test` at DIRECTORY/test, its Server `file://DIRECTORY/$repo`.

    libalpm fetches a database only if it is newer than its copy, to the second (If-Modified-Since);
    each change here is dated a second after the last, as a mirror's next publication would be."""

    directory: Path
    published: int = 0

    @property
    def mirror(self) -> str:
        return f"file://{self.directory}/$repo"

    def add(
        self, name: str, version: str = "1.0-1", files: dict[str, str | bytes | Link] | None = None,
        signer: Path | None = None, **relations: list[str],
    ) -> None:  # fmt: skip
        """`signer`: a GnuPG home whose key signs the package; repo-add puts the signature in the
        database, where libalpm looks for it."""
        path = package(self.directory / "test", name, version, files, relations)
        if signer is not None:
            gpg(signer, "--detach-sign", "--no-armor", "--output", f"{path}.sig", str(path))  # repo-add takes it
        database = self.directory / "test/test.db.tar.gz"
        subprocess.run(["repo-add", "--quiet", database, path], check=True)
        self.published = max(int(time.time()) + 1, self.published + 1)
        os.utime(database, (self.published, self.published))

    def recipe(self, *packages: str) -> ArchRecipe:
        return ArchRecipe(self.mirror, ("test",), packages, keyring=None)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    made = Keys.make(tmp_path_factory.mktemp("keys"))
    yield made
    made.close()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    assert shutil.which("repo-add") and shutil.which("bsdtar"), "./setup-host installs pacman-package-manager"
    made = Repo(tmp_path / "mirror")
    (made.directory / "test").mkdir(parents=True)
    made.add("a", depend=["b"])
    made.add("b", depend=["c>=1.0"])
    made.add("c")
    made.add("x", conflict=["y"])
    made.add("y")
    made.add("tool")  # the op's package names are two characters at least
    made.add("m", depend=["nosuch"])
    made.add("f", files={"etc/": "", "etc/existing.conf": "from the package\n"})
    # Its file d replaces its own directory d: libalpm refuses that only while extracting, after
    # the dependencies before it and half of this package are on disk.
    tree = {"usr/": "", "usr/share/": "", "usr/share/broken/": "", "usr/share/broken/first": "1\n"}
    made.add("broken", depend=["a"], files={**tree, "usr/share/broken/d/": "", "usr/share/broken/d/inner": "2\n",
                                             "usr/share/broken/d": "3\n"})  # fmt: skip
    return made


@pytest.fixture
def arch_root(tmp_path: Path, repo: Repo) -> Path:
    """A root bootstrapped by the builder's code from the test repository, with `a` (so b and c)."""
    root = tmp_path / "root"
    build_root(root, repo.recipe("a"), tmp_path / "cache")
    (root / "etc/os-release").write_text('NAME="Arch Linux"\nID=arch\n')
    return root


def session(root: Path, repo: Repo, cache: Path) -> Alpm:
    """The builder's libalpm options on an existing root, the package cache outside it."""
    return Alpm(repo.recipe().options(root, cache))


# --- libalpm through pyalpm ------------------------------------------------------------------------


def test_a_dependency_chain_is_resolved_into_an_empty_root(tmp_path: Path, repo: Repo) -> None:
    stream = io.StringIO()
    events = JsonEvents(stream)  # the builder's --json display, fed by libalpm's callbacks
    root = tmp_path / "root"
    count = build_root(
        root, repo.recipe("a"), tmp_path / "cache", lambda note: events.stage_progress("bootstrap", note)
    )
    assert count == 3
    alpm = session(root, repo, tmp_path / "cache")
    assert alpm.installed() == {"a": "1.0-1", "b": "1.0-1", "c": "1.0-1"}
    local = alpm.handle.get_localdb()
    reasons = {name: local.get_pkg(name).reason for name in "abc"}
    assert reasons == {"a": pyalpm.PKG_REASON_EXPLICIT, "b": pyalpm.PKG_REASON_DEPEND, "c": pyalpm.PKG_REASON_DEPEND}
    assert (root / "usr/share/c/c.txt").read_text() == "c 1.0-1\n"
    notes = [json.loads(line)["note"] for line in stream.getvalue().splitlines()]
    installing = [note for note in notes if note.startswith("installing ")]
    assert installing == ["installing c (1/3)", "installing b (2/3)", "installing a (3/3)"], "dependencies first"
    assert "downloading a-1.0-1-x86_64.pkg.tar.gz" in notes
    # The image's pacman.conf leads back to the same repository, as the daemon reads it.
    options = read_pacman_conf(root)
    assert [(r.name, r.servers) for r in options.repositories] == [("test", (f"file://{repo.directory}/test",))]
    assert not (root / "var/lib/pacman/db.lck").exists()


def test_conflicting_packages_are_refused_naming_both_and_change_nothing(
    tmp_path: Path, repo: Repo, arch_root: Path
) -> None:
    alpm = session(arch_root, repo, tmp_path / "cache")
    before = tree_digest(arch_root)
    with pytest.raises(PackageConflicts) as together:
        alpm.install(["x", "y"])
    assert together.value.pairs == [("x", "y")] and "x conflicts with y" in str(together.value)
    alpm.install(["y"])
    after_y = tree_digest(arch_root)
    assert after_y != before
    with pytest.raises(PackageConflicts) as installed:
        alpm.install(["x"])
    assert installed.value.pairs == [("x", "y")], "x, to install, conflicts with y, installed"
    assert tree_digest(arch_root) == after_y
    assert "x" not in alpm.installed()


def test_a_missing_dependency_and_an_unknown_package_are_named(tmp_path: Path, repo: Repo, arch_root: Path) -> None:
    alpm = session(arch_root, repo, tmp_path / "cache")
    with pytest.raises(UnsatisfiedDependencies) as missing:
        alpm.plan(["m"])
    assert missing.value.missing == [("m", "nosuch", None)] and "m needs nosuch" in str(missing.value)
    with pytest.raises(UnknownTargets) as unknown:
        alpm.plan(["a", "nothere", "alsonot"])
    assert unknown.value.names == ["nothere", "alsonot"]
    assert str(unknown.value) == "no package named nothere, alsonot in the repositories (test)"


def test_a_file_conflict_leaves_the_root_byte_identical(tmp_path: Path, repo: Repo, arch_root: Path) -> None:
    (arch_root / "etc/existing.conf").write_text("the admin's, owned by no package\n")
    before = tree_digest(arch_root)
    alpm = session(arch_root, repo, tmp_path / "cache")
    with pytest.raises(FileConflicts) as refused:
        alpm.install(["f"])
    assert refused.value.conflicts == [("f", "/etc/existing.conf", None)]
    assert "/etc/existing.conf of f exists on disk" in str(refused.value)
    assert tree_digest(arch_root) == before, "nothing was written: no file, no database entry, no lock, no log"
    assert (arch_root / "etc/existing.conf").read_text() == "the admin's, owned by no package\n"


def test_a_transaction_that_fails_while_extracting_names_the_package_and_the_builder_keeps_no_root(
    tmp_path: Path, repo: Repo, arch_root: Path
) -> None:
    # libalpm itself leaves such a root part way (what it had extracted stays)...
    alpm = session(arch_root, repo, tmp_path / "cache")
    with pytest.raises(AlpmError, match=r"the package transaction failed: .*problem occurred while installing broken"):
        alpm.install(["broken"])
    assert (arch_root / "usr/share/broken/first").exists()
    # ...so the builder removes a root it was making.
    target = tmp_path / "new-root"
    with pytest.raises(AlpmError, match="broken"):
        build_root(target, repo.recipe("broken"), tmp_path / "cache")
    assert not target.exists()


def test_an_unreachable_mirror_is_refused_naming_the_repository_and_leaves_no_root(tmp_path: Path) -> None:
    target = tmp_path / "root"
    recipe = ArchRecipe(f"file://{tmp_path}/nowhere/$repo/os/$arch", ("core",), ("base",), keyring=None)
    with pytest.raises(AlpmError) as refused:
        build_root(target, recipe, tmp_path / "cache")
    message = str(refused.value)
    assert message.startswith(f"cannot fetch the package database of core (file://{tmp_path}/nowhere/core/os/x86_64)")
    assert "core.db" in message and "mirror URL" in message
    assert not target.exists()


# --- the update op on an Arch root ----------------------------------------------------------------


def plan_update(target: Target, **params: object) -> tuple[Plan, Step]:
    step = step_from(target, "update", params, "")
    return step.op.plan(target, step.params), step


def test_update_plans_libalpms_upgrade_applies_it_and_is_then_unchanged(repo: Repo, arch_root: Path) -> None:
    target = Target(arch_root)
    backend = backend_for(target)
    assert isinstance(backend, PacmanBackend)
    repo.add("c", "1.1-1")
    plan, _ = plan_update(target)
    assert plan.actions == (), "a plan reads the databases as they are: the new c is not in them yet"
    backend.refresh()  # as a timer would; what the mirror published is now known
    before = tree_digest(arch_root)
    plan, step = plan_update(target)
    assert plan.actions == (
        RefreshLists("pacman"),
        PackageTransaction(False, (), False, "pacman"),
        PackageStep(Transition("c", "upgrade", "1.0-1", "1.1-1")),
    )
    assert [a.describe().detail for a in plan.actions][:2] == [
        "pacman -Sy (a plan reads the lists as they were)",
        "pacman -Su",
    ]
    assert tree_digest(arch_root) == before, "planning wrote nothing"
    lines: list[str] = []
    execute(plan, target, lines.append)
    assert "upgrade c 1.0-1 -> 1.1-1" in lines and "1 package(s) changed" in lines
    assert (arch_root / "usr/share/c/c.txt").read_text() == "c 1.1-1\n"
    assert step.op.verify(target, step.params) == []
    assert plan_update(target)[0].actions == ()


def test_update_installs_named_packages_removes_orphans_and_refuses_security_only(repo: Repo, arch_root: Path) -> None:
    target = Target(arch_root)
    with pytest.raises(InvalidParams) as refused:
        step_from(target, "update", {"security_only": True}, "")
    assert str(refused.value).startswith("params.security_only: pacman hosts have no separate security updates")
    plan, _ = plan_update(target, packages=["tool"], refresh=False)
    lines: list[str] = []
    execute(plan, target, lines.append)
    assert "install tool (none) -> 1.0-1" in lines
    # a is no longer wanted for itself: a, and b and c that only it needed, are orphans to remove.
    alpm = PacmanBackend(target).alpm
    alpm.handle.set_pkgreason(alpm.handle.get_localdb().get_pkg("a"), pyalpm.PKG_REASON_DEPEND)
    plan, step = plan_update(target, autoremove=True, refresh=False)
    removals = [a.transition for a in plan.actions if isinstance(a, PackageStep)]
    assert removals == [Transition(name, "remove", "1.0-1", None) for name in "abc"]
    execute(plan, target, lines.append)
    assert PacmanBackend(target).installed() == {"tool": "1.0-1"}
    assert step.op.verify(target, step.params) == []


def test_the_daemons_job_snapshots_the_root_before_the_transaction(
    tmp_path: Path, repo: Repo, arch_root: Path, rastosd: Rastosd
) -> None:
    root = rastosd.scratch.root
    subprocess.run(["cp", "-a", f"{arch_root}/.", root], check=True)
    repo.add("c", "1.1-1")
    PacmanBackend(Target(root)).refresh()  # the databases now offer c 1.1-1: the plan has an upgrade
    path = rastosd.call(MANAGER, "Apply", "sst", "update", json.dumps({}), "0")[0]
    assert rastosd.wait_job(path) == "done", rastosd.log_text()
    result = json.loads(rastosd.get(JOB, "Result", path))
    assert result["steps"][0]["state"] == "changed"
    assert "upgrade c 1.0-1 -> 1.1-1" in json.dumps(result)
    pre = rastosd.scratch.snapshots / str(result["snapshots"]["pre"]) / "snapshot"
    assert btrfsutil.get_subvolume_read_only(pre)
    assert (pre / "var/lib/pacman/local/c-1.0-1/desc").is_file(), "the pre snapshot holds c as it was"
    assert (pre / "usr/share/c/c.txt").read_text() == "c 1.0-1\n"
    assert (root / "var/lib/pacman/local/c-1.1-1/desc").is_file()
    assert not (root / "var/lib/pacman/local/c-1.0-1").exists()


# --- pacman.conf, profiles and the builder's refusals ---------------------------------------------------


def test_pacman_conf_is_read_inside_the_root_as_pacman_reads_it(tmp_path: Path) -> None:
    assert (rastos_alpm.SIG_PACKAGE, rastos_alpm.SIG_DATABASE_OPTIONAL) == (
        pyalpm.SIG_PACKAGE,
        pyalpm.SIG_DATABASE_OPTIONAL,
    )
    root = tmp_path / "root"
    (root / "etc/pacman.d/mirrors").mkdir(parents=True)
    (root / "etc/pacman.d/mirrors/10-near").write_text("Server = https://near.example/$repo/os/$arch\n")
    (root / "etc/pacman.d/mirrors/20-far").write_text("# a comment\nServer = https://far.example/$repo/$arch\n")
    (root / "etc/pacman.conf").write_text(
        "[options]\nArchitecture = x86_64\nSigLevel = Required DatabaseOptional\nIgnorePkg = linux linux-headers\n"
        "DBPath = /var/lib/pacman/\n\n[core]\nInclude = /etc/pacman.d/mirrors/*\n\n"
        "[local]\nSigLevel = PackageOptional\nServer = file:///srv/$repo\n"
    )
    options = read_pacman_conf(root)
    core, local = options.repositories
    assert core.servers == ("https://near.example/core/os/x86_64", "https://far.example/core/x86_64")
    assert core.siglevel == pyalpm.SIG_PACKAGE | pyalpm.SIG_DATABASE | pyalpm.SIG_DATABASE_OPTIONAL
    assert local.servers == ("file:///srv/local",)
    assert local.siglevel == core.siglevel | pyalpm.SIG_PACKAGE_OPTIONAL
    assert options.ignore == ("linux", "linux-headers") and options.dbpath == root / "var/lib/pacman"
    assert parse_siglevel(["Never"], core.siglevel) & pyalpm.SIG_PACKAGE == 0
    with pytest.raises(RastosError, match="unknown SigLevel word 'Sometimes'"):
        parse_siglevel(["Sometimes"], 0)


ARCH_PROFILE = '[distribution]\nname = "arch"\n'


def test_an_arch_profile_resolves_arch_defaults_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "arch.toml"
    path.write_text(ARCH_PROFILE + '[packages]\ninclude = ["htop"]\n')
    profile = load_profile(path)
    d = profile.distribution
    assert (d.suite, d.components, d.repositories) == ("", (), ("core", "extra"))
    assert d.mirror == "https://geo.mirror.pkgbuild.com/$repo/os/$arch" and profile.kernel.package == "linux"
    assert profile_from_dict(json.loads(json.dumps(profile_to_dict(profile)))) == profile
    recipe = ArchRecipe.of(profile)
    assert recipe.architecture == "x86_64" and {"base", "linux", "pyalpm", "htop"} <= set(recipe.packages)
    assert recipe.packages == tuple(package_set(profile))


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('suite = "trixie"\n', "distribution.suite", "rolling release and has no suites"),
        ('components = ["main"]\n', "distribution.components", "Arch's are distribution.repositories"),
        ('mirror = "https://mirror.example/archlinux"\n', "distribution.mirror", "pacman Server URL with $repo"),
        ("repositories = []\n", "distribution.repositories", "must not be empty"),
        ('repositories = ["core extra"]\n', "distribution.repositories", "not a valid repository name"),
        ('[kernel]\ninitramfs = "generic"\n', "kernel.initramfs", "'generic' is Debian's"),
    ],
)
def test_an_arch_profile_with_a_debian_key_is_refused_naming_it(
    tmp_path: Path, toml: str, key: str, reason: str
) -> None:
    path = tmp_path / "arch.toml"
    path.write_text(ARCH_PROFILE + toml)
    with pytest.raises(ProfileError) as refused:
        load_profile(path)
    assert str(refused.value).startswith(f"{path}: key '{key}': "), refused.value
    assert reason in str(refused.value)


def test_an_arch_profile_cannot_extend_a_debian_one(tmp_path: Path) -> None:
    path = tmp_path / "arch.toml"
    path.write_text('extends = "base"\n' + ARCH_PROFILE)
    with pytest.raises(ProfileError) as refused:
        load_profile(path)
    assert "base.toml: key 'distribution.suite'" in str(refused.value)
    assert refused.value.hint == "base.toml sets it for another distribution than arch.toml chooses: do not extend it"


def test_an_arch_build_needs_a_keyring_unless_the_profile_checks_no_signatures(tmp_path: Path) -> None:
    with pytest.raises(RastosError, match=r"pacman keyring at .*nokeys") as refused:
        check_arch_host(tmp_path / "nokeys")
    assert refused.value.hint is not None and "--populate archlinux" in refused.value.hint
    path = tmp_path / "arch.toml"
    path.write_text(ARCH_PROFILE)
    assert ArchRecipe.of(load_profile(path)).keyring == Path("/etc/pacman.d/gnupg")
    path.write_text(ARCH_PROFILE + f'keyring = "{tmp_path}/keys"\n')
    with pytest.raises(RastosError, match=rf"pacman keyring at {tmp_path}/keys, .*\(distribution.keyring\)") as own:
        check_arch_host(ArchRecipe.of(load_profile(path)).keyring)
    assert own.value.hint is not None and f"pacman-key --gpgdir {tmp_path}/keys --init" in own.value.hint
    path.write_text(ARCH_PROFILE + "check_signatures = false\n")
    recipe = ArchRecipe.of(load_profile(path))
    assert recipe.keyring is None
    check_arch_host(recipe.keyring)  # no keyring asked for: nothing to refuse
    assert ArchRecipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ("[distribution]\ncheck_signatures = false\n", "distribution.check_signatures", "Arch's; mmdebstrap"),
        ('[distribution]\nkeyring = "/srv/keys"\n', "distribution.keyring", "Arch's; mmdebstrap"),
        ('[packages]\ninclude = ["htop", "python-typing_extensions"]\n', "packages.include",
         "python-typing_extensions: Debian's package names hold no _ or @"),
    ],
)  # fmt: skip
def test_a_debian_profile_with_an_arch_value_is_refused_naming_it(
    tmp_path: Path, toml: str, key: str, reason: str
) -> None:
    path = tmp_path / "debian.toml"
    path.write_text('extends = "minimal"\n' + toml)
    with pytest.raises(ProfileError) as refused:
        load_profile(path)
    assert str(refused.value).startswith(f"{path}: key '{key}': "), refused.value
    assert reason in str(refused.value)


def test_arch_package_names_may_hold_underscores(tmp_path: Path) -> None:
    arch = tmp_path / "arch.toml"
    arch.write_text(ARCH_PROFILE + '[packages]\ninclude = ["python-typing_extensions"]\n')
    assert "python-typing_extensions" in ArchRecipe.of(load_profile(arch)).packages


SCRIPTLET = """post_install() {
    [ -c /dev/null ] && [ -r /proc/self/status ] && [ -d /sys/kernel ] &&
        echo "saw /dev, /proc, /sys" > /var/lib/scriptlet
}
"""
HOOK = """[Trigger]
Operation = Install
Type = Package
Target = shell

[Action]
When = PostTransaction
Exec = /bin/sh -c 'read -r first < /proc/1/status; echo "hook: $first" > /var/lib/hook'
"""


@pytest.fixture
def shell_repo(repo: Repo) -> Repo:
    """A package with a shell (the host's static busybox), a scriptlet and a hook: what libalpm runs
    chrooted into the new root, as Arch's packages need it."""
    busybox = Path("/bin/busybox")
    assert busybox.is_file(), "./setup-host installs busybox-static"
    files: dict[str, str | bytes | Link] = {
        "usr/": "", "usr/bin/": "", "usr/bin/busybox": busybox.read_bytes(), "usr/bin/sh": Link("busybox"),
        "bin": Link("usr/bin"), "var/": "", "var/lib/": "", "usr/share/": "", "usr/share/libalpm/": "",
        "usr/share/libalpm/hooks/": "", "usr/share/libalpm/hooks/50-test.hook": HOOK, ".INSTALL": SCRIPTLET,
    }  # fmt: skip
    repo.add("shell", files=files)
    return repo


def test_scriptlets_and_hooks_run_with_api_file_systems_that_vanish_with_the_transaction(
    tmp_path: Path, shell_repo: Repo
) -> None:
    target = tmp_path / "root"
    notes: list[str] = []
    count = build_root_isolated(target, shell_repo.recipe("shell"), tmp_path / "cache", notes.append)
    assert count == 1
    assert (target / "var/lib/scriptlet").read_text() == "saw /dev, /proc, /sys\n"
    # The hook ran in a PID namespace of the transaction's own: its PID 1 is the transaction.
    assert (target / "var/lib/hook").read_text().startswith("hook: Name:\tpython")
    assert "installing shell (1/1)" in notes
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(target) not in mounts, "the mounts lived in the transaction's namespace only"
    assert sorted(p.name for p in (target / "dev").iterdir()) == [], "the host's /dev was bound, not copied"


def test_a_failed_isolated_transaction_removes_the_root_and_not_the_hosts_dev(tmp_path: Path, repo: Repo) -> None:
    target = tmp_path / "root"
    with pytest.raises(
        RastosError, match=r"the package transaction failed: .*problem occurred while installing broken"
    ):
        build_root_isolated(target, repo.recipe("broken"), tmp_path / "cache")
    assert not target.exists()
    assert Path("/dev/null").is_char_device(), "the root was removed where /dev was not bound into it"


def test_signatures_are_checked_against_the_keyring_and_a_bad_one_is_refused_by_name(
    tmp_path: Path, repo: Repo, keys: Keys
) -> None:
    repo.add("signed", signer=keys.signer)
    repo.add("unsigned")
    repo.add("forged", signer=keys.stranger)
    checked = dataclasses.replace(repo.recipe(), keyring=keys.keyring)
    root = tmp_path / "root"
    count = build_root(root, dataclasses.replace(checked, packages=("signed",)), tmp_path / "cache")
    assert count == 1 and (root / "usr/share/signed/signed.txt").is_file()
    assert "SigLevel = Required DatabaseOptional" in (root / "etc/pacman.conf").read_text()
    stranger = Keys.key_id(keys.stranger)
    for name, why in (
        ("unsigned", "no signature for unsigned-1.0-1-x86_64 in the repository"),
        ("forged", f"signed by a key the keyring does not hold: forged-1.0-1 (key {stranger})"),
    ):
        target = tmp_path / name
        with pytest.raises(AlpmError) as refused:
            build_root(target, dataclasses.replace(checked, packages=(name,)), tmp_path / "cache")
        assert name in str(refused.value) and why in str(refused.value), refused.value
        assert not target.exists()


INTERRUPTED_BUILD = """
import sys
from pathlib import Path
from imagebuilder.stages.bootstrap_arch import ArchRecipe, build_root_isolated
build_root_isolated(Path(sys.argv[2]), ArchRecipe.from_json(sys.argv[1]), Path(sys.argv[3]))
"""


def test_ctrl_c_during_a_scriptlet_leaves_no_root_no_mount_and_no_process(tmp_path: Path, shell_repo: Repo) -> None:
    files: dict[str, str | bytes | Link] = {
        ".INSTALL": "post_install() {\n    echo started > /var/lib/slow-started\n    sleep 3600\n}\n"
    }
    shell_repo.add("slow", files=files, depend=["shell"])
    target = tmp_path / "root"
    argv = [
        sys.executable,
        "-c",
        INTERRUPTED_BUILD,
        shell_repo.recipe("slow").to_json(),
        str(target),
        str(tmp_path / "cache"),
    ]
    # Started from a background job or nohup, this test inherits SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: the child gets Ctrl-C's default back, as from a terminal.
    build = subprocess.Popen(
        argv,
        cwd=CHECKOUT,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (target / "var/lib/slow-started").exists():
        assert build.poll() is None and time.monotonic() < deadline, "the scriptlet started"
        time.sleep(0.1)
    build.send_signal(signal.SIGINT)
    assert build.wait(timeout=90) != 0
    assert not target.exists(), "the root the transaction was making is gone"
    assert str(target) not in Path("/proc/self/mountinfo").read_text()
    sleepers = subprocess.run(["pgrep", "-f", "sleep 3600"], capture_output=True, text=True).stdout
    assert sleepers == "", "the scriptlet ended with the transaction's PID namespace"
