"""Benchmark of rollback at boot (printed, never asserted).

Measures, on this machine, in one run, on the `minimal` image:
  - what the rollback machinery adds to a boot: the image as built (a counted entry, the health check
    before boot-complete.target, systemd-bless-boot, the trial deadline) against the same disk with
    an uncounted entry and those units masked on the kernel command line, boots interleaved;
  - the time from the first boot of a broken deployment (no init) to the fallback deployment's
    healthy boot report, with the number of tries the firmware started, against one normal boot of
    the same disk measured just before (the baseline).
Run as root: `.venv/bin/python -m bench.bench_rollback [--image QCOW2] [--boots N]`.
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

from daemon.boot import BootEntries
from imagebuilder.vm import VmOptions, running_vm

CHECKOUT = Path(__file__).resolve().parents[1]
TARGET_ADDED = 1.0  # seconds the machinery may add to a boot under TCG
MACHINERY_UNITS = ("rastos-health.service", "systemd-bless-boot.service")


def build_minimal(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "imagebuilder", "build", "minimal", "--json", "--output-dir", str(out)],
        cwd=CHECKOUT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    return out / str(manifest["outputs"]["qcow2"]["file"])


def partitions(raw: Path) -> dict[str, tuple[int, int]]:
    """Partition name -> (byte offset, byte size)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)  # fmt: skip
    return {p["name"]: (p["start"] * 512, p["size"] * 512) for p in table["partitiontable"]["partitions"]}


@contextlib.contextmanager
def mounted(raw: Path, partition: str, options: str = "") -> Iterator[Path]:
    offset, size = partitions(raw)[partition]
    with tempfile.TemporaryDirectory(prefix="rastos-bench-mnt-") as where:
        flags = f"loop,offset={offset},sizelimit={size}" + (f",{options}" if options else "")
        subprocess.run(["mount", "-o", flags, str(raw), where], check=True)
        try:
            yield Path(where)
        finally:
            subprocess.run(["umount", where], check=True)


@contextlib.contextmanager
def esp_copy(raw: Path) -> Iterator[Path]:
    """The ESP's boot entries in a scratch directory laid out like an ESP, written back afterwards
    (through mtools: this host's kernel may have no vfat)."""
    offset, _ = partitions(raw)["esp"]
    image = f"{raw}@@{offset}"
    with tempfile.TemporaryDirectory(prefix="rastos-bench-esp-") as scratch:
        esp = Path(scratch)
        (esp / "loader").mkdir()
        subprocess.run(["mcopy", "-s", "-i", image, "::/loader/entries", str(esp / "loader")], check=True)
        yield esp
        subprocess.run(["mdeltree", "-i", image, "::/loader/entries"], check=True)
        subprocess.run(["mcopy", "-s", "-i", image, str(esp / "loader" / "entries"), "::/loader/"], check=True)


def without_machinery(raw: Path) -> None:
    """The image's entry, uncounted and with the rollback units masked: a boot without the machinery."""
    with esp_copy(raw) as esp:
        entries = esp / "loader" / "entries"
        (counted,) = entries.glob("rastos-0*.conf")
        masks = " ".join(f"systemd.mask={unit}" for unit in MACHINERY_UNITS)
        text = "".join(line + (f" {masks}" if line.startswith("options ") else "") + "\n"
                       for line in counted.read_text().splitlines())  # fmt: skip
        counted.unlink()
        (entries / "rastos-0.conf").write_text(text)


