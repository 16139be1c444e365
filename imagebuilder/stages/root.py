"""Stage `root`: this version's root subvolume, its send streams, and the image's first deployment
(docs/updates.md, "One identity per version").

The subvolume's UUID becomes the version's identity (written into its /usr/lib/rastos/image.json
before it is made read-only and sent). Without a parent, it is made in the image's btrfs itself (stage
btrfs made it without a root), in @images/, and sent from there. With `--delta-from`, it is made in a
scratch btrfs file that first receives the parent version's whole stream, checked against its
bundle's manifest, as a snapshot of that parent: sent with the parent as `-p`, that is the delta every
host holding the parent can take; the image's btrfs then receives the whole stream into @images/. Either
way the first deployment, the root subvolume the boot entry names, is a writable snapshot of the
image. All the mounting happens in the helper imagebuilder.sendfill, in a mount namespace of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import in_private_mount_namespace
from imagebuilder.context import BuildContext
from imagebuilder.profile.model import GiB, MiB
from imagebuilder.stages.disk import tree_size
from rastos.bundle import BundleError
from rastos.errors import CommandError, RastosError
from rastos.process import run

IMAGES = "@images"  # beside the other subvolumes: one read-only subvolume per version the host has
STREAM = "root.btrfs.zst"


def make_root(ctx: BuildContext) -> str:
    if ctx.parent is None:
        return build_root(ctx)
    fresh = send_root(ctx)
    received = _sendfill(
        ctx,
        "receive", ctx.btrfs_image, "--stream", ctx.root_stream, "--name", ctx.subvolume_name,
        "--images", IMAGES, "--root", ctx.profile.btrfs.root, "--compression", ctx.profile.btrfs.compression,
    )  # fmt: skip
    if received["uuid"] != ctx.subvolume_uuid:
        raise RastosError(
            f"the image received {ctx.subvolume_name} as {received['uuid']}, not as {ctx.subvolume_uuid}: "
            "btrfs receive did not keep the sent identity"
        )
    note = f"{ctx.subvolume_name} {ctx.subvolume_uuid} ({fresh}), stream {_mib(ctx.root_stream)}"
    if ctx.parent is not None:
        note += f", delta from {ctx.parent.manifest.version} {_mib(ctx.delta_stream)}"
    return note + f"; {ctx.profile.btrfs.root} is its snapshot"


def build_root(ctx: BuildContext) -> str:
    """Without a parent, the root subvolume is made in the image's own file system and sent from there
    (imagebuilder/sendfill.py `build`): the tree is copied once, and nothing is received."""
    made = _sendfill(
        ctx,
        "build", ctx.btrfs_image, ctx.rootfs, "--name", ctx.subvolume_name, "--profile", ctx.profile.name,
        "--version", ctx.version, "--stream", ctx.root_stream, "--images", IMAGES,
        "--root", ctx.profile.btrfs.root, "--compression", ctx.profile.btrfs.compression,
    )  # fmt: skip
    ctx.subvolume_uuid = made["uuid"]
    return (
        f"{ctx.subvolume_name} {ctx.subvolume_uuid} (made in the image), stream {_mib(ctx.root_stream)}; "
        f"{ctx.profile.btrfs.root} is its snapshot"
    )


def send_root(ctx: BuildContext) -> str:
    """The root subvolume made in scratch and sent; returns how it was filled."""
    scratch = ctx.work_dir / "scratch.btrfs"
    parent_args: list[str | Path] = []
    fresh = "filled afresh"
    # Room for the tree, a parent as large again (zstd -3 shrinks a root tree about twofold, so four
    # times its stream) and btrfs's own: the file is sparse, only what is written takes space.
    size = 2 * tree_size(ctx.rootfs) + GiB
    if ctx.parent is not None:
        parent = ctx.parent.manifest
        parent_stream = ctx.work_dir / f"parent.{STREAM}"
        size += 4 * parent.parts[STREAM].size
        _extract(ctx, parent_stream)
        parent_args = [
            "--parent-stream", parent_stream, "--parent-name", parent.subvolume_name,
            "--parent-uuid", parent.subvolume_uuid, "--delta", ctx.delta_stream,
        ]  # fmt: skip
        fresh = f"a snapshot of {parent.subvolume_name} brought up to date"
    with scratch.open("wb") as file:
        file.truncate(size)
    # Metadata once, not twice as on a lasting file system: the scratch is gone when the build ends.
    run(["mkfs.btrfs", "--quiet", "--force", "--metadata", "single", "--label", "rastos-scratch", scratch])
    made = _sendfill(
        ctx,
        "send", scratch, ctx.rootfs, "--name", ctx.subvolume_name, "--profile", ctx.profile.name,
        "--version", ctx.version, "--stream", ctx.root_stream, *parent_args,
    )  # fmt: skip
    ctx.subvolume_uuid = made["uuid"]
    scratch.unlink()
    return fresh


def _extract(ctx: BuildContext, destination: Path) -> None:
    """The parent's root stream out of its bundle, every byte checked against its manifest before the
    scratch file system sees one."""
    assert ctx.parent is not None
    try:
        with destination.open("xb") as out:
            for chunk in ctx.parent.chunks(STREAM):
                out.write(chunk)
    except BundleError as error:
        raise RastosError(f"--delta-from {ctx.parent.path}: {error.message}", hint=error.hint) from None


def _sendfill(ctx: BuildContext, *args: str | Path) -> dict[str, Any]:
    """Run imagebuilder.sendfill in a mount namespace of its own; its result, or its error as ours."""
    result = ctx.work_dir / f"sendfill-{args[0]}.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "imagebuilder.sendfill", *args, "--result", result]
    try:
        run(in_private_mount_namespace(argv), cwd=CHECKOUT)
    except CommandError:
        if not result.is_file():
            raise
        failed = json.loads(result.read_text())
        raise RastosError(failed["error"], hint=failed["hint"]) from None
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / MiB:.1f} MiB"
