"""Stage `bootstrap` for `distribution.name = "arch"`: the root from libalpm, cached like Debian's.

What pacstrap does, in process (rastos/alpm.py): an empty root with pacman's directories, the
repositories' databases fetched from the profile's mirror, one libalpm transaction that installs the
package set and everything it depends on, each package's signature checked against the build host's
pacman keyring. Then /etc/pacman.conf and /etc/pacman.d/mirrorlist are written, so the image's daemon
upgrades from the same repositories. Downloaded packages are kept under the cache directory and reused.

The cache key covers what shapes the root (mirror, repositories, package set, architecture, libalpm's
version, this recipe's version), as for Debian (stages/bootstrap.py, whose cache helpers this uses).
A bootstrap that fails leaves no root behind: libalpm refuses a conflict, a missing dependency, a bad
signature or a conflicting file before it writes anything, and a root a failed extraction left part
way is removed.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebuilder.context import BuildContext
from imagebuilder.files import write_file
from imagebuilder.profile.model import Profile
from imagebuilder.stages.bootstrap import _evict, _remove_stale_partials, cache_key, describe_change
from rastos.alpm import SIG_REQUIRED, Alpm, AlpmOptions, Progress, Repository, pyalpm_module
from rastos.errors import RastosError
from rastos.pacman_conf import ARCHITECTURES, render_mirrorlist, render_pacman_conf
from rastos.process import run

RECIPE_VERSION = 1
# pacman-key's keyring on the build host: `pacman-key --init && pacman-key --populate archlinux`.
HOST_KEYRING = Path("/etc/pacman.d/gnupg")
# What every Arch image has (the `base` meta package brings systemd, pacman, the keyring, iproute2, ...)
# and the daemon's Python dependencies, from Arch's repositories as Debian's come from Debian's. No
# mirror is reachable where this was written: an unknown name stops the bootstrap and is named.
BASE_PACKAGES = ("base", "btrfs-progs", "zstd")
DAEMON_PACKAGES = (
    "python",
    "pyalpm",  # the update op's libalpm
    "python-sdbus",
    "python-systemd",
    "python-btrfsutil",
    "python-pyroute2",
    "python-aiohttp",
    "python-cryptography",
    "bubblewrap",
)
# pacman.conf's words for the signature checks the bootstrap made.
SIGLEVEL_VERIFIED, SIGLEVEL_UNVERIFIED = "Required DatabaseOptional", "Never"


@dataclass(frozen=True)
class ArchRecipe:
    """What an Arch root is made from."""

    mirror: str  # a pacman Server URL: $repo and $arch are replaced per repository
    repositories: tuple[str, ...]
    packages: tuple[str, ...]
    architecture: str = "x86_64"
    # The keyring that signatures are checked against; None checks none (a local repository the
    # caller made and trusts, as the tests do).
    keyring: Path | None = HOST_KEYRING

    @classmethod
    def of(cls, profile: Profile) -> ArchRecipe:
        d = profile.distribution
        return cls(d.mirror, d.repositories, tuple(package_set(profile)), ARCHITECTURES[d.architecture])

    def options(self, root: Path, cachedir: Path) -> AlpmOptions:
        siglevel = SIG_REQUIRED if self.keyring is not None else 0
        repositories = tuple(
            Repository(name, (self.mirror.replace("$repo", name).replace("$arch", self.architecture),), siglevel)
            for name in self.repositories
        )
        return AlpmOptions(
            root=root,
            repositories=repositories,
            architecture=self.architecture,
            cachedir=cachedir,
            gpgdir=self.keyring,
        )


def package_set(profile: Profile) -> list[str]:
    extra = ["sudo"] if any(u.sudo for u in profile.users) else []
    wanted = [*BASE_PACKAGES, *DAEMON_PACKAGES, profile.kernel.package, *profile.packages.include, *extra]
    return sorted(set(wanted))


def check_arch_host(keyring: Path = HOST_KEYRING) -> None:
    """Refuses before any work when the host cannot bootstrap Arch: no pyalpm, or no pacman keyring."""
    pyalpm_module()
    keys = any((keyring / name).is_file() for name in ("pubring.gpg", "pubring.kbx"))
    if not keys or not (keyring / "trustdb.gpg").is_file():
        raise RastosError(
            f"Arch Linux images need Arch's signing keys in a pacman keyring at {keyring}, and there is none",
            hint="apt-get install archlinux-keyring pacman-package-manager && pacman-key --init && "
            "pacman-key --populate archlinux (see docs/arch.md)",
        )


def bootstrap_inputs(recipe: ArchRecipe) -> dict[str, Any]:
    return {
        "recipe": RECIPE_VERSION,
        "tool": f"libalpm {pyalpm_module().alpmversion()}",
        "distribution": "arch",
        "mirror": recipe.mirror,
        "repositories": list(recipe.repositories),
        "architecture": recipe.architecture,
        "packages": list(recipe.packages),
    }


def build_root(target: Path, recipe: ArchRecipe, cachedir: Path, progress: Progress | None = None) -> int:
    """A new root at `target` with the recipe's packages and their dependencies, as one libalpm
    transaction; returns how many packages it holds. On any failure `target` is removed."""
    if target.exists():
        raise RastosError(f"{target} exists: an Arch root is only made in an empty place")
    try:
        for directory in ("var/lib/pacman", "var/log", "etc/pacman.d"):
            (target / directory).mkdir(parents=True)
        cachedir.mkdir(parents=True, exist_ok=True)
        alpm = Alpm(recipe.options(target, cachedir), progress)
        alpm.refresh()
        alpm.install(recipe.packages)
        siglevel = SIGLEVEL_VERIFIED if recipe.keyring is not None else SIGLEVEL_UNVERIFIED
        conf = render_pacman_conf(recipe.architecture, list(recipe.repositories), siglevel)
        write_file(target / "etc/pacman.conf", conf)
        write_file(target / "etc/pacman.d/mirrorlist", render_mirrorlist(recipe.mirror))
        return len(alpm.installed())
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def bootstrap_arch(ctx: BuildContext) -> str:
    cache = ctx.cache_dir / "bootstrap"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _bootstrap_locked(ctx, cache)


def _bootstrap_locked(ctx: BuildContext, cache: Path) -> str:
    _remove_stale_partials(cache)
    recipe = ArchRecipe.of(ctx.profile)
    inputs = bootstrap_inputs(recipe)
    key = ctx.bootstrap_key = cache_key(inputs)
    entry = cache / key
    last_file = cache / f"last-{ctx.profile.name}.json"
    if (entry / "inputs.json").is_file() and not ctx.refresh_bootstrap:
        note = f"reused cache {key}"
        (entry / "inputs.json").touch()
    else:
        previous = json.loads(last_file.read_text()) if last_file.is_file() else None
        reason = "--refresh-bootstrap" if ctx.refresh_bootstrap else describe_change(previous, inputs)
        count = _build_entry(ctx, entry, recipe, inputs)
        note = f"rebuilt ({reason}); {count} packages"
        _evict(cache, keep=entry)
    last_file.write_text(json.dumps(inputs, indent=1, sort_keys=True))
    ctx.fs_tree.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=auto", entry / "root", ctx.rootfs])
    return note


def _build_entry(ctx: BuildContext, entry: Path, recipe: ArchRecipe, inputs: dict[str, Any]) -> int:
    partial = entry.with_name(f"{entry.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(entry, ignore_errors=True)
    partial.mkdir()
    try:
        count = build_root(partial / "root", recipe, ctx.cache_dir / "pacman" / recipe.architecture, ctx.progress)
        (partial / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
        partial.rename(entry)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count
