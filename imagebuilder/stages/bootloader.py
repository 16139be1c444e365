"""Stages `kernel` and `esp`: the kernel command line, and the EFI system partition as a vfat file.

systemd-boot (from the image's own systemd-boot-efi, so it matches the image's systemd-bless-boot)
is the removable-media boot path, so no NVRAM entry is needed. The first deployment gets a Boot
Loader Specification entry that names its root subvolume explicitly and carries a boot counter in its
file name. The kernel and initrd sit under /<entry-token>/<kernel-version>/ as the BLS suggests.
The vfat image is filled with mtools: nothing is mounted.
"""

from __future__ import annotations

import shutil

from imagebuilder.context import BuildContext
from imagebuilder.files import write_file
from imagebuilder.profile.model import MiB
from rastos.errors import RastosError
from rastos.process import run

SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"


def kernel_cmdline(ctx: BuildContext) -> list[str]:
    profile = ctx.profile
    options = [
        f"root=UUID={ctx.ids.root_fs_uuid}",
        f"rootflags=subvol={profile.btrfs.root}",
        "rootfstype=btrfs",
        "rw",
    ]
    if profile.boot.console:
        options.append(f"console={profile.boot.console},115200")
    if profile.kernel.blacklist:
        # The kernel enforces this one even for modules something asks for explicitly.
        options.append(f"module_blacklist={','.join(profile.kernel.blacklist)}")
    return [*options, *profile.kernel.cmdline]


def configure_kernel(ctx: BuildContext) -> str:
    """Record the command line where kernel-install finds it, for kernels installed later."""
    ctx.cmdline = kernel_cmdline(ctx)
    root = ctx.rootfs
    write_file(root / "etc/kernel/cmdline", " ".join(ctx.cmdline) + "\n")
    write_file(root / "etc/kernel/entry-token", ctx.entry_token + "\n")
    if ctx.profile.boot.tries:
        write_file(root / "etc/kernel/tries", f"{ctx.profile.boot.tries}\n")
    assert ctx.kernel is not None
    return f"kernel {ctx.kernel.version}"


def entry_filename(ctx: BuildContext) -> str:
    tries = ctx.profile.boot.tries
    return f"{ctx.entry_id}+{tries}.conf" if tries else f"{ctx.entry_id}.conf"


def boot_entry(ctx: BuildContext) -> str:
    assert ctx.kernel is not None
    profile, version = ctx.profile, ctx.kernel.version
    return (
        f"title      rastOS {profile.name}\n"
        f"version    {version}\n"
        f"sort-key   rastos\n"
        f"linux      /{ctx.entry_token}/{version}/linux\n"
        f"initrd     /{ctx.entry_token}/{version}/initrd\n"
        f"options    {' '.join(ctx.cmdline)}\n"
    )


def loader_conf(ctx: BuildContext) -> str:
    boot = ctx.profile.boot
    return (
        f"timeout {boot.menu_timeout}\n"
        f"default {ctx.entry_token}-*\n"
        "editor no\n"
        "auto-entries no\n"
        "auto-firmware no\n"
        "console-mode keep\n"
    )


def build_esp(ctx: BuildContext) -> str:
    assert ctx.kernel is not None
    tree = ctx.esp_tree
    shutil.rmtree(tree, ignore_errors=True)
    efi = ctx.rootfs / SYSTEMD_BOOT
    for destination in ("EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"):
        (tree / destination).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(efi, tree / destination)
    kernel_dir = tree / ctx.entry_token / ctx.kernel.version
    kernel_dir.mkdir(parents=True)
    shutil.copyfile(ctx.kernel.vmlinuz, kernel_dir / "linux")
    shutil.copyfile(ctx.initrd_image, kernel_dir / "initrd")
    write_file(tree / "loader/loader.conf", loader_conf(ctx))
    write_file(tree / "loader/entries.srel", "type1\n")
    write_file(tree / "loader/entries" / entry_filename(ctx), boot_entry(ctx))

    needed = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    # FAT32 needs room for its tables and cluster slack beyond the files themselves.
    if needed + 8 * MiB > ctx.profile.disk.esp_size:
        raise RastosError(
            f"the EFI system partition is too small: its files take {needed // MiB} MiB, "
            f"disk.esp_size in profile {ctx.profile.name} is {ctx.profile.disk.esp_size // MiB} MiB",
            hint=f"set disk.esp_size to at least {needed // MiB + 16}M",
        )
    image = ctx.esp_image
    image.unlink(missing_ok=True)
    size_kib = ctx.profile.disk.esp_size // 1024
    run(["mkfs.vfat", "-C", "-F", "32", "-n", "ESP", "-i", ctx.ids.esp_volume_id, image, str(size_kib)])
    sources = sorted(tree.iterdir())
    run(["mcopy", "-s", "-p", "-m", "-Q", "-i", image, *sources, "::/"])
    return entry_filename(ctx)
