"""Fill a btrfs image with subvolumes by mounting it: the fallback for hosts whose btrfs-progs is too
old for `mkfs.btrfs --rootdir --subvol` (before 6.7). The root subvolume is not among them: it is
received from the version's send stream later (imagebuilder.sendfill), and a snapshot of it made the
default.

Run as `unshare --mount --propagation private -- python3 -m imagebuilder.loopfill ...`: the mount
lives in a private namespace and its loop device is set to clear itself, so both vanish when this
process ends, however it ends.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rastos.process import run


def fill(image: Path, tree: Path, subvolumes: list[str], compression: str) -> None:
    with tempfile.TemporaryDirectory(prefix="rastos-loopfill-") as mountpoint:
        options = "loop" + (f",compress={compression}" if compression else "")
        run(["mount", "-t", "btrfs", "-o", options, image, mountpoint])
        try:
            for name in subvolumes:
                run(["btrfs", "subvolume", "create", Path(mountpoint) / name])
                run(["cp", "-a", "--reflink=never", f"{tree / name}/.", Path(mountpoint) / name])
        finally:
            run(["umount", mountpoint])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("image", type=Path)
    p.add_argument("tree", type=Path)
    p.add_argument("--subvolume", action="append", required=True)
    p.add_argument("--compression", default="")
    args = p.parse_args()
    fill(args.image, args.tree, args.subvolume, args.compression)
    return 0


if __name__ == "__main__":
    sys.exit(main())
