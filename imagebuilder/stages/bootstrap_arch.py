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

libalpm runs the packages' install scriptlets and hooks (systemd-sysusers, depmod, mkinitcpio, ...)
chrooted into the new root, and they expect /proc, /sys and /dev there, as pacstrap mounts them. The
transaction therefore runs in a child process with mount and PID namespaces of its own: the mounts
exist only for it, and whatever a scriptlet leaves running (gpg-agent) ends with it. The child speaks
to the build through `@rastos {json}` lines on its stdout: progress notes, or the error that ended it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import chroot_run
from imagebuilder.context import BuildContext, KernelInfo
from imagebuilder.files import write_file
from imagebuilder.profile.model import InitramfsModules, Profile
from imagebuilder.stages.bootstrap import cached_root
from rastos.alpm import SIG_REQUIRED, Alpm, AlpmOptions, Repository, pyalpm_module
from rastos.alpm_feedback import Progress
from rastos.errors import CommandError, RastosError
from rastos.pacman_conf import ARCHITECTURES, render_mirrorlist, render_pacman_conf
from rastos.process import run

RECIPE_VERSION = 2  # 2: scriptlets and hooks with /proc, /sys, /dev; depmod
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
        keyring = Path(d.keyring) if d.check_signatures else None
        return cls(d.mirror, d.repositories, tuple(package_set(profile)), ARCHITECTURES[d.architecture], keyring)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "keyring": None if self.keyring is None else str(self.keyring)})

    @classmethod
    def from_json(cls, text: str) -> ArchRecipe:
        fields = json.loads(text)
        keyring = None if fields["keyring"] is None else Path(fields["keyring"])
        return cls(fields["mirror"], tuple(fields["repositories"]), tuple(fields["packages"]),
                   fields["architecture"], keyring)  # fmt: skip

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
    if profile.kernel.initramfs is InitramfsModules.virtio:
        extra.append("busybox")  # the shell and tools of rastOS's own initrd (stages/initrd.py)
    wanted = [*BASE_PACKAGES, *DAEMON_PACKAGES, profile.kernel.package, *profile.packages.include, *extra]
    return sorted(set(wanted))


def check_arch_host(keyring: Path | None = HOST_KEYRING) -> None:
    """Refuses before any work when the host cannot bootstrap Arch: no pyalpm, or no pacman keyring
    (None: the profile checks no signatures)."""
    pyalpm_module()
    if keyring is None:
        return
    keys = any((keyring / name).is_file() for name in ("pubring.gpg", "pubring.kbx"))
    if not keys or not (keyring / "trustdb.gpg").is_file():
        gpgdir = "" if keyring == HOST_KEYRING else f" --gpgdir {keyring}"
        raise RastosError(
            f"Arch Linux images need Arch's signing keys in a pacman keyring at {keyring}, and there is none "
            "(distribution.keyring)",
            hint=f"apt-get install archlinux-keyring pacman-package-manager && pacman-key{gpgdir} --init && "
            f"pacman-key{gpgdir} --populate archlinux (see docs/arch.md)",
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
        "signatures": recipe.keyring is not None,  # the image's pacman.conf asks for them, or not
    }


def build_root(target: Path, recipe: ArchRecipe, cachedir: Path, progress: Progress | None = None) -> int:
    """A new root at `target` with the recipe's packages and their dependencies, as one libalpm
    transaction in this process; returns how many packages it holds. On any failure `target` is
    removed. Scriptlets run without /proc, /sys and /dev here: the image build uses build_root_isolated."""
    _require_absent(target)
    try:
        return _populate(target, recipe, cachedir, progress)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _require_absent(target: Path) -> None:
    if target.exists():
        raise RastosError(f"{target} exists: an Arch root is only made in an empty place")


def _populate(target: Path, recipe: ArchRecipe, cachedir: Path, progress: Progress | None) -> int:
    for directory in ("var/lib/pacman", "var/log", "etc/pacman.d"):
        (target / directory).mkdir(parents=True, exist_ok=True)
    cachedir.mkdir(parents=True, exist_ok=True)
    alpm = Alpm(recipe.options(target, cachedir), progress)
    alpm.refresh()
    alpm.install(recipe.packages)
    siglevel = SIGLEVEL_VERIFIED if recipe.keyring is not None else SIGLEVEL_UNVERIFIED
    conf = render_pacman_conf(recipe.architecture, list(recipe.repositories), siglevel)
    write_file(target / "etc/pacman.conf", conf)
    write_file(target / "etc/pacman.d/mirrorlist", render_mirrorlist(recipe.mirror))
    return len(alpm.installed())


