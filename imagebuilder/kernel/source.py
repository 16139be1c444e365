"""Where a kernel's source comes from: Debian's linux-source package (the default), a tarball, or a tree.

The Debian source is the one Debian builds its own kernel of, with Debian's patches applied: the
`linux-source` package of the suite ships it as a tarball. It is fetched with mmdebstrap's `extract`
variant (packages unpacked, nothing installed: the tool, mirror and cache the image builder already
uses) and kept under the cache directory. A tarball is unpacked once into the cache, keyed by its
digest; a tree is used where it is, read only (the build writes to a directory of its own, O=).

A source's identity for the build cache is its version and a digest: of the tarball, or of a tree's
file names, sizes and modification times (a changed file in a tree rebuilds).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from imagebuilder.chroot import in_private_mount_namespace
from rastos.errors import RastosError
from rastos.process import run

DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class KernelSource:
    tree: Path  # the unpacked source, never written to
    version: str  # from its Makefile: 6.12.57
    digest: str  # sha256 of the tarball, or of the tree's listing
    origin: str  # what it is, in words: "Debian trixie linux-source-6.12", a path
    debian_config: Path | None = None  # Debian's own .config of this source, when it came from Debian


def makefile_version(tree: Path) -> str:
    makefile = tree / "Makefile"
    if not makefile.is_file():
        raise RastosError(f"{tree} is not a kernel source tree: it has no Makefile")
    fields: dict[str, str] = dict(
        re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) = *(\S*)$", makefile.read_text(), re.M)
    )
    if not fields.get("VERSION"):
        raise RastosError(f"{makefile} does not say which kernel version it is (no VERSION = line)")
    version = f"{fields['VERSION']}.{fields.get('PATCHLEVEL', '0')}.{fields.get('SUBLEVEL', '0')}"
    return version + fields.get("EXTRAVERSION", "")


def tree_digest(tree: Path) -> str:
    """Names, sizes and modification times of every file: a tree changed by an edit digests anew."""
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(tree):
        subdirectories[:] = sorted(d for d in subdirectories if d != ".git")
        for name in sorted(files):
            path = Path(directory, name)
            stat = path.lstat()
            digest.update(f"{path.relative_to(tree)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def from_tree(tree: Path) -> KernelSource:
    tree = tree.resolve()
    return KernelSource(tree, makefile_version(tree), tree_digest(tree), str(tree))


def from_tarball(
    tarball: Path, cache: Path, origin: str | None = None, debian_config: Path | None = None
) -> KernelSource:
    """The tarball unpacked under `cache`/trees/DIGEST (once: later builds reuse it)."""
    if not tarball.is_file():
        raise RastosError(f"kernel source tarball {tarball} does not exist")
    with tarball.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    trees = cache / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    unpacked = trees / digest[:20]
    with (trees / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (unpacked / ".rastos-complete").is_file():
            partial = unpacked.with_name(unpacked.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            partial.mkdir()
            run(["tar", "-xf", tarball, "-C", partial, "--no-same-owner"])
            top = [entry for entry in partial.iterdir()]
            root = top[0] if len(top) == 1 and top[0].is_dir() else partial
            (root / ".rastos-complete").write_text(digest + "\n")
            if root != partial:
                root.rename(unpacked)
                shutil.rmtree(partial)
            else:
                partial.rename(unpacked)
        _evict(trees, keep=unpacked)
    return KernelSource(unpacked, makefile_version(unpacked), digest, origin or str(tarball), debian_config)


def _evict(trees: Path, keep: Path, kept: int = 2) -> None:
    """Unpacked trees are large (1.5 GB): the newest `kept` stay."""
    others = sorted((t for t in trees.iterdir() if t.is_dir() and t != keep), key=lambda t: t.stat().st_mtime)
    keep.touch()
    for old in others[: max(0, len(others) - (kept - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def from_debian(
    suite: str, cache: Path, mirror: str = DEBIAN_MIRROR, architecture: str = "amd64", *, refresh: bool = False
) -> KernelSource:
    """The suite's linux-source (and linux-config) package, fetched into `cache`/debian/SUITE once;
    `refresh` fetches the suite's current one again (a point release; the build cache, keyed by the
    tarball's digest, then builds anew)."""
    directory = cache / "debian" / suite
    directory.mkdir(parents=True, exist_ok=True)
    with (directory.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tarballs = sorted(directory.glob("linux-source-*.tar.xz"))
        if refresh or not tarballs:
            tarballs = [_fetch_debian(suite, directory, mirror, architecture)]
    tarball = tarballs[-1]
    series = tarball.name.removeprefix("linux-source-").removesuffix(".tar.xz")
    config = directory / f"config-{series}-{architecture}.xz"
    return from_tarball(tarball, cache, f"Debian {suite} linux-source-{series}", config if config.is_file() else None)


def _extract(suite: str, packages: str, scratch: Path, mirror: str, architecture: str) -> None:
    """Debian packages unpacked into `scratch`, nothing installed (mmdebstrap's extract variant)."""
    shutil.rmtree(scratch, ignore_errors=True)
    argv: list[str | Path] = ["mmdebstrap", "--mode=root", "--variant=extract", "--format=directory", "--quiet",
            f"--architectures={architecture}", f"--include={packages}", suite, scratch, mirror]  # fmt: skip
    run(in_private_mount_namespace(argv))


def _fetch_debian(suite: str, directory: Path, mirror: str, architecture: str) -> Path:
    """linux-source (it depends on the suite's current series) and that series' linux-config."""
    scratch = directory / "extract.partial"
    _extract(suite, "linux-source", scratch, mirror, architecture)
    tarballs = sorted((scratch / "usr/src").glob("linux-source-*.tar.xz"))
    if not tarballs:
        raise RastosError(f"Debian {suite}'s linux-source package holds no linux-source-*.tar.xz")
    series = tarballs[-1].name.removeprefix("linux-source-").removesuffix(".tar.xz")
    tarball = directory / f"linux-source-{series}.tar.xz"
    shutil.move(tarballs[-1], tarball)
    _extract(suite, f"linux-config-{series}", scratch, mirror, architecture)
    debian_arch = {"amd64": "amd64_none_amd64", "arm64": "arm64_none_arm64"}.get(architecture, architecture)
    config = scratch / f"usr/src/linux-config-{series}/config.{debian_arch}.xz"
    if config.is_file():
        shutil.move(config, directory / f"config-{series}-{architecture}.xz")
    shutil.rmtree(scratch)
    return tarball
