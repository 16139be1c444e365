"""Stages `btrfs` and `disk`: the root file system as a file, then the GPT disk around it.

The btrfs file system is made with `mkfs.btrfs --rootdir --subvol` (btrfs-progs >= 6.7): every
subvolume but the root is a directory of the staged tree, and no loop device or mount is involved.
The root comes after, received from this version's send stream (stage root, stages/root.py). The
disk is a sparse file: sfdisk writes the GPT, and the two file system images are copied in at their
offsets, data extents only, so holes stay holes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import in_private_mount_namespace
from imagebuilder.context import BuildContext
from imagebuilder.profile.model import MiB, Profile, format_size
from rastos.errors import RastosError
from rastos.process import run

ALIGN = MiB
SECTOR = 512
# Discoverable Partitions Specification type GUIDs.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
# Room btrfs needs beyond the files themselves (metadata, system chunks, a little slack), and the
# fraction of the files' size allowed on top for metadata and fragmentation.
BTRFS_FIXED_OVERHEAD = 160 * MiB
BTRFS_OVERHEAD_RATIO = 1.10
# btrfs-progs versions that can make subvolumes (6.7) and compress files (6.11) without mounting.
MKFS_SUBVOL_VERSION = (6, 7)
MKFS_COMPRESS_VERSION = (6, 11)


@dataclass(frozen=True)
class DiskLayout:
    total: int
    esp_start: int
    esp_size: int
    root_start: int
    root_size: int


def plan_layout(profile: Profile) -> DiskLayout:
    esp_start = ALIGN
    esp_size = profile.disk.esp_size
    root_start = esp_start + esp_size
    # The backup GPT lives in the last 33 sectors; keep the final MiB free for it.
    root_size = profile.disk.size - root_start - ALIGN
    return DiskLayout(profile.disk.size, esp_start, esp_size, root_start, root_size)


def _move_contents(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        for child in source.iterdir():
            child.rename(destination / child.name)
    source.mkdir(parents=True, exist_ok=True)


def stage_subvolumes(ctx: BuildContext) -> None:
    """Give each subvolume its directory at the top of the tree, moving its files out of the root."""
    rootfs = ctx.rootfs
    for subvolume, mountpoint in ctx.profile.subvolumes().items():
        if mountpoint != "/":
            _move_contents(rootfs / mountpoint.lstrip("/"), ctx.fs_tree / subvolume)
    (rootfs / "efi").mkdir(exist_ok=True)


def tree_size(path: Path) -> int:
    """Bytes the files under `path` occupy (allocated blocks, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            st = os.lstat(Path(directory) / name)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def build_btrfs(ctx: BuildContext) -> str:
    stage_subvolumes(ctx)
    layout = plan_layout(ctx.profile)
    files = tree_size(ctx.fs_tree) + tree_size(ctx.rootfs)
    needed = int(files * BTRFS_OVERHEAD_RATIO) + BTRFS_FIXED_OVERHEAD
    if needed > layout.root_size:
        raise RastosError(
            f"disk too small for the root file system: it needs about {needed // MiB} MiB, but the "
            f"root partition of a {format_size(ctx.profile.disk.size)} disk "
            f"(disk.size in profile {ctx.profile.name}) holds {layout.root_size // MiB} MiB",
            hint=f"set disk.size to at least {(needed + layout.root_start + ALIGN) // MiB + 1}M",
        )
    image = ctx.btrfs_image
    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(layout.root_size)
    if ctx.loop_fallback or ctx.btrfs_progs < MKFS_SUBVOL_VERSION:
        method = "mounted through a loop device"
        _fill_by_mounting(ctx, image)
    else:
        method = "made by mkfs.btrfs --rootdir, nothing mounted"
        _make_with_rootdir(ctx, image)
    return f"{len(_others(ctx))} subvolumes and room for the root, {needed // MiB} MiB, {method}"


def _mkfs_argv(ctx: BuildContext) -> list[str | Path]:
    return ["mkfs.btrfs", "--quiet", "--force", "--label", "rastos-root", "--uuid", ctx.ids.root_fs_uuid]


def _others(ctx: BuildContext) -> list[str]:
    """The subvolumes made with the file system: all but the root, which is received later."""
    return [name for name in ctx.profile.subvolumes() if name != ctx.profile.btrfs.root]


def _make_with_rootdir(ctx: BuildContext, image: Path) -> None:
    btrfs = ctx.profile.btrfs
    argv = [*_mkfs_argv(ctx), "--rootdir", ctx.fs_tree]
    for subvolume in _others(ctx):
        argv += ["--subvol", f"rw:{subvolume}"]
    # --compress arrived in 6.11; before it, files land uncompressed and later writes compress.
    if btrfs.compression and ctx.btrfs_progs >= MKFS_COMPRESS_VERSION:
        argv += ["--compress", btrfs.compression]
    run([*argv, image])


def _fill_by_mounting(ctx: BuildContext, image: Path) -> None:
    btrfs = ctx.profile.btrfs
    run([*_mkfs_argv(ctx), image])
    argv: list[str | Path] = [
        sys.executable, "-m", "imagebuilder.loopfill", image, ctx.fs_tree, "--compression", btrfs.compression,
    ]  # fmt: skip
    for subvolume in _others(ctx):
        argv += ["--subvolume", subvolume]
    run(in_private_mount_namespace(argv), cwd=CHECKOUT)


def write_partition_table(disk: Path, ctx: BuildContext, layout: DiskLayout) -> None:
    ids = ctx.ids
    script = (
        "label: gpt\n"
        f"label-id: {ids.disk_guid}\n"
        "unit: sectors\n"
        f"start={layout.esp_start // SECTOR}, size={layout.esp_size // SECTOR}, "
        f'type={ESP_TYPE}, uuid={ids.esp_partuuid}, name="esp"\n'
        f"start={layout.root_start // SECTOR}, size={layout.root_size // SECTOR}, "
        f'type={ROOT_X86_64_TYPE}, uuid={ids.root_partuuid}, name="root-x86-64"\n'
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=script)


def copy_sparse(source: Path, destination: Path, offset: int) -> None:
    """Copy `source` into `destination` at `offset`, skipping holes so the result stays sparse."""
    with source.open("rb") as src, destination.open("r+b") as dst:
        size = os.fstat(src.fileno()).st_size
        position = 0
        while position < size:
            try:
                data_start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            data_end = os.lseek(src.fileno(), data_start, os.SEEK_HOLE)
            remaining, at = data_end - data_start, data_start
            while remaining:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining, at, offset + at)
                if copied == 0:
                    raise RastosError(f"short copy from {source} into {destination}")
                remaining -= copied
                at += copied
            position = data_end


def assemble_disk(ctx: BuildContext) -> str:
    layout = plan_layout(ctx.profile)
    disk = ctx.raw_image
    disk.parent.mkdir(parents=True, exist_ok=True)
    with disk.open("wb") as f:
        f.truncate(layout.total)
    write_partition_table(disk, ctx, layout)
    copy_sparse(ctx.esp_image, disk, layout.esp_start)
    copy_sparse(ctx.btrfs_image, disk, layout.root_start)
    # The file system images are inside the disk now; free their space before the outputs stage.
    for image in (ctx.esp_image, ctx.btrfs_image):
        image.unlink()
    return f"GPT: esp {format_size(layout.esp_size)}, root {layout.root_size // MiB} MiB"
