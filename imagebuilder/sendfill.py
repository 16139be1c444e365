"""A version's root subvolume and its send streams, and the image's root received from the stream:
the work of stage `root` that needs btrfs files mounted (docs/updates.md, "One identity per version").

    send     the build's root tree becomes the subvolume NAME of a scratch btrfs (a fresh one, or with
             --parent-stream a snapshot of the parent version's received subvolume, brought to the
             tree by rsync so unchanged files keep their shared extents), gets its own
             /usr/lib/rastos/image.json, is made read-only and sent: whole to --stream and, from
             the parent, to --delta.
    receive  the image's btrfs gets the whole stream in @images/ (read-only, its received UUID the
             version's identity) and the first deployment, a writable snapshot of it, as default.
    build    without a parent: the root subvolume is made in the image's btrfs itself, in @images/
             (read-only, its own UUID the version's identity), sent whole to --stream, and the first
             deployment is a writable snapshot of it: one copy of the tree instead of a copy, a send
             and a receive. A host finds a delta's parent by received UUID or, failing that, by
             UUID, as `btrfs receive` does.

Run as `unshare --mount --propagation private --fork -- python3 -m imagebuilder.sendfill ...`
(chroot.in_private_mount_namespace): each mount lives in this namespace and its loop device is set
to clear itself, so both vanish when this process ends, however it ends. The outcome goes to
--result as JSON ({"uuid": ...}, or {"error": ..., "hint": ...}), so the build reports a failure in
its own words rather than as this process's exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rastos.errors import CommandError, RastosError
from rastos.process import run, run_pipeline

IMAGE_INFO = "usr/lib/rastos/image.json"
RSYNC = ["rsync", "-aHAX", "--delete", "--checksum", "--numeric-ids"]
# Level 3 on every core: the stream is written once per build and downloaded by every host.
COMPRESS = ["zstd", "-T0", "-3", "-q"]


@contextlib.contextmanager
def mounted(image: Path, options: str) -> Iterator[Path]:
    """The btrfs file `image` mounted at a directory beside it (in the build's scratch directory,
    which goes with the build even when this process is killed before it could remove it)."""
    mountpoint = image.with_name(image.name + ".mnt")
    mountpoint.mkdir(exist_ok=True)
    run(["mount", "-t", "btrfs", "-o", ",".join(["loop", *filter(None, [options])]), image, mountpoint])
    try:
        yield mountpoint
    finally:
        run(["umount", mountpoint])


def subvolume_field(path: Path, name: str) -> str:
    """A field of `btrfs subvolume show` ("UUID", "Received UUID"); '-' when unset."""
    shown = run(["btrfs", "subvolume", "show", path], capture=True).stdout
    match = re.search(rf"^\s*{re.escape(name)}:\s*(\S+)\s*$", shown, re.MULTILINE)
    if match is None:
        raise RastosError(f"btrfs subvolume show {path} printed no {name}")
    return match.group(1)


def receive(stream: Path, directory: Path) -> None:
    run_pipeline([["zstd", "-d", "-c", "-q", stream], ["btrfs", "receive", directory]])


def send(subvolume: Path, stream: Path, parent: Path | None = None) -> None:
    argv: list[str | Path] = ["btrfs", "-q", "send", subvolume]
    if parent is not None:
        argv[3:3] = ["-p", parent]
    run_pipeline([argv, [*COMPRESS, "-o", stream]])


def image_info(profile: str, version: str, name: str, uuid: str) -> str:
    """What a deployment says of itself: the version it runs and that version's identity."""
    info = {"profile": profile, "version": version, "subvolume": {"name": name, "uuid": uuid}}
    return json.dumps(info, indent=2) + "\n"


def make_root(args: argparse.Namespace) -> dict[str, Any]:
    with mounted(args.image, "noatime") as top:  # noatime: reading a file must not change it in the delta
        subvolume = top / args.name
        parent = None
        if args.parent_stream:
            try:
                receive(args.parent_stream, top)
            except CommandError as error:
                raise RastosError(
                    f"the --delta-from bundle's root stream cannot be received: {error.output_tail}",
                    hint="give the full bundle of an earlier build of this profile, as this builder wrote it",
                ) from None
            parent = top / args.parent_name
            received = subvolume_field(parent, "Received UUID") if parent.is_dir() else "none"
            if received != args.parent_uuid:
                raise RastosError(
                    f"the parent's stream gave {args.parent_name} with received UUID {received}, "
                    f"not the {args.parent_uuid} its manifest names",
                    hint="the --delta-from bundle is not one this builder made",
                )
            run(["btrfs", "-q", "subvolume", "snapshot", parent, subvolume])
            run([*RSYNC, f"{args.tree}/", f"{subvolume}/"])
        else:
            fill(subvolume, args.tree)
        uuid = seal(subvolume, args.profile, args.version)
        send(subvolume, args.stream)
        if parent is not None:
            send(subvolume, args.delta, parent)
    return {"uuid": uuid}


