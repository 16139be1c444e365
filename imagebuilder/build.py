"""The build: named stages run in order, each timed and reported, inside a scratch directory that
is removed whatever happens. Outputs are written to a staging directory and moved beside any older
outputs only when every stage succeeded, so a failed or interrupted build leaves no half-written
image or bundle. What must be mounted (the root subvolume and its send stream, stage root) is
mounted by a helper in a mount namespace of its own, through loop devices that clear themselves:
nothing is left mounted or attached, however the build ends.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from imagebuilder.context import BuildContext
from imagebuilder.events import BuildEvents
from imagebuilder.host import check_build_host, require_programs
from imagebuilder.keys import signing_key
from imagebuilder.profile import Profile
from imagebuilder.profile.model import DistributionName
from imagebuilder.stages.bootloader import build_esp, configure_kernel
from imagebuilder.stages.bootstrap import bootstrap
from imagebuilder.stages.bootstrap_arch import ArchRecipe, bootstrap_arch, check_arch_host
from imagebuilder.stages.bundle import check_names, open_parent, write_bundles
from imagebuilder.stages.configure import configure
from imagebuilder.stages.desired_state import apply_desired_state
from imagebuilder.stages.disk import assemble_disk, build_btrfs
from imagebuilder.stages.initrd import build_initrd
from imagebuilder.stages.kernel_build import build_profile_kernel
from imagebuilder.stages.outputs import installed_packages, write_images, write_manifest
from imagebuilder.stages.rastos import install_rastos
from imagebuilder.stages.root import make_root
from rastos.bundle import SUFFIX as BUNDLE_SUFFIX
from rastos.errors import RastosError

log = logging.getLogger("rastos.build")
KEPT_BUNDLES = 3  # full bundles (and deltas) of an image kept in its output directory


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[BuildContext], str]


def _inventory(ctx: BuildContext) -> str:
    ctx.packages = installed_packages(ctx)
    return f"{len(ctx.packages)} packages"


def _images(ctx: BuildContext) -> str:
    ctx.images = write_images(ctx)
    return ", ".join(f"{kind} {path.stat().st_size // (1024 * 1024)} MiB" for kind, path in ctx.images.items())


def _bootstrap(ctx: BuildContext) -> str:
    if ctx.profile.distribution.name is DistributionName.arch:
        return bootstrap_arch(ctx)
    return bootstrap(ctx)


STAGES = (
    Stage("kernel-build", build_profile_kernel),
    Stage("bootstrap", _bootstrap),
    Stage("configure", configure),
    Stage("install-rastos", install_rastos),
    Stage("desired-state", apply_desired_state),
    Stage("kernel", configure_kernel),
    Stage("initrd", build_initrd),
    Stage("inventory", _inventory),
    Stage("esp", build_esp),
    Stage("btrfs", build_btrfs),
    Stage("root", make_root),
    Stage("disk", assemble_disk),
    Stage("images", _images),
    Stage("bundle", write_bundles),
)


@dataclass(frozen=True)
class BuildResult:
    outputs: dict[str, Path]
    seconds: float
    version: str
    delta_from: str | None  # the version the delta bundle starts from


def default_output_dir(profile: Profile) -> Path:
    return Path("build") / profile.name


def build_image(
    profile: Profile,
    *,
    output_dir: Path,
    cache_dir: Path,
    events: BuildEvents,
    refresh_bootstrap: bool = False,
    loop_fallback: bool = False,
    version: str | None = None,
    signing_key_path: Path | None = None,
    delta_from: Path | None = None,
) -> BuildResult:
    host = check_build_host()  # before anything is created on disk
    if profile.distribution.name is DistributionName.arch:
        check_arch_host(ArchRecipe.of(profile).keyring)
    built_at = datetime.datetime.now(datetime.UTC)
    version = version or profile.version or built_at.strftime("%Y%m%d.%H%M%S")
    check_names(profile.name)
    key = signing_key(signing_key_path)
    parent = None
    if delta_from is not None:
        require_programs(("rsync",))
        parent = open_parent(delta_from, key, profile.name, version)
    stages = STAGES  # the same for every distribution: a stage that differs chooses inside
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(output_dir / ".lock"), build_log(output_dir / "build.log"), _interruptible(), \
            _scratch(cache_dir / "work") as work, _scratch(output_dir, prefix=".staging-") as staging:  # fmt: skip
        ctx = BuildContext(
            profile=profile,
            cache_dir=cache_dir,
            work_dir=work,
            staging_dir=staging,
            output_dir=output_dir,
            image_name=f"rastos-{profile.name}",
            refresh_bootstrap=refresh_bootstrap,
            btrfs_progs=host,
            loop_fallback=loop_fallback,
            version=version,
            built_at=built_at,
            signing_key=key,
            parent=parent,
        )
        log.info(
            "building profile %s version %s from %s; btrfs-progs %s; signing with key %s%s",
            profile.name,
            version,
            ", ".join(profile.sources),
            ".".join(map(str, host)),
            key.id,
            f"; a delta from version {parent.manifest.version}" if parent else "",
        )
        events.build_started(profile.name, [s.name for s in stages])
        for stage in stages:
            _run_stage(stage, ctx, events)
        manifest = write_manifest(ctx, {**ctx.images, **ctx.bundles}, ctx.packages)
        outputs = _publish({**ctx.images, **ctx.bundles, "manifest": manifest}, output_dir)
        spared = {path.resolve() for path in outputs.values()} | ({delta_from.resolve()} if delta_from else set())
        for removed in prune_bundles(output_dir, ctx.image_name, spared):
            log.info("removed the older bundle %s (the newest %d of each kind stay)", removed.name, KEPT_BUNDLES)
        outputs["log"] = output_dir / "build.log"
        seconds = time.monotonic() - started
        log.info("build finished in %.1fs", seconds)
        events.build_finished({k: str(v) for k, v in outputs.items()}, seconds)
        return BuildResult(outputs, seconds, version, parent.manifest.version if parent else None)


def _run_stage(stage: Stage, ctx: BuildContext, events: BuildEvents) -> None:
    events.stage_started(stage.name)
    log.info("stage %s: started", stage.name)
    ctx.progress = lambda note: events.stage_progress(stage.name, note)
    started = time.monotonic()
    try:
        note = stage.run(ctx)
    except BaseException as e:
        seconds = time.monotonic() - started
        log.error("stage %s: failed after %.1fs: %s", stage.name, seconds, e)
        events.stage_failed(stage.name, seconds, str(e) or type(e).__name__)
        raise
    seconds = time.monotonic() - started
    ctx.stage_seconds[stage.name] = seconds
    log.info("stage %s: done in %.1fs: %s", stage.name, seconds, note)
    events.stage_finished(stage.name, seconds, note)


def _publish(files: dict[str, Path], output_dir: Path) -> dict[str, Path]:
    """Move finished files into the output directory, each replacing its older version at once.
    The manifest goes last: it names the others, which must be in place when it is."""
    published = {}
    for kind, path in sorted(files.items(), key=lambda item: item[0] == "manifest"):
        target = output_dir / path.name
        path.replace(target)
        published[kind] = target
    return published


def prune_bundles(output_dir: Path, image_name: str, spared: set[Path]) -> list[Path]:
    """Remove all but the newest KEPT_BUNDLES full bundles and as many deltas of this image from
    the output directory (each is some 190 MiB for minimal, and every build makes a version); the
    bundles of this build and the one it made a delta from stay whatever their age. Returns what went."""
    bundles = [path for path in output_dir.glob(f"{image_name}-*{BUNDLE_SUFFIX}") if path.is_file()]
    removed = []
    for delta in (False, True):
        kind = sorted((p for p in bundles if ("-from-" in p.name) == delta), key=lambda p: p.stat().st_mtime)
        for path in kind[: max(0, len(kind) - KEPT_BUNDLES)]:
            if path.resolve() not in spared:
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RastosError(
                f"another build is writing to {path.parent}", hint="wait for it, or use --output-dir"
            ) from None
        yield


@contextlib.contextmanager
def build_log(path: Path) -> Iterator[None]:
    """Every command and its output, at debug level, into `path` while the block runs."""
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("rastos")
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the same cleanup runs."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _scratch(parent: Path, prefix: str = "") -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent, prefix)
    path = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Scratch directories of builds that were killed (their process is gone)."""
    for path in parent.glob(f"{prefix}[0-9]*"):
        pid = path.name.removeprefix(prefix)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
