"""`rastos-image kernel`: list kernel profiles, build one (a Debian package, or a kernel image and its
modules tree), with live progress and the report of options that did not stick."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from imagebuilder.build import build_log
from imagebuilder.kernel import profile as kernel_profiles
from imagebuilder.kernel.build import BuiltKernel, KernelRequest, build_kernel
from imagebuilder.kernel.build import Progress as BuildProgress
from imagebuilder.kernel.source import DEBIAN_MIRROR, KernelSource, from_debian, from_tarball, from_tree
from rastos.errors import RastosError
from rastos.process import run

log = logging.getLogger("rastos")
DEFAULT_SUITE = "trixie"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], cache_default: Path) -> None:
    kernel = sub.add_parser("kernel", help="build tuned kernels from source (profiles/kernel/)")
    commands = kernel.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    commands.add_parser("profiles", help="list kernel profiles").set_defaults(func=cmd_profiles)
    build = commands.add_parser("build", help="configure and build a kernel profile (cached)")
    build.add_argument("profile", help="a name from `rastos-image kernel profiles`")
    build.add_argument("--feature", action="append", default=[], help="an optional part of the profile, e.g. kasan")
    build.add_argument("--source", type=Path, help="a kernel tarball or tree (default: Debian's linux-source)")
    build.add_argument("--suite", default=DEFAULT_SUITE, help="the Debian suite whose source (default: %(default)s)")
    build.add_argument("--mirror", default=DEBIAN_MIRROR, help="the Debian mirror (default: %(default)s)")
    build.add_argument(
        "--refresh-source", action="store_true", help="fetch the suite's linux-source again (a new point release)"
    )
    build.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="make -j (default: %(default)s)")
    build.add_argument("--output", type=Path, help="also copy the packages here (and with --tree, unpack them)")
    build.add_argument("--tree", action="store_true", help="with --output: boot/vmlinuz-* and lib/modules/* too")
    build.add_argument("--strict", action="store_true", help="fail when an option of the profile did not stick")
    build.add_argument("--cache-dir", type=Path, default=cache_default, help="default: %(default)s")
    build.add_argument("--json", action="store_true", help="JSON lines: progress, then the result (kernel-built)")
    build.set_defaults(func=cmd_build)


def cmd_profiles(args: argparse.Namespace) -> int:
    for name in kernel_profiles.available():
        loaded = kernel_profiles.load(name)
        features = f" (features: {', '.join(sorted(loaded.features))})" if loaded.features else ""
        print(f"{name:14} {loaded.base.value:10} {loaded.description}{features}")
    return 0


def source_for(args: argparse.Namespace, cache: Path) -> KernelSource:
    given: Path | None = args.source
    if given is None:
        return from_debian(args.suite, cache, args.mirror, refresh=args.refresh_source)
    if given.is_dir():
        return from_tree(given)
    return from_tarball(given, cache)


def cmd_build(args: argparse.Namespace) -> int:
    profile = kernel_profiles.load(args.profile)
    if args.jobs < 1:
        raise RastosError(f"--jobs: {args.jobs} is not a positive number")
    if args.tree and not args.output:
        raise RastosError("--tree: needs --output DIR, where the tree goes")
    if os.geteuid() != 0:
        raise RastosError(
            "building a kernel needs root (mmdebstrap fetches the source as root)", hint="run it with sudo"
        )
    cache = args.cache_dir / "kernel"
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / f"build-{profile.name}.log"
    with logged_to(log_path):
        source = source_for(args, cache)
        request = KernelRequest(profile, source, cache, tuple(args.feature), args.jobs)
        with progress_display(args.json) as show:
            built = build_kernel(request, show)
    if args.output:
        export(built, args.output, tree=args.tree)
    report(built, args.json, log_path)
    return 1 if args.strict and built.misses else 0


@contextmanager
def logged_to(path: Path) -> Iterator[None]:
    """The build log (the kernel's make output is long: it goes there, not to the terminal), named in
    the hint of any error."""
    try:
        with build_log(path):
            yield
    except RastosError as error:
        error.hint = (error.hint + "; " if error.hint else "") + f"log: {path}"
        raise


@contextmanager
def progress_display(as_json: bool) -> Iterator[Callable[[BuildProgress], None]]:
    """A live bar on a terminal; a line every 30 s elsewhere (or a JSON line, with --json)."""
    console = Console(stderr=True)
    if console.is_terminal and not as_json:
        columns = (SpinnerColumn(), TextColumn("compiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"))  # fmt: skip
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("", total=None)

            def on_terminal(progress: BuildProgress) -> None:
                bar.update(task, completed=progress.done, total=progress.total, description=progress.current)

            yield on_terminal
        return
    last = time.monotonic()

    def on_lines(progress: BuildProgress) -> None:
        nonlocal last
        if time.monotonic() - last < 30:
            return
        last = time.monotonic()
        of = f"/{progress.total}" if progress.total else ""
        if as_json:
            print(json.dumps({"event": "kernel-progress", "done": progress.done, "total": progress.total}), flush=True)
        else:
            print(f"compiling: {progress.done}{of} files ({progress.current})", file=sys.stderr, flush=True)

    yield on_lines


def export(built: BuiltKernel, output: Path, *, tree: bool) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for package in built.directory.glob("*.deb"):
        shutil.copy2(package, output / package.name)
    shutil.copy2(built.config_path, output / f"config-{built.release}")
    if tree:
        unpacked = output / "tree"
        shutil.rmtree(unpacked, ignore_errors=True)
        run(["dpkg-deb", "-x", built.package, unpacked])


def report(built: BuiltKernel, as_json: bool, log_path: Path) -> None:
    if as_json:  # one line, the last: progress lines come before it
        result = {"event": "kernel-built", **built.manifest, "directory": str(built.directory),
                  "cached": built.cached, "seconds": round(built.seconds, 1), "log": str(log_path)}  # fmt: skip
        print(json.dumps(result))
        return
    how = "from the cache" if built.cached else f"built in {built.manifest.get('build_seconds')} s"
    print(f"kernel {built.release} ({how}): {built.package}")
    for miss in built.misses:
        print(f"  did not stick: {miss}")
    if not built.misses:
        print("  every option of the profile is in the final configuration")