# The API file systems a scriptlet or hook finds in the new root, as pacstrap mounts them.
API_MOUNTS = (
    ("proc", ["-t", "proc", "-o", "nosuid,noexec,nodev", "proc"]),
    ("sys", ["-t", "sysfs", "-o", "nosuid,noexec,nodev,ro", "sys"]),
    ("dev", ["--rbind", "/dev"]),
    ("run", ["-t", "tmpfs", "-o", "nosuid,nodev,mode=0755", "run"]),
    ("tmp", ["-t", "tmpfs", "-o", "mode=1777,strictatime,nodev,nosuid", "tmp"]),
)
MESSAGE = "@rastos "  # how the child's lines for the build begin; anything else is only logged


def build_root_isolated(target: Path, recipe: ArchRecipe, cachedir: Path, progress: Progress | None = None) -> int:
    """build_root with the API file systems mounted for scriptlets and hooks, in namespaces that end
    with the transaction. `target` is removed here, in the build's own namespace (where nothing is
    mounted under it), when the transaction fails."""
    _require_absent(target)
    outcome: dict[str, Any] = {}

    def on_line(line: str) -> None:
        if not line.startswith(MESSAGE):
            return
        message = json.loads(line.removeprefix(MESSAGE))
        if "note" in message and progress is not None:
            progress(message["note"])
        outcome.update(message)

    child = [sys.executable, "-m", "imagebuilder.stages.bootstrap_arch", recipe.to_json(), str(target), str(cachedir)]
    argv = ["unshare", "--mount", "--pid", "--propagation", "private", "--fork", "--kill-child=SIGKILL", "--", *child]
    try:
        # The child runs this checkout's code, whatever the directory it is started from.
        run(argv, on_line=on_line, env={"PYTHONPATH": str(CHECKOUT)})
    except CommandError as error:
        shutil.rmtree(target, ignore_errors=True)
        if "error" in outcome:
            raise RastosError(outcome["error"], hint=outcome.get("hint")) from None
        raise RastosError(f"the libalpm transaction stopped without a reason:\n{error.output_tail}") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return int(outcome["packages"])


def _transaction_child(recipe_json: str, target: Path, cachedir: Path) -> int:
    """In the child's namespaces: mount, then transact; the parent reads the outcome from stdout."""

    def say(**message: Any) -> None:
        print(MESSAGE + json.dumps(message), flush=True)

    try:
        recipe = ArchRecipe.from_json(recipe_json)
        target.mkdir(parents=True)
        for directory, options in API_MOUNTS:
            (target / directory).mkdir(exist_ok=True)  # the filesystem package owns them
            run(["mount", *options, target / directory])
        say(packages=_populate(target, recipe, cachedir, lambda note: say(note=note)))
        return 0
    except RastosError as error:
        say(error=error.message, hint=error.hint)
        return 2


def find_arch_kernel(root: Path) -> KernelInfo:
    """Arch's kernel packages ship the kernel beside their modules, /usr/lib/modules/VERSION/vmlinuz,
    with the package's name in `pkgbase`; mkinitcpio's hook copies it to /boot/vmlinuz-PKGBASE."""
    modules = root / "usr/lib/modules"
    kernels = sorted(d for d in modules.iterdir() if (d / "vmlinuz").is_file()) if modules.is_dir() else []
    if len(kernels) != 1:
        found = ", ".join(k.name for k in kernels) or "none"
        raise RastosError(
            f"expected exactly one kernel (usr/lib/modules/*/vmlinuz) in the Arch root, found {found}",
            hint="kernel.package names the one kernel package an image has (default: linux)",
        )
    directory = kernels[0]
    pkgbase = (directory / "pkgbase").read_text().strip() if (directory / "pkgbase").is_file() else "linux"
    initrd = root / "boot" / f"initramfs-{pkgbase}.img"
    made = initrd if initrd.is_file() else None  # by mkinitcpio's hook, if the image has it
    return KernelInfo(version=directory.name, vmlinuz=directory / "vmlinuz", initrd=made)


def index_modules(root: Path) -> None:
    """modules.dep for each kernel that lacks it (a kernel package's hook makes it where one runs;
    rastOS's initrd reads it)."""
    for directory in sorted((root / "usr/lib/modules").glob("*/vmlinuz")):
        if not (directory.parent / "modules.dep").is_file():
            chroot_run(root, ["depmod", directory.parent.name])


def bootstrap_arch(ctx: BuildContext) -> str:
    recipe = ArchRecipe.of(ctx.profile)
    note = cached_root(ctx, bootstrap_inputs(recipe), lambda partial: _make_root(ctx, partial, recipe))
    ctx.kernel = find_arch_kernel(ctx.rootfs)
    return note


def _make_root(ctx: BuildContext, partial: Path, recipe: ArchRecipe) -> str:
    root = partial / "root"
    count = build_root_isolated(root, recipe, ctx.cache_dir / "pacman" / recipe.architecture, ctx.progress)
    index_modules(root)
    find_arch_kernel(root)  # an entry without its one kernel is no use to any build
    return f"{count} packages"


if __name__ == "__main__":
    sys.exit(_transaction_child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
