"""Stage `kernel-build`: a profile with `kernel.build` gets its kernel built from the suite's
linux-source (or taken from the kernel cache), and the bootstrap installs that package in place of
the distribution's kernel. Without it, the stage says which distribution kernel the image gets."""

from __future__ import annotations

import logging
import time

from imagebuilder.context import BuildContext
from imagebuilder.kernel import profile as kernel_profiles
from imagebuilder.kernel.build import KernelRequest, Progress, build_kernel
from imagebuilder.kernel.source import from_debian

log = logging.getLogger("rastos.build")


def build_profile_kernel(ctx: BuildContext) -> str:
    wanted = ctx.profile.kernel
    if not wanted.build:
        return f"distribution kernel {wanted.package}"
    distribution = ctx.profile.distribution
    cache = ctx.cache_dir / "kernel"
    source = from_debian(distribution.suite, cache, distribution.mirror, distribution.architecture)
    request = KernelRequest(
        kernel_profiles.load(wanted.build), source, cache, wanted.features, architecture=distribution.architecture
    )
    last = time.monotonic()

    def progress(state: Progress) -> None:
        nonlocal last
        ctx.progress(f"compiling {state.done}/{state.total or '?'}")
        if time.monotonic() - last >= 60:  # into build.log: a long compile shows it is moving
            last = time.monotonic()
            log.info("kernel: compiled %d of %s files (%s)", state.done, state.total or "?", state.current)

    built = build_kernel(request, progress)
    ctx.kernel_package = built.package
    for miss in built.misses:
        log.warning("kernel %s: an option did not stick: %s", wanted.build, miss)
    how = "from the cache" if built.cached else f"built in {built.seconds:.0f} s"
    stuck = f"; {len(built.misses)} options did not stick (see build.log)" if built.misses else ""
    return f"{wanted.build}: {built.release} {how}{stuck}"