def fill(subvolume: Path, tree: Path) -> None:
    """A new subvolume with a copy of `tree`."""
    run(["btrfs", "-q", "subvolume", "create", subvolume])
    run(["cp", "-a", f"{tree}/.", subvolume])


def seal(subvolume: Path, profile: str, version: str) -> str:
    """The filled subvolume says what it is and is made read-only; returns its UUID."""
    uuid = subvolume_field(subvolume, "UUID")
    info = subvolume / IMAGE_INFO
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(image_info(profile, version, subvolume.name, uuid))
    info.chmod(0o644)
    run(["btrfs", "property", "set", "-ts", subvolume, "ro", "true"])
    return uuid


@contextlib.contextmanager
def image_top(args: argparse.Namespace, how: str) -> Iterator[Path]:
    """The image's btrfs mounted (its compression on), with its images' directory and no first
    deployment yet: where stage root puts the version's image, `how` it comes."""
    options = "noatime" + (f",compress={args.compression}" if args.compression else "")
    with mounted(args.image, options) as top:
        if (top / args.root).exists():
            raise RastosError(f"the image's file system has {args.root} before its root was {how}")
        (top / args.images).mkdir(exist_ok=True)
        yield top


def first_deployment(image: Path, root: Path) -> None:
    """The image's root subvolume, booted by default: a writable snapshot of its version's image."""
    run(["btrfs", "-q", "subvolume", "snapshot", image, root])
    run(["btrfs", "subvolume", "set-default", root])


def build_root(args: argparse.Namespace) -> dict[str, Any]:
    with image_top(args, "made") as top:
        made = top / args.images / args.name
        fill(made, args.tree)
        uuid = seal(made, args.profile, args.version)
        send(made, args.stream)
        first_deployment(made, top / args.root)
    return {"uuid": uuid}


def receive_root(args: argparse.Namespace) -> dict[str, Any]:
    with image_top(args, "received") as top:
        receive(args.stream, top / args.images)
        received = top / args.images / args.name
        if not received.is_dir():
            raise RastosError(f"the stream did not hold the subvolume {args.name}")
        first_deployment(received, top / args.root)
        return {"uuid": subvolume_field(received, "Received UUID")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m imagebuilder.sendfill")
    sub = p.add_subparsers(dest="command", required=True)
    make = sub.add_parser("send")
    take = sub.add_parser("receive")
    build = sub.add_parser("build")
    make.add_argument("image", type=Path, help="the scratch btrfs file")
    for command in (take, build):
        command.add_argument("image", type=Path, help="the image's btrfs file")
    for command in (make, build):  # they make the version's subvolume from the tree
        command.add_argument("tree", type=Path, help="the root tree")
        command.add_argument("--profile", required=True)
        command.add_argument("--version", required=True)
    for command in (make, take, build):
        command.add_argument("--name", required=True)
        command.add_argument("--stream", type=Path, required=True)
        command.add_argument("--result", type=Path, required=True)
    for command in (take, build):  # they put the image in the image's btrfs, and its first deployment
        command.add_argument("--images", required=True, help="the directory of image subvolumes, @images")
        command.add_argument("--root", required=True, help="the first deployment's subvolume, @")
        command.add_argument("--compression", default="")
    make.add_argument("--parent-stream", type=Path)
    make.add_argument("--parent-name")
    make.add_argument("--parent-uuid")
    make.add_argument("--delta", type=Path)
    make.set_defaults(func=make_root)
    take.set_defaults(func=receive_root)
    build.set_defaults(func=build_root)
    return p


def main() -> int:
    args = parser().parse_args()
    # Every command and its output reaches the build's log through this process's output.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("rastos").addHandler(handler)
    logging.getLogger("rastos").setLevel(logging.DEBUG)
    try:
        result = args.func(args)
    except RastosError as error:
        args.result.write_text(json.dumps({"error": error.message, "hint": error.hint}))
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
