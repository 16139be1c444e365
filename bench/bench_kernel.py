"""Benchmark of kernel builds and of booting a built kernel (printed, never asserted).

Measures, on this machine, in one run:
  - a cold build of the `minimal-vm` kernel profile (its own empty kernel cache; Debian's source
    tarball copied in, so the time is unpacking, configuring and compiling, not downloading),
  - the same build again: a cache hit,
  - boots of `minimal` with Debian's kernel and of the same profile with `minimal-vm`, QEMU start to
    the guest's boot report, with the guest's own kernel + initrd time; median of BOOTS each,
    alternating, so a slow spell of the emulator hits both alike.
Run as root: `.venv/bin/python -m bench.bench_kernel` (`--boots N`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from imagebuilder.kernel.source import from_debian
from imagebuilder.vm import VmOptions, running_vm

CHECKOUT = Path(__file__).resolve().parents[1]
SHARED_CACHE = Path("/var/cache/rastos")


def kernel_build(cache: Path) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "imagebuilder", "kernel", "build", "minimal-vm", "--json", "--cache-dir", str(cache)],
        capture_output=True, text=True, cwd=CHECKOUT, check=True,
    )  # fmt: skip
    return time.monotonic() - started, json.loads(result.stdout.splitlines()[-1])


def image(profile: Path | str, out: Path, cache: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "imagebuilder", "build", str(profile), "--json", "--output-dir", str(out),
         "--cache-dir", str(cache)],
        capture_output=True, text=True, cwd=CHECKOUT, check=True,
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    return out / str(manifest["outputs"]["qcow2"]["file"])


async def boot(qcow2: Path, console: Path) -> dict[str, Any]:
    async with running_vm(VmOptions(image=qcow2, snapshot=True), console) as vm:
        report = await vm.wait_ready(600)
        await vm.powerdown()
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    # The source is fetched into the shared cache once (not measured), then copied into a fresh one.
    shared = from_debian("trixie", SHARED_CACHE / "kernel")
    with tempfile.TemporaryDirectory(prefix="rastos-bench-kernel-") as tmp:
        work = Path(tmp)
        fresh = work / "cache" / "kernel" / "debian" / "trixie"
        fresh.mkdir(parents=True)
        for item in (SHARED_CACHE / "kernel" / "debian" / "trixie").glob("*.xz"):
            shutil.copy2(item, fresh / item.name)
        cold, built = kernel_build(work / "cache")
        hit, again = kernel_build(work / "cache")
        assert again["cached"], "the second build is a cache hit"
        tuned = work / "tuned.toml"
        tuned.write_text('extends = "minimal"\n[kernel]\nbuild = "minimal-vm"\n')
        # Both images from the bench's cache: the tuned one takes the kernel just built from there.
        images = {"Debian's kernel": image("minimal", work / "debian", work / "cache"),
                  "minimal-vm": image(tuned, work / "tuned", work / "cache")}  # fmt: skip
        boots: dict[str, list[dict[str, Any]]] = {name: [] for name in images}
        for _ in range(args.boots):
            for name, qcow2 in images.items():
                boots[name].append(asyncio.run(boot(qcow2, work / "console.log")))
        # The build is kept for later image builds (an entry is keyed by its inputs, never by path).
        for part in ("index", "out"):
            shutil.copytree(work / "cache" / "kernel" / part, SHARED_CACHE / "kernel" / part, dirs_exist_ok=True)

    def median(name: str, measure: str) -> float:
        if measure == "kernel":
            return statistics.median(float(r["timestamps"].get("userspace_usec", 0)) / 1e6 for r in boots[name])
        return statistics.median(float(r["host_seconds_to_ready"]) for r in boots[name])

    table = Table(title=f"kernel builds ({shared.origin} {shared.version}, {built['jobs']} jobs)")
    for column in ("measure", "value", "baseline", "ratio"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("minimal-vm, cold build (unpack, configure, compile, package)", f"{cold:.0f} s", "", "")
    table.add_row("  of which make bindeb-pkg", f"{built['build_seconds']:.0f} s", "", "")
    table.add_row(f"  files compiled: {built['objects']}", "", "", "")
    table.add_row("minimal-vm again (cache hit)", f"{hit:.1f} s", f"{cold:.0f} s (cold)", f"{hit / cold:.3f}x")
    for measure, label in (("ready", "QEMU start to boot report"), ("kernel", "guest: kernel + initrd")):
        base, tuned_value = median("Debian's kernel", measure), median("minimal-vm", measure)
        table.add_row(
            f"{label}, minimal-vm (median of {args.boots})",
            f"{tuned_value:.1f} s",
            f"{base:.1f} s (Debian's kernel)",
            f"{tuned_value / base:.2f}x",
        )
    console.print(table)
    for name, reports in boots.items():
        console.print(f"{name}: " + ", ".join(f"{float(r['host_seconds_to_ready']):.1f}" for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
