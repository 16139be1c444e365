"""Build a kernel profile: configure (base, fragment, olddefconfig, report), then compile and package,
unless the cache has that kernel already.

The cache key is the source's digest and the final .config (after Kconfig resolved it), so two
fragments that resolve to the same configuration share one kernel, and any change that reaches the
configuration builds anew. Finding the final .config costs a `make olddefconfig` (seconds): a second
index, keyed by what goes into it (source, base, fragment), answers a repeated build with no make at
all.

The build is the kernel's own `make bindeb-pkg` in a directory of its own (O=, kept per profile and
source, so a changed option recompiles only what it touches; the source tree is never written). It
gives a Debian package (linux-image-RELEASE) whose maintainer scripts run /etc/kernel/postinst.d, so
the initramfs and boot-loader hooks of the system it is installed on run as for Debian's kernel. The
build is made reproducible the kernel's way (KBUILD_BUILD_TIMESTAMP, _USER, _HOST, the package
version), so the same inputs give the same kernel.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import lzma
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagebuilder.kernel import config
from imagebuilder.kernel.profile import Base, KernelProfile
from imagebuilder.kernel.source import KernelSource
from rastos.errors import CommandError, RastosError
from rastos.process import run

RECIPE = 1
KEPT_KERNELS = 4
KEPT_BUILD_DIRS = 2  # object trees: about 1 GB for minimal-vm, 15 GB and more on Debian's configuration
ARCHES = {"amd64": "x86_64", "arm64": "arm64"}
# A Debian configuration names Debian's signing certificates, which only Debian's build has: the
# kernel makes a key of its own for module signing instead, and trusts no extra keys.
DEBIAN_BASE_OPTIONS = {
    "SYSTEM_TRUSTED_KEYS": '""',
    "SYSTEM_REVOCATION_KEYS": '""',
    "MODULE_SIG_KEY": '"certs/signing_key.pem"',
    "BUILD_SALT": '""',
}
# What make prints per compiled or linked file (kbuild's quiet output): the progress count.
_STEP = re.compile(r"^\s+(CC \[M\]|LD \[M\]|CC|AS|LD|AR)\s+(\S+)")


@dataclass(frozen=True)
class BuiltKernel:
    release: str  # uname -r of the kernel: 6.12.57-rastos-minimal-vm
    directory: Path  # the cache entry
    package: Path  # linux-image-RELEASE_..._amd64.deb
    config_path: Path
    misses: tuple[config.Miss, ...]
    cached: bool
    seconds: float
    manifest: dict[str, object] = field(default_factory=dict)


@dataclass
class Progress:
    """Compiled files so far, of how many the last build of this profile compiled (None: unknown)."""

    done: int = 0
    total: int | None = None
    current: str = ""


@dataclass(frozen=True)
class KernelRequest:
    profile: KernelProfile
    source: KernelSource
    cache: Path  # the image builder's cache directory / "kernel"
    features: tuple[str, ...] = ()
    jobs: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    architecture: str = "amd64"

    @property
    def localversion(self) -> str:
        return f"-rastos-{self.profile.name}" + "".join(f"+{feature}" for feature in sorted(self.features))

    def make_argv(self, build_dir: Path, *targets: str) -> list[str]:
        arch = ARCHES.get(self.architecture)
        if arch is None:
            raise RastosError(f"kernel builds for {self.architecture} are not supported; known: {', '.join(ARCHES)}")
        return ["make", "-C", str(self.source.tree), f"O={build_dir}", f"ARCH={arch}",
                f"LOCALVERSION={self.localversion}", *targets]  # fmt: skip

    def prekey(self) -> str:
        inputs = {"recipe": RECIPE, "source": self.source.digest, "base": self.profile.base.value,
                  "fragment": self.fragment(), "localversion": self.localversion, "arch": self.architecture,
                  "compiler": compiler_version()}  # fmt: skip
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]

    def fragment(self) -> dict[str, str]:
        merged = dict(DEBIAN_BASE_OPTIONS) if self.profile.base is Base.debian else {}
        merged.update(self.profile.fragment(self.features))
        return merged


@functools.cache
def compiler_version() -> str:
    """Kconfig records the compiler (CC_VERSION_TEXT): an upgraded gcc is another configuration."""
    return run(["gcc", "--version"], capture=True).stdout.splitlines()[0]


def build_kernel(request: KernelRequest, on_progress: Callable[[Progress], None] | None = None) -> BuiltKernel:
    started = time.monotonic()
    cache = request.cache
    (cache / "index").mkdir(parents=True, exist_ok=True)
    (cache / "out").mkdir(parents=True, exist_ok=True)
    if (hit := _indexed(request, started)) is not None:
        return hit
    # One directory per profile, features and source: make's objects in obj/ (O=), and beside them
    # the packages bindeb-pkg writes into O='s parent, so no other build can take or remove them.
    workspace = cache / "build" / f"{request.localversion.removeprefix('-rastos-')}-{request.source.digest[:12]}"
    build_dir = workspace / "obj"
    build_dir.mkdir(parents=True, exist_ok=True)
    with (workspace / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final, misses = configure(request, build_dir)
        key = hashlib.sha256(
            f"{RECIPE}\0{request.source.digest}\0{request.architecture}\0{request.localversion}\0{final}".encode()
        )
        entry = cache / "out" / key.hexdigest()[:20]
        compiled = not (entry / "manifest.json").is_file()
        if compiled:
            _compile(request, build_dir, entry, misses, on_progress)
        index = {"entry": entry.name, "misses": [str(miss) for miss in misses]}
        (cache / "index" / request.prekey()).write_text(json.dumps(index) + "\n")
        _evict(cache / "out", keep=entry)
    _evict(cache / "build", keep=workspace, kept=KEPT_BUILD_DIRS)
    return _load(entry, time.monotonic() - started, cached=not compiled, misses=misses)


def configure(request: KernelRequest, build_dir: Path) -> tuple[str, tuple[config.Miss, ...]]:
    """The base, the fragment merged over it, Kconfig's resolution: the final .config and what of the
    fragment it did not keep."""
    build_dir.mkdir(parents=True, exist_ok=True)
    dot_config = build_dir / ".config"
    if request.profile.base is Base.debian:
        if request.source.debian_config is None:
            raise RastosError(
                f"kernel profile {request.profile.name} starts from Debian's configuration, which comes with "
                "Debian's linux-source package, not with this source",
                hint="build it from the default source (no --source), or use a profile on defconfig or tinyconfig",
            )
        dot_config.write_bytes(lzma.decompress(request.source.debian_config.read_bytes()))
    else:
        dot_config.unlink(missing_ok=True)
        run(request.make_argv(build_dir, "-s", request.profile.base.value), capture=True)
    dot_config.write_text(config.merge(dot_config.read_text(), request.fragment()))
    run(request.make_argv(build_dir, "-s", "olddefconfig"), capture=True)
    final = dot_config.read_text()
    # What the profile asked for is reported; the Debian base's own adjustments are not the profile's.
    return final, tuple(config.misses(request.profile.fragment(request.features), config.parse(final)))


def _compile(
    request: KernelRequest,
    build_dir: Path,
    entry: Path,
    misses: tuple[config.Miss, ...],
    on_progress: Callable[[Progress], None] | None,
) -> None:
    last = request.cache / f"last-{request.profile.name}.json"
    previous = json.loads(last.read_text()) if last.is_file() else {}
    progress = Progress(total=previous.get("objects"))

    def seen(line: str) -> None:
        if match := _STEP.match(line):
            progress.done += 1
            progress.current = match.group(2)
            if on_progress is not None:
                on_progress(progress)

    for pattern in ("*.deb", "*.buildinfo", "*.changes"):  # bindeb-pkg writes its packages beside O=
        for stale in build_dir.parent.glob(pattern):
            stale.unlink()
    # Only a build from an empty object tree counts every file: the next one's progress total.
    from_scratch = not (build_dir / "vmlinux").exists()
    version = run(request.make_argv(build_dir, "-s", "kernelrelease"), capture=True).stdout.strip()
    env = {
        "KBUILD_BUILD_TIMESTAMP": _timestamp(request),
        "KBUILD_BUILD_USER": "rastos",
        "KBUILD_BUILD_HOST": "rastos",
        "KBUILD_BUILD_VERSION": "1",
        "KDEB_PKGVERSION": f"{version.split('-')[0]}-1",
    }
    started = time.monotonic()
    try:
        run(request.make_argv(build_dir, f"-j{request.jobs}", "bindeb-pkg"), env=env, on_line=seen)
    except CommandError as error:
        raise RastosError(
            f"building kernel {request.profile.name} failed (make exit status {error.returncode}); its last lines:\n"
            f"{error.output_tail}",
            hint="the whole output is in the build log",
        ) from None
    partial = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    image = sorted(build_dir.parent.glob(f"linux-image-{version}_*.deb"))
    if not image:
        raise RastosError(f"make bindeb-pkg made no linux-image-{version} package in {build_dir.parent}")
    for package in build_dir.parent.glob("*.deb"):
        shutil.move(package, partial / package.name)
    shutil.copy2(build_dir / ".config", partial / "config")
    manifest = {
        "profile": request.profile.name,
        "features": list(request.features),
        "release": version,
        "package": image[0].name,
        "source": {"origin": request.source.origin, "version": request.source.version, "digest": request.source.digest},
        "base": request.profile.base.value,
        "misses": [str(miss) for miss in misses],
        "objects": progress.done,
        "build_seconds": round(time.monotonic() - started, 1),
        "jobs": request.jobs,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    partial.rename(entry)
    if from_scratch:
        last.write_text(json.dumps({"objects": progress.done}) + "\n")


def _timestamp(request: KernelRequest) -> str:
    """The source's own date (its Makefile's modification time): the same source, the same string."""
    stamp = (request.source.tree / "Makefile").stat().st_mtime
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _indexed(request: KernelRequest, started: float) -> BuiltKernel | None:
    index = request.cache / "index" / request.prekey()
    if not index.is_file():
        return None
    try:
        found = json.loads(index.read_text())
    except json.JSONDecodeError:
        return None
    entry = request.cache / "out" / found["entry"]
    if not (entry / "manifest.json").is_file():
        return None
    entry.touch()
    misses = tuple(_miss(text) for text in found["misses"])
    return _load(entry, time.monotonic() - started, cached=True, misses=misses)


def _load(entry: Path, seconds: float, *, cached: bool, misses: tuple[config.Miss, ...]) -> BuiltKernel:
    """The entry's kernel, with the misses of this request's configuration (another fragment that
    resolved to the same configuration may have missed other options)."""
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["misses"] = [str(miss) for miss in misses]
    return BuiltKernel(
        manifest["release"], entry, entry / manifest["package"], entry / "config", misses, cached, seconds, manifest
    )


def _miss(text: str) -> config.Miss:
    match = re.match(r"CONFIG_(\w+): asked (.*), got (.*)$", text)
    assert match is not None, text
    return config.Miss(*match.groups())


def _evict(directory: Path, keep: Path, kept: int = KEPT_KERNELS) -> None:
    """The newest `kept` entries stay; one another build is still making (.partial) is never counted."""
    keep.touch()
    entries = [e for e in directory.iterdir() if e.is_dir() and e != keep and not e.name.endswith(".partial")]
    entries.sort(key=lambda e: e.stat().st_mtime)
    for old in entries[: max(0, len(entries) - (kept - 1))]:
        shutil.rmtree(old, ignore_errors=True)
