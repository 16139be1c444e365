"""Stage `images`: qcow2 and raw files; then the manifest that describes them and the update bundles,
with their checksums."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imagebuilder.chroot import chroot_run
from imagebuilder.context import BuildContext
from imagebuilder.profile.load import profile_to_dict
from imagebuilder.profile.model import DistributionName, ImageFormat
from imagebuilder.stages.bootloader import entry_filename
from imagebuilder.stages.disk import ESP_TYPE, ROOT_X86_64_TYPE, plan_layout
from imagebuilder.stages.root import IMAGES
from rastos import __version__
from rastos.alpm import Alpm, AlpmOptions
from rastos.process import run


def installed_packages(ctx: BuildContext) -> list[dict[str, str]]:
    if ctx.profile.distribution.name is DistributionName.arch:
        # libalpm's local database, read in process (no pacman needed on the build host).
        alpm = Alpm(AlpmOptions(root=ctx.rootfs, repositories=()))
        return [{"name": n, "version": v, "architecture": a} for n, v, a in alpm.inventory()]
    out = chroot_run(
        ctx.rootfs,
        ["dpkg-query", "--show", "--showformat=${Package}\\t${Version}\\t${Architecture}\\n"],
        capture=True,
    ).stdout
    packages = []
    for line in sorted(out.splitlines()):
        name, version, arch = line.split("\t")
        packages.append({"name": name, "version": version, "architecture": arch})
    return packages


CHUNK = 4 * 1024 * 1024
ZEROS = bytes(CHUNK)


def sha256(path: Path) -> str:
    """The file's sha256, feeding holes from a zero buffer instead of reading them: a sparse 16 GiB
    raw disk hashes at the speed of SHA-256, not at the speed of reading 16 GiB."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        fd, size, position = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while position < size:
            try:
                data_start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                data_start = size
            for offset in range(position, data_start, CHUNK):
                digest.update(ZEROS[: min(CHUNK, data_start - offset)])
            if data_start >= size:
                break
            data_end = os.lseek(fd, data_start, os.SEEK_HOLE)
            f.seek(data_start)
            remaining = data_end - data_start
            while remaining:
                chunk = f.read(min(CHUNK, remaining))
                digest.update(chunk)
                remaining -= len(chunk)
            position = data_end
    return digest.hexdigest()


def checksums(paths: list[Path]) -> dict[Path, str]:
    """sha256 of several files at once (hashlib releases the GIL, so threads use every core)."""
    with ThreadPoolExecutor() as pool:
        return dict(zip(paths, pool.map(sha256, paths), strict=True))


def write_images(ctx: BuildContext) -> dict[str, Path]:
    """Convert the raw disk into every requested format; returns format -> file in staging."""
    formats = ctx.profile.disk.formats
    produced: dict[str, Path] = {}
    if ImageFormat.qcow2 in formats:
        qcow2 = ctx.staging_dir / f"{ctx.image_name}.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", ctx.raw_image, qcow2])
        produced["qcow2"] = qcow2
    if ImageFormat.raw in formats:
        produced["raw"] = ctx.raw_image
    else:
        ctx.raw_image.unlink()
    return produced


def manifest(ctx: BuildContext, images: dict[str, Path], packages: list[dict[str, str]]) -> dict[str, Any]:
    assert ctx.kernel is not None
    layout = plan_layout(ctx.profile)
    btrfs = ctx.profile.btrfs
    digests = checksums(list(images.values()))
    parent = ctx.parent.manifest if ctx.parent else None
    return {
        "rastos_version": __version__,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": ctx.version,
        # The version's identity: the UUID of @images/NAME where it was made, its received UUID elsewhere.
        "subvolume": {"name": ctx.subvolume_name, "uuid": ctx.subvolume_uuid},
        "delta_from": None if parent is None else {"version": parent.version, "uuid": parent.subvolume_uuid},
        "signing_key": ctx.signing_key.id if ctx.signing_key else None,
        "profile": profile_to_dict(ctx.profile),
        "bootstrap_cache_key": ctx.bootstrap_key,
        "packages": packages,
        "kernel": {
            "version": ctx.kernel.version,
            "cmdline": ctx.cmdline,
            "boot_entry": entry_filename(ctx),
        },
        "disk": {
            "size": layout.total,
            "label": "gpt",
            "guid": ctx.ids.disk_guid,
            "partitions": [
                {
                    "name": "esp",
                    "type": ESP_TYPE,
                    "partuuid": ctx.ids.esp_partuuid,
                    "start": layout.esp_start,
                    "size": layout.esp_size,
                    "filesystem": "vfat",
                    "fs_uuid": ctx.ids.esp_fs_uuid,
                    "mountpoint": "/efi",
                },
                {
                    "name": "root-x86-64",
                    "type": ROOT_X86_64_TYPE,
                    "partuuid": ctx.ids.root_partuuid,
                    "start": layout.root_start,
                    "size": layout.root_size,
                    "filesystem": "btrfs",
                    "fs_uuid": ctx.ids.root_fs_uuid,
                },
            ],
        },
        "btrfs": {
            "default_subvolume": btrfs.root,
            "images": IMAGES,
            "compression": btrfs.compression,
            "subvolumes": [{"name": name, "mountpoint": mp} for name, mp in ctx.profile.subvolumes().items()],
        },
        "outputs": {
            kind: {"file": path.name, "size": path.stat().st_size, "sha256": digests[path]}
            for kind, path in images.items()
        },
        "stage_seconds": {k: round(v, 3) for k, v in ctx.stage_seconds.items()},
    }


def write_manifest(ctx: BuildContext, images: dict[str, Path], packages: list[dict[str, str]]) -> Path:
    path = ctx.staging_dir / "manifest.json"
    path.write_text(json.dumps(manifest(ctx, images, packages), indent=2) + "\n")
    return path
