"""Stage `bootstrap`: a Debian root file system from mmdebstrap, cached under a key of its inputs.

The cache key covers everything that shapes the bootstrap result (suite, mirror, package set, docs,
initramfs drivers, mmdebstrap's version, this recipe's version), and nothing that later stages change,
so a rebuild after editing a sysctl or the daemon's code reuses it. The note says whether it was reused,
or which input changed since the last build of the same profile.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import in_private_mount_namespace
from imagebuilder.context import BuildContext, KernelInfo
from imagebuilder.profile.model import InitramfsModules, Profile
from imagebuilder.stages.hub_server import HUB_PACKAGES
from rastos.errors import CommandError, RastosError
from rastos.process import run

# Bump when the way the bootstrap is made changes, so older cache entries are not reused.
RECIPE_VERSION = 4
# Every build's files get this date where a package or a script would stamp the build's own (mmdebstrap
# and Debian's tools honour SOURCE_DATE_EPOCH), so the same packages give the same bytes: Debian's
# initramfs in /boot above all. Two versions of an image then differ where their packages differ, and
# the delta between them is that, not 12 MB of a regenerated initramfs and thousands of new dates.
SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01T00:00:00Z
KEEP_ENTRIES = 6  # one per shipped profile: switching between them never rebuilds

# What every image needs whatever its profile says: init, the boot loader and its boot counting
# (systemd-boot provides systemd-bless-boot), btrfs tools, and the daemon's Python dependencies,
# all from the distribution (no pip inside an image).
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "initramfs-tools",
    "zstd",
    "systemd-boot",
    "systemd-boot-efi",
    "btrfs-progs",
)
DAEMON_PACKAGES = (
    "python3",
    "python3-sdbus",
    "python3-systemd",
    "python3-btrfsutil",
    "python3-pyroute2",
    "python3-aiohttp",  # the link to the hub
    "python3-cryptography",  # the certs op's CA and certificates
    # A dry run's shadow root runs the target's own programs (sshd -t, nft -c, useradd) in it.
    "bubblewrap",
)

# Drivers a QEMU guest needs to reach its btrfs root (virtio-blk or virtio-scsi, behind PCI).
VIRTIO_INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "btrfs")
# Loaded by every initramfs, not only included: systemd's boot counting reads EFI variables through
# efivarfs in its generators, before anything else would load the module (see stages/initrd.py);
# overlay serves read-only snapshot boots (the script below).
EARLY_MODULES = ("efivarfs", "overlay")
INITRAMFS_OVERLAY_SCRIPT = CHECKOUT / "imagebuilder" / "initrd" / "initramfs-tools-overlay"

INITRD_FOR_EVERY_KERNEL = (
    'chroot "$1" sh -ec \'for dir in /lib/modules/*; do version=${dir##*/}; '
    '[ -e /boot/initrd.img-$version ] || update-initramfs -c -k "$version"; done\''
)

DOCS_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)


def package_set(profile: Profile) -> list[str]:
    extra = ["sudo"] if any(u.sudo for u in profile.users) else []
    if profile.kernel.initramfs is InitramfsModules.virtio:
        extra.append("busybox-static")  # the shell and tools of rastOS's own initrd
    # A kernel built from a kernel profile comes as a package file of its own (mmdebstrap_argv).
    kernel = [] if profile.kernel.build else [profile.kernel.package]
    hub = HUB_PACKAGES if profile.hub_server.enable else ()
    wanted = [*BASE_PACKAGES, *DAEMON_PACKAGES, *kernel, *profile.packages.include, *hub, *extra]
    return sorted(set(wanted))


def mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"], capture=True).stdout.strip()


def bootstrap_inputs(profile: Profile, kernel_package: Path | None = None) -> dict[str, Any]:
    d = profile.distribution
    # The built kernel's package by its cache entry (keyed by its configuration); only when there is one,
    # so the inputs of a profile with Debian's kernel stay as they were.
    built: dict[str, Any] = {}
    if kernel_package is not None:
        built = {"kernel_package": f"{kernel_package.parent.name}/{kernel_package.name}", "kernel_initrd": 1}
    return {
        **built,
        "recipe": RECIPE_VERSION,
        "tool": mmdebstrap_version(),
        "distribution": d.name.value,
        "suite": d.suite,
        "mirror": d.mirror,
        "components": list(d.components),
        "architecture": d.architecture,
        "packages": package_set(profile),
        "docs": profile.packages.docs,
        "initramfs": profile.kernel.initramfs.value,
        # Part of the initramfs that mmdebstrap's kernel installation generates.
        "initramfs_script": hashlib.sha256(INITRAMFS_OVERLAY_SCRIPT.read_bytes()).hexdigest()[:16],
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Which inputs differ, in words: `packages: +htop -less`, `suite: bookworm -> trixie`."""
    if old is None:
        return "no earlier build of this profile"
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, list) and isinstance(after, list):
            added = [f"+{x}" for x in after if x not in before]
            removed = [f"-{x}" for x in before if x not in after]
            changes.append(f"{key}: {' '.join(added + removed)}")
        else:
            changes.append(f"{key}: {before} -> {after}")
    return "; ".join(changes) or "cache entry was removed"


