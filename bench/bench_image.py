"""Benchmark of the image builder and the boot (printed, never asserted).

Measures, on this machine, in one run:
  - cold build of `minimal` (empty cache: mmdebstrap downloads everything),
  - warm rebuild after a late-stage change (a sysctl),
  - qcow2 size, and the size of its update bundle (the root's send stream, kernel and initrd),
  - QEMU start to rastosd answering the boot's first call to it, and to the boot report (the whole
    boot finished), with the guest's own breakdown and where its CPU time went,
and baselines measured in the same run: a bare mmdebstrap of the same package set, the part of a
cold build no builder can avoid; OVMF alone, how fast this machine emulates at the time; and mkosi's
smallest bootable trixie image, its cold build and QEMU start to its login prompt, booted in turn
with rastOS's image (bench/mkosi_baseline.py). Run as root: `.venv/bin/python -m bench.bench_image`
(`--boots N`, `--without-mkosi`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import mkosi_baseline
from bench.serial import seconds_until
from imagebuilder.profile import load_profile
from imagebuilder.stages.bootstrap import package_set
from imagebuilder.vm import (
    DEFAULT_MEMORY,
    QEMU,
    Firmware,
    VmOptions,
    choose_accel,
    default_cpus,
    find_firmware,
    machine_args,
    running_vm,
)

CHECKOUT = Path(__file__).resolve().parents[1]
BOOTS = 5
TARGETS = {"cold": 60.0, "warm": 8.0, "qcow2_mb": 400.0, "daemon": 12.0, "boot": 15.0, "rss_mb": 30.0}


def timed_build(profile: Path | str, out: Path, cache: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "imagebuilder", "build", str(profile), "--json",
         "--output-dir", str(out), "--cache-dir", str(cache)],
        cwd=CHECKOUT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - started


def bare_mmdebstrap(target: Path) -> float:
    profile = load_profile("minimal")
    started = time.monotonic()
    subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(package_set(profile))}",
         profile.distribution.suite, str(target), profile.distribution.mirror],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - started


@contextlib.contextmanager
def fresh_vars(firmware: Firmware) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        vars_file = Path(tmp) / "vars.fd"
        shutil.copyfile(firmware.vars_template, vars_file)
        yield vars_file


def firmware_seconds(firmware: Firmware, accel: str) -> float:
    """QEMU start to OVMF's boot manager (its first console line): pure firmware on the same machine,
    so the ratio of a boot to it cancels out how fast this machine emulates today."""
    with fresh_vars(firmware) as vars_file:
        machine = machine_args(
            accel=accel, cpus=default_cpus(), memory=DEFAULT_MEMORY, firmware=firmware, vars_file=vars_file
        )
        return seconds_until([QEMU, *machine, "-serial", "stdio"], b"BdsDxe", 120)


def mkosi_login_seconds(image: Path, firmware: Firmware, accel: str) -> float:
    """QEMU start to the login prompt of mkosi's image, on rastOS's machine."""
    with fresh_vars(firmware) as vars_file:
        argv = mkosi_baseline.boot_argv(image, accel=accel, firmware=firmware, vars_file=vars_file)
        return seconds_until(argv, b"login: ", 600)


async def boot(image: Path, console: Path) -> dict[str, Any]:
    async with running_vm(VmOptions(image=image, snapshot=True), console) as vm:
        report = await vm.wait_ready(600)
        report["accel"] = vm.accel
        report.update(await vm.diagnostics())
        await vm.powerdown()
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=BOOTS, help=f"boots to take the median of (default {BOOTS})")
    parser.add_argument(
        "--without-mkosi", action="store_true", help="leave out mkosi's build and boots (about 5 minutes)"
    )
    args = parser.parse_args()
    boots = args.boots
    # Wide enough for the table's rows even when the output goes to a file (rich takes 80 there).
    console = Console(width=max(Console().width, 140))
    firmware = find_firmware()
    accel = choose_accel("auto", firmware)
    mirror = load_profile("minimal").distribution.mirror
    mkosi_build: float | None = None
    mkosi_logins: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rastos-bench-") as tmp:
        work = Path(tmp)
        baseline = bare_mmdebstrap(work / "baseline.tar")
        cold = timed_build("minimal", work / "out", work / "cache")
        tuned = work / "tuned.toml"
        tuned.write_text('extends = "minimal"\n[kernel.sysctl]\n"vm.swappiness" = 7\n')
        warm = timed_build(tuned, work / "out-warm", work / "cache")
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        qcow2 = work / "out" / manifest["outputs"]["qcow2"]["file"]
        qcow2_mb = qcow2.stat().st_size / 1e6
        bundle_mb = manifest["outputs"]["bundle"]["size"] / 1e6
        mkosi_image = None
        if not args.without_mkosi:
            mkosi_baseline.tools_tree(work / "mkosi-tools", mirror)
            mkosi_build, mkosi_image = mkosi_baseline.build(work / "mkosi-tools", mirror)
        # Emulation speed on this machine varies by up to a factor of two over an hour: take the
        # median of several boots, each beside a firmware-only run and a boot of mkosi's image
        # measured in turn with it, so a slow spell hits all three alike.
        reports = []
        for _ in range(boots):
            firmware_alone = firmware_seconds(firmware, accel)
            report = asyncio.run(boot(qcow2, work / "console.log"))
            report["firmware_baseline"] = firmware_alone
            reports.append(report)
            if mkosi_image is not None:
                mkosi_logins.append(mkosi_login_seconds(mkosi_image, firmware, accel))
        reports.sort(key=lambda r: float(r["host_seconds_to_daemon"]))
    report = reports[len(reports) // 2]
    stamps = report["timestamps"]
    # Each measure's own median; the breakdowns below are those of the boot that was the median
    # to rastosd's answer (the upper of the two middle ones for an even number of boots).
    to_daemon = statistics.median(float(r["host_seconds_to_daemon"]) for r in reports)
    to_ready = statistics.median(float(r["host_seconds_to_ready"]) for r in reports)
    all_ready = ", ".join(f"{seconds:.1f}" for seconds in sorted(float(r["host_seconds_to_ready"]) for r in reports))
    all_boots = ", ".join(f"{float(r['host_seconds_to_daemon']):.1f}" for r in reports)

    table = Table(title=f"rastos-image, profile minimal ({report['accel']})")
    for column in ("measure", "value", "target", "baseline", "ratio"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row(
        "cold build",
        f"{cold:.1f} s",
        f"<= {TARGETS['cold']:.0f} s",
        f"{baseline:.1f} s (bare mmdebstrap)",
        f"{cold / baseline:.2f}x",
    )
    if mkosi_build is not None:
        table.add_row(
            "  against mkosi's cold build of its image",
            f"{cold:.1f} s",
            "",
            f"{mkosi_build:.1f} s (mkosi)",
            f"{cold / mkosi_build:.2f}x",
        )
    table.add_row(
        "warm rebuild (sysctl changed)",
        f"{warm:.1f} s",
        f"<= {TARGETS['warm']:.0f} s",
        f"{cold:.1f} s (cold build)",
        f"{warm / cold:.2f}x",
    )
    table.add_row("qcow2 size", f"{qcow2_mb:.0f} MB", f"<= {TARGETS['qcow2_mb']:.0f} MB", "", "")
    ratio = f"{bundle_mb / qcow2_mb:.2f}x"
    table.add_row("update bundle size", f"{bundle_mb:.0f} MB", "", f"{qcow2_mb:.0f} MB (qcow2)", ratio)
    firmware_alone = float(report["firmware_baseline"])
    table.add_row(
        f"QEMU start to rastosd answering (median of {boots}: {all_boots})",
        f"{to_daemon:.1f} s",
        f"<= {TARGETS['daemon']:.0f} s",
        f"{firmware_alone:.1f} s (OVMF alone)",
        f"{to_daemon / firmware_alone:.1f}x",
    )
    mkosi_login = statistics.median(mkosi_logins) if mkosi_logins else None
    table.add_row(
        f"  QEMU start to the boot report, the whole boot finished (median: {all_ready})",
        f"{to_ready:.1f} s",
        f"<= {TARGETS['boot']:.0f} s",
        f"{mkosi_login:.1f} s (mkosi's image to login)" if mkosi_login is not None else "",
        f"{to_ready / mkosi_login:.2f}x" if mkosi_login is not None else "",
    )
    table.add_row(
        "  QEMU start to multi-user.target", f"{float(report['host_seconds_to_multi_user']):.1f} s", "", "", ""
    )
    table.add_row(
        "  QEMU start to the kernel (OVMF, systemd-boot)",
        f"{float(report['host_seconds_to_kernel']):.1f} s",
        "",
        "",
        "",
    )
    userspace = stamps.get("userspace_usec", 0) / 1e6
    finish = stamps.get("finish_usec", 0) / 1e6
    table.add_row("  guest: kernel + initrd", f"{userspace:.1f} s", "", "", "")
    table.add_row("  guest: userspace to multi-user", f"{finish - userspace:.1f} s", "", "", "")
    if mkosi_login is not None:
        logins = ", ".join(f"{seconds:.1f}" for seconds in sorted(mkosi_logins))
        measure = f"mkosi's image: QEMU start to its login prompt (median of {boots}: {logins})"
        table.add_row(measure, f"{mkosi_login:.1f} s", "", "", "")
    rss = [int(r.get("daemon", {}).get("rss_kb", 0)) / 1024 for r in reports]
    table.add_row(
        f"rastosd idle RSS in the guest (each boot: {', '.join(f'{mb:.1f}' for mb in rss)})",
        f"{statistics.median(rss):.1f} MB",
        f"<= {TARGETS['rss_mb']:.0f} MB",
        "",
        "",
    )
    console.print(table)
    console.print("slowest units (median boot):", *report.get("slowest_units", []), sep="\n  ")
    console.print("critical chain (median boot):", *report.get("critical_chain", []), sep="\n  ")
    console.print("CPU time by unit (median boot):", *report.get("cpu_by_unit", []), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
