"""Benchmark of the hubs' bus (hub/bus.py; printed, never asserted): how soon a change one hub writes
reaches another, woken by NOTIFY or polling the table, on a private PostgreSQL server on this machine.

Two `Bus` objects, as two hub processes hold them: one writes a row (one change) and commits, the other
reads it, either as soon as the NOTIFY wakes it or at its next poll. The latency is from just before
the write to the row read. A poll costs a query per interval per hub whether anything changed or not.

    .venv/bin/python -m bench.bench_bus --samples 200
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from hub.bus import Bus
from hub.store import database_url, migrate
from tests.hub_fixtures import postgresql_server

PAUSE = 0.02  # seconds between two writes, at a random phase against a poll


async def measure(url: str, samples: int, interval: float | None) -> list[float]:
    """Latencies in ms: woken by NOTIFY (interval None), or polling every `interval` seconds on a
    clock of its own, as a hub would, while the writes come at random moments."""
    writer, reader = Bus(url), Bus(url)
    await writer.start()
    await reader.start()
    began: dict[int, float] = {}
    latencies: list[float] = []
    seen = await reader.last()

    async def read() -> None:
        nonlocal seen
        while len(latencies) < samples:
            if interval is None:
                await reader.woken.wait()
                reader.woken.clear()
            else:
                await asyncio.sleep(interval)
            for row_id, _origin, body in await reader.read(seen):
                seen = row_id
                latencies.append((time.perf_counter() - began[body["n"]]) * 1000)

    reading = asyncio.create_task(read())
    try:
        for n in range(samples):
            await asyncio.sleep(PAUSE + random.random() * (interval or PAUSE))
            began[n] = time.perf_counter()
            await writer.write([{"kind": "change", "n": n}])
        await asyncio.wait_for(reading, 30)
    finally:
        reading.cancel()
        await writer.close()
        await reader.close()
    return latencies


async def turns(url: str, samples: int) -> list[float]:
    """Milliseconds of one turn of the shared lock as a change takes it: lock, read the others' rows,
    write this one's with its NOTIFY, note the newest id, unlock. The hubs' changes are serial: this
    bounds how many a second they make together."""
    bus = Bus(url)
    await bus.start()
    seen = await bus.last()
    took: list[float] = []
    try:
        for _ in range(samples):
            began = time.perf_counter()
            await bus.lock()
            await bus.read(seen)
            await bus.write([{"kind": "change", "n": 0}])
            seen = await bus.last()
            await bus.unlock()
            took.append((time.perf_counter() - began) * 1000)
    finally:
        await bus.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with postgresql_server() as server:
        url = database_url(server)
        migrate(url)
        for name, interval in (("NOTIFY", None), ("poll 50 ms", 0.05), ("poll 250 ms", 0.25), ("poll 1 s", 1.0)):
            found = sorted(asyncio.run(measure(url, args.samples if interval is None else args.samples // 4, interval)))
            p50, p99 = statistics.median(found), found[min(len(found) - 1, int(len(found) * 0.99))]
            cost = "on change only" if interval is None else f"{1 / interval:.0f} queries/s per hub, idle or not"
            print(f"{name:12} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max {found[-1]:7.1f} ms  ({cost})")
        took = sorted(asyncio.run(turns(url, args.samples)))
        p50 = statistics.median(took)
        print(f"a turn of the lock: p50 {p50:.1f} ms, p99 {took[int(len(took) * 0.99)]:.1f} ms "
              f"(at most {1000 / p50:.0f} changes a second, all hubs together)")  # fmt: skip


if __name__ == "__main__":
    main()