def bootstrap(ctx: BuildContext) -> str:
    inputs = bootstrap_inputs(ctx.profile, ctx.kernel_package)
    note = cached_root(ctx, inputs, lambda partial: _make_root(ctx, partial, inputs))
    ctx.kernel = find_kernel(ctx.rootfs)
    return note


def cached_root(ctx: BuildContext, inputs: dict[str, Any], make: Callable[[Path], str]) -> str:
    """What the stage does for every distribution: the cache entry of `inputs` reused, or made by
    `make(PARTIAL)` (the root at PARTIAL/root; it returns a note such as "152 packages"), then the
    root copied into the build. Returns the stage's note: reused, or which input changed."""
    cache = ctx.cache_dir / "bootstrap"
    cache.mkdir(parents=True, exist_ok=True)
    # One build at a time touches the cache; others wait here rather than racing on an entry.
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_stale_partials(cache)
        key = ctx.bootstrap_key = cache_key(inputs)
        entry = cache / key
        last_file = cache / f"last-{ctx.profile.name}.json"
        if (entry / "inputs.json").is_file() and not ctx.refresh_bootstrap:
            note = f"reused cache {key}"
            (entry / "inputs.json").touch()
        else:
            previous = json.loads(last_file.read_text()) if last_file.is_file() else None
            reason = "--refresh-bootstrap" if ctx.refresh_bootstrap else describe_change(previous, inputs)
            made = _build_entry(entry, inputs, make)
            note = f"rebuilt ({reason})" + (f"; {made}" if made else "")
            _evict(cache, keep=entry)
        last_file.write_text(json.dumps(inputs, indent=1, sort_keys=True))
        ctx.rootfs.parent.mkdir(parents=True, exist_ok=True)
        # Reflinks make the copy nearly free on btrfs/XFS; elsewhere it is a plain copy.
        run(["cp", "-a", "--reflink=auto", entry / "root", ctx.rootfs])
    return note


