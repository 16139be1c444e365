"""Benchmark of rastosd (printed, never asserted).

Measures the real daemon on a private system-like bus with its root on btrfs on a loop file:
  - idle RSS after start and a round of calls,
  - p50 and p99 of a property Get (Manager.Version) and of ListOps(), from an sdbus client,
  - snapshot creation through Snapshots.Create(), and what the same snapshot costs by itself,
  - ListJobs() with 1,000 stored jobs (each asked for a 16 KiB motd, its result holds the diff), called
    by 8 clients at once, beside ListOps() called the same way: a read anyone may call must not cost
    more because of what the stored jobs hold,
  - the shipped units' sandboxes as `systemd-analyze security --offline` rates them,
with baselines from the same run: the bus driver's own GetId() (dbus-daemon, in C: the floor of any
round trip on this bus), btrfsutil.create_snapshot() called directly (the floor of a snapshot) and
rastosd's unit without its sandbox.
Run as root: `.venv/bin/python -m bench.bench_daemon`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import btrfsutil
from rich.console import Console
from rich.table import Table
from sdbus import sd_bus_open_system

from daemon.bus.interfaces import BUS_NAME, ROOT_PATH, BusDriver, ManagerInterface, SnapshotsInterface
from daemon.store import StateStore
from tests.daemon_fixtures import STRICT_POLICY, Rastosd, private_bus, scratch_root
from tests.test_units_security import BOUNDS, UNITS, exposure, without_sandbox

CALLS = 2000
SNAPSHOTS = 30
STORED_JOBS = 1000
CLIENTS = 8
CLIENT_CALLS = 500
TARGETS = {"rss_mb": 30.0, "p50_ms": 0.5, "snapshot_ms": 50.0}


async def latencies(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    for _ in range(50):  # warm up: first calls pay for match rules, caches, page faults
        await call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(address: str, daemon: Rastosd) -> dict[str, Any]:
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    bus = sd_bus_open_system()
    manager = ManagerInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
    snapshots = SnapshotsInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
    driver = BusDriver.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", bus)

    async def get_version() -> str:
        return await manager.version

    results: dict[str, Any] = {
        "driver": await latencies(driver.get_id, CALLS),
        "get": await latencies(get_version, CALLS),
        "list_ops": await latencies(manager.list_ops, CALLS),
    }
    assert daemon.process is not None
    results["rss_mb"] = rss_mb(daemon.process.pid)
    creates = []
    for number in range(SNAPSHOTS):
        started = time.perf_counter()
        await snapshots.create_snapshot(f"bench {number}")
        creates.append((time.perf_counter() - started) * 1000)
    results["create"] = creates
    return results


def store_jobs(state_dir: Path) -> None:
    """What 1,000 applies of a 16 KiB motd leave in the store, written before the daemon starts."""
    store = StateStore(state_dir / "state.db")
    text = "".join(f"line {n:05d} of the message of the day\n" for n in range(16384 // 38))
    diff = "".join(f"+{line}\n" for line in text.splitlines())
    for _ in range(STORED_JOBS):
        job_id = store.add_job("apply", [{"op": "motd", "params": {"text": text}}], 0, 0, "Apply")
        changes = [{"subject": "/etc/motd", "action": "create", "detail": diff}]
        store.set_job_state(job_id, "done", {"state": "done", "steps": [{"op": "motd", "changes": changes}]})
    store.close()


def client_latencies(address: str, method: str) -> list[float]:
    """One client process: its own connection, CLIENT_CALLS calls one after the other."""
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    manager = ManagerInterface.new_proxy(BUS_NAME, ROOT_PATH, sd_bus_open_system())
    return asyncio.run(latencies(getattr(manager, method), CLIENT_CALLS))


def concurrent_latencies(address: str, method: str) -> list[float]:
    with multiprocessing.get_context("spawn").Pool(CLIENTS) as pool:
        per_client = pool.starmap(client_latencies, [(address, method)] * CLIENTS)
    return [latency for client in per_client for latency in client]


def direct_snapshots(root: Path, directory: Path) -> list[float]:
    times = []
    for number in range(SNAPSHOTS):
        started = time.perf_counter()
        btrfsutil.create_snapshot(root, directory / f"direct-{number}", read_only=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    if os.geteuid() != 0:
        print("bench_daemon: run as root (loop devices, a private bus)")
        return 1
    with (
        tempfile.TemporaryDirectory() as scratch_dir,
        private_bus(STRICT_POLICY) as bus,
        scratch_root(Path(scratch_dir), "1G") as scratch,
    ):
        store_jobs(Path(scratch_dir) / "state")
        daemon = Rastosd(bus, scratch, Path(scratch_dir) / "state")
        daemon.start()
        try:
            results = asyncio.run(measure(bus.address, daemon))
            for method in ("list_ops", "list_jobs"):
                results[f"{method}_concurrent"] = concurrent_latencies(bus.address, method)
        finally:
            daemon.stop()
        (scratch.top / "direct").mkdir()
        direct = direct_snapshots(scratch.root, scratch.top / "direct")

    table = Table(title=f"rastosd on a private bus ({CALLS} calls each, {SNAPSHOTS} snapshots)")
    for column in ("measure", "p50", "p99", "target", "vs baseline"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    driver_p50 = statistics.median(results["driver"])
    driver_p99 = percentile(results["driver"], 0.99)
    table.add_row("baseline: bus driver GetId()", f"{driver_p50:.3f} ms", f"{driver_p99:.3f} ms", "", "1.0x")
    for key, label in (("get", "Get Manager.Version"), ("list_ops", "ListOps()")):
        p50 = statistics.median(results[key])
        table.add_row(label, f"{p50:.3f} ms", f"{percentile(results[key], 0.99):.3f} ms",
                      f"p50 <= {TARGETS['p50_ms']} ms", f"{p50 / driver_p50:.1f}x")  # fmt: skip
    direct_p50 = statistics.median(direct)
    create_p50 = statistics.median(results["create"])
    table.add_row(
        "baseline: btrfsutil snapshot", f"{direct_p50:.1f} ms", f"{percentile(direct, 0.99):.1f} ms", "", "1.0x"
    )
    table.add_row("Snapshots.Create()", f"{create_p50:.1f} ms", f"{percentile(results['create'], 0.99):.1f} ms",
                  f"<= {TARGETS['snapshot_ms']:.0f} ms", f"{create_p50 / direct_p50:.1f}x")  # fmt: skip
    table.add_row("idle RSS of rastosd", f"{results['rss_mb']:.1f} MB", "", f"<= {TARGETS['rss_mb']:.0f} MB", "")
    Console().print(table)

    reads = Table(title=f"{CLIENTS} clients at once, {CLIENT_CALLS} calls each; {STORED_JOBS} jobs stored")
    for column in ("measure", "p50", "p99", "vs ListOps()"):
        reads.add_column(column, justify="left" if column == "measure" else "right")
    baseline = statistics.median(results["list_ops_concurrent"])
    for key, label in (("list_ops_concurrent", "baseline: ListOps()"), ("list_jobs_concurrent", "ListJobs()")):
        p50 = statistics.median(results[key])
        reads.add_row(label, f"{p50:.2f} ms", f"{percentile(results[key], 0.99):.2f} ms", f"{p50 / baseline:.1f}x")
    Console().print(reads)
    Console().print(sandbox_ratings())
    return 0


def sandbox_ratings() -> Table:
    """systemd-analyze's exposure of each shipped unit (0 best, 10 worst; deterministic, so the bound is
    a test: tests/test_units_security.py), beside rastosd's unit without its sandbox."""
    table = Table(title="the units' sandboxes: systemd-analyze security --offline (this host's systemd)")
    for column in ("unit", "exposure", "bound", "vs no sandbox"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    with tempfile.TemporaryDirectory() as folder:
        bare = exposure(without_sandbox(UNITS / "rastosd.service", Path(folder)))
    table.add_row("baseline: rastosd.service without its sandbox", f"{bare:.1f}", "", "1.00x")
    for name, bound in sorted(BOUNDS.items()):
        rated = exposure(UNITS / name)
        table.add_row(name, f"{rated:.1f}", f"<= {bound:.1f}", f"{rated / bare:.2f}x")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