def break_a_new_deployment(raw: Path) -> None:
    """What `Rollback()` makes, done offline: snapshot 1 of @, its writable deployment with no init, and
    its counted entry ordered first (the daemon's own BootEntries writes it)."""
    import btrfsutil

    with mounted(raw, "root-x86-64", "subvolid=5") as top:
        (top / "@snapshots" / "1").mkdir()
        btrfsutil.create_snapshot(top / "@", top / "@snapshots/1/snapshot", read_only=True)
        deployment = top / "@snapshots/1/deployment"
        btrfsutil.create_snapshot(top / "@snapshots/1/snapshot", deployment)
        for init in ("usr/lib/systemd/systemd", "usr/sbin/init"):
            (deployment / init).unlink(missing_ok=True)
    with esp_copy(raw) as esp:
        entries = BootEntries(esp, tries=3)
        entries.add_for_snapshot(1, "broken on purpose", "@snapshots/1/deployment", "@", time.time())


async def boot_report(image: Path, console: Path) -> dict[str, Any]:
    async with running_vm(VmOptions(image=image), console) as vm:
        started = time.monotonic()
        report = await vm.wait_ready(1800)
        report["host_seconds"] = time.monotonic() - started
        await vm.diagnostics()
        await vm.powerdown()
        return report


def seconds(report: dict[str, Any]) -> float:
    """The guest's boot, kernel start to boot finished (boot-complete and blessing included)."""
    return float(report["timestamps"]["finish_usec"]) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", type=Path, help="a built minimal qcow2 (default: build one)")
    parser.add_argument("--boots", type=int, default=3, help="boots of each variant (default 3)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="rastos-bench-") as tmp:
        work = Path(tmp)
        image = args.image or build_minimal(work / "out")
        with_raw, without_raw = work / "with.raw", work / "without.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(with_raw)], check=True)
        shutil.copyfile(with_raw, without_raw)
        without_machinery(without_raw)
        pristine = work / "pristine.raw"
        shutil.copyfile(with_raw, pristine)
        on: list[float] = []
        off: list[float] = []
        for n in range(args.boots):
            # Each pair on fresh copies, interleaved: emulation speed drifts over minutes.
            for source, results in ((pristine, on), (without_raw, off)):
                disk = work / f"boot-{n}.raw"
                shutil.copyfile(source, disk)
                report = asyncio.run(boot_report(disk, work / "console.log"))
                results.append(seconds(report))
                disk.unlink()
                disk.with_name(disk.name + ".efivars").unlink(missing_ok=True)
        # Fallback: a normal first boot (blesses the image's entry; the baseline), then a broken
        # deployment ordered first, booted until the firmware falls back to the image's entry.
        fallback_disk = work / "fallback.raw"
        shutil.copyfile(pristine, fallback_disk)
        normal = asyncio.run(boot_report(fallback_disk, work / "normal-console.log"))
        break_a_new_deployment(fallback_disk)
        fallen = asyncio.run(boot_report(fallback_disk, work / "fallback-console.log"))
        tries = (work / "fallback-console.log").read_bytes().count(b"BdsDxe: starting")
        state = fallen.get("daemon", {}).get("boot_state", {})

    added = statistics.median(on) - statistics.median(off)
    table = Table(title="rollback at boot, profile minimal (TCG)")
    for column in ("measure", "value", "target", "baseline", "ratio"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "boot with the machinery (median)",
        f"{statistics.median(on):.1f} s",
        "",
        f"{statistics.median(off):.1f} s without it",
        f"{statistics.median(on) / statistics.median(off):.2f}x",
    )
    table.add_row("added by the machinery", f"{added:+.1f} s", f"<= {TARGET_ADDED:.0f} s", "", "")
    table.add_row(
        "first failed boot to healthy fallback",
        f"{fallen['host_seconds']:.1f} s",
        "",
        f"{normal['host_seconds']:.1f} s (one normal boot)",
        f"{fallen['host_seconds'] / normal['host_seconds']:.2f}x",
    )
    console.print(table)
    console.print(f"boots with: {', '.join(f'{s:.1f}' for s in on)}; without: {', '.join(f'{s:.1f}' for s in off)}")
    console.print(
        f"fallback: {tries} firmware starts (3 tries + the fallback), then BootState kind={state.get('kind')} "
        f"failed_entry={state.get('failed_entry')} health={state.get('health')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