def _build_entry(entry: Path, inputs: dict[str, Any], make: Callable[[Path], str]) -> str:
    """The entry made in ENTRY.partial and renamed when complete: a build killed part way leaves
    only a .partial, which the next build removes."""
    partial = entry.with_name(f"{entry.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(entry, ignore_errors=True)
    partial.mkdir()
    try:
        made = make(partial)
        (partial / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
        partial.rename(entry)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return made


def _make_root(ctx: BuildContext, partial: Path, inputs: dict[str, Any]) -> str:
    overlay = _write_bootstrap_overlay(partial / "overlay", ctx.profile)
    debs = ctx.cache_dir / "debs" / f"{inputs['distribution']}-{inputs['suite']}"
    debs.mkdir(parents=True, exist_ok=True)
    argv = mmdebstrap_argv(ctx.profile, partial / "root", overlay, debs, ctx.kernel_package)
    try:
        run(in_private_mount_namespace(argv), env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
    except CommandError as e:
        raise RastosError(
            f"mmdebstrap failed (exit status {e.returncode}); the last lines of its log:\n{e.output_tail}",
            hint="a package name in the profile may not exist in this suite; the full log is in build.log",
        ) from None
    shutil.rmtree(overlay)
    return ""


def _write_bootstrap_overlay(overlay: Path, profile: Profile) -> Path:
    """Files that must be in place before packages are installed (they shape the initramfs)."""
    conf = overlay / "etc/initramfs-tools/conf.d"
    conf.mkdir(parents=True)
    if profile.kernel.initramfs is InitramfsModules.virtio:
        (conf / "rastos.conf").write_text(
            "# Written by rastos-image: only the drivers listed in modules.d/rastos-vm\nMODULES=list\nCOMPRESS=zstd\n"
        )
        modules = overlay / "usr/share/initramfs-tools/modules.d"
        modules.mkdir(parents=True)
        (modules / "rastos-vm").write_text("\n".join(VIRTIO_INITRAMFS_MODULES) + "\n")
    else:
        (conf / "rastos.conf").write_text("# Written by rastos-image\nMODULES=most\nCOMPRESS=zstd\n")
    # initramfs-tools loads the modules listed in modules.d (in either mode) at init-top.
    modules = overlay / "usr/share/initramfs-tools/modules.d"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / "rastos-early").write_text("\n".join(EARLY_MODULES) + "\n")
    scripts = overlay / "usr/share/initramfs-tools/scripts/local-bottom"
    scripts.mkdir(parents=True)
    shutil.copy2(INITRAMFS_OVERLAY_SCRIPT, scripts / "rastos-overlay")
    return overlay


def mmdebstrap_argv(
    profile: Profile, target: Path, overlay: Path, debs: Path, kernel_package: Path | None = None
) -> list[str]:
    d = profile.distribution
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--architectures={d.architecture}",
        f"--components={','.join(d.components)}",
        f"--include={','.join(package_set(profile))}",
        '--aptopt=Acquire::Retries "3"',
        # Downloaded packages are kept between builds, so a changed package list only fetches the
        # difference (the recipe from mmdebstrap's manual).
        "--skip=download/empty",
        "--skip=essential/unlink",
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives/ && cp -a {shlex.quote(str(overlay))}/. "$1"/',
        f"--setup-hook=sync-in {shlex.quote(str(debs))} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(debs))}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
    ]
    if not profile.packages.docs:
        argv += [f"--dpkgopt={opt}" for opt in DOCS_EXCLUDES]
    if kernel_package is not None:
        # apt installs a package file by its path, which must be there inside the root as well:
        # mmdebstrap's own hook makes it so, and removes it afterwards.
        argv += [
            f"--include={kernel_package.resolve()}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
            # The package does not depend on initramfs-tools (Debian's kernels do), so apt may configure
            # it first, when initramfs-tools' hook is not there yet: its initrd is made here instead.
            f"--customize-hook={INITRD_FOR_EVERY_KERNEL}",
        ]
    return [*argv, d.suite, str(target), d.mirror]


def find_kernel(rootfs: Path) -> KernelInfo:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        found = ", ".join(k.name for k in kernels) or "none"
        raise RastosError(f"expected exactly one kernel in /boot of the image, found {found}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise RastosError(f"the image has kernel {version} but no initrd ({initrd.name})")
    return KernelInfo(version=version, vmlinuz=kernels[0], initrd=initrd)


def _evict(cache: Path, keep: Path) -> None:
    entries = [p for p in cache.iterdir() if (p / "inputs.json").is_file() and p != keep]
    entries.sort(key=lambda p: (p / "inputs.json").stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(cache: Path) -> None:
    """A build killed with SIGKILL leaves a .partial entry; under the lock, none is in use."""
    for partial in cache.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
