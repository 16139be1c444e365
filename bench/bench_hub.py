"""Benchmark of rastos-hub (printed, never asserted): how many agents one hub holds on this machine.

Simulated agents speak the real protocol to a real `rastos-hub serve` process: each connects with its
own host token, takes its welcome, sends its facts, then every INTERVAL seconds (at a random phase)
an event and new facts, as a daemon does after a job. A UI client follows /api/v1/stream; the delta
latency is the time from an agent sending a fact change to the UI receiving the host's delta (both
clocks are this machine's). For each fleet size: p50/p99 of that latency, the hub's RSS per agent,
and its CPU share. The baseline, measured in the same run, is the same latency with one agent.

    .venv/bin/python -m bench.bench_hub --agents 1,100,1000,5000 --interval 30 --seconds 60

Simulated agents and the UI run in this process, the hub in its own: on two cores they compete for
CPU, so the figures are a floor for what the hub holds on a machine of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from tests.hub_fixtures import Hub

GOAL_AGENTS = 5000
GOAL_P99_MS = 1000.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class Agent:
    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token
        self.event_id = 0
        self.socket: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self, session: aiohttp.ClientSession, url: str) -> None:
        self.socket = await session.ws_connect(url, headers={"Authorization": f"Bearer {self.token}"}, heartbeat=60)
        welcome = await self.socket.receive_json()
        self.event_id = welcome["last_event"]
        await self.report("up")

    async def report(self, marker: str) -> None:
        assert self.socket is not None
        self.event_id += 1
        event = {"id": self.event_id, "time": time.time(), "uid": 0, "method": "Apply", "job": None, "detail": {}}
        await self.socket.send_json({"type": "events", "events": [event]})
        facts = {"hostname": f"{self.name}-{marker}", "version": "bench", "boot_state": {"health": "good"}}
        await self.socket.send_json({"type": "facts", "facts": facts})

    async def live(self, interval: float, sent: dict[str, float], stop: asyncio.Event) -> None:
        assert self.socket is not None
        reader = asyncio.create_task(self._drain())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(0, interval))
        while not stop.is_set():
            marker = f"{time.monotonic_ns()}"
            sent[f"{self.name}-{marker}"] = time.monotonic()
            await self.report(marker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        reader.cancel()

    async def _drain(self) -> None:  # acks
        assert self.socket is not None
        async for _ in self.socket:
            pass


async def ui_latencies(hub: Hub, sent: dict[str, float], seen: list[float], stop: asyncio.Event) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{hub.url}/api/v1/stream", headers={"Authorization": f"Bearer {hub.admin_token}"},
                           max_msg_size=0) as socket,
    ):  # fmt: skip
        while not stop.is_set():
            try:
                message = await socket.receive_json(timeout=1)
            except TimeoutError:
                continue
            if message["type"] == "delta" and message["change"]["kind"] == "host":
                hostname = (message["change"]["host"].get("facts") or {}).get("hostname", "")
                if (start := sent.pop(hostname, None)) is not None:
                    seen.append((time.monotonic() - start) * 1000)


async def measure(hub: Hub, tokens: dict[str, str], interval: float, seconds: float) -> dict[str, Any]:
    assert hub.process is not None
    pid = hub.process.pid
    idle_rss = rss_mb(pid)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        agents = [Agent(name, token) for name, token in tokens.items()]
        started = time.monotonic()
        for start in range(0, len(agents), 200):  # connect in waves, as a fleet after a hub restart would
            await asyncio.gather(*(a.connect(session, hub.agent_url) for a in agents[start : start + 200]))
        connect_seconds = time.monotonic() - started
        sent: dict[str, float] = {}
        seen: list[float] = []
        stop = asyncio.Event()
        ui = asyncio.create_task(ui_latencies(hub, sent, seen, stop))
        await asyncio.sleep(1)
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        own_before = time.process_time()
        lives = [asyncio.create_task(a.live(interval, sent, stop)) for a in agents]
        await asyncio.sleep(seconds)
        stop.set()
        wall = time.monotonic() - wall_before
        cpu = (cpu_seconds(pid) - cpu_before) / wall
        own_cpu = (time.process_time() - own_before) / wall
        await asyncio.gather(*lives, return_exceptions=True)
        deadline = time.monotonic() + 10  # changes sent just before the stop may still be on their way
        while sent and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ui.cancel()
        rss = rss_mb(pid)
        for agent in agents:
            if agent.socket is not None:
                await agent.socket.close()
    return {
        "agents": len(agents), "connect_s": connect_seconds, "changes": len(seen) + len(sent), "lost": len(sent),
        "p50_ms": percentile(seen, 0.5), "p90_ms": percentile(seen, 0.9), "p99_ms": percentile(seen, 0.99),
        "max_ms": max(seen, default=float("nan")), "own_cpu": own_cpu,
        "mean_ms": statistics.fmean(seen) if seen else float("nan"),
        "rss_mb": rss, "kb_per_agent": (rss - idle_rss) * 1024 / max(1, len(agents)), "cpu": cpu,
    }  # fmt: skip


def add_hosts(hub: Hub, count: int, prefix: str) -> dict[str, str]:
    return {f"{prefix}{n}": hub.api("POST", "/api/v1/hosts", {"name": f"{prefix}{n}"})["token"] for n in range(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="1,100,1000", help="fleet sizes, comma-separated (default 1,100,1000)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between one agent's changes")
    parser.add_argument("--seconds", type=float, default=40.0, help="measuring time per fleet size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.agents.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(sizes) + 1024)), hard))
    console = Console(width=140)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rastos-bench-hub-") as tmp:
        for size in sizes:
            hub = Hub(Path(tmp) / f"hub-{size}")
            hub.directory.mkdir()
            created = hub.cli("admin", "add", "bench")
            hub.admin_token = created.stdout.strip().splitlines()[-1]
            hub.start()
            try:
                started = time.monotonic()
                tokens = add_hosts(hub, size, "agent-")
                console.print(f"{size} hosts added in {time.monotonic() - started:.1f}s; measuring {args.seconds:.0f}s")
                rows.append(asyncio.run(measure(hub, tokens, args.interval, args.seconds)))
            finally:
                hub.stop()
                for line in hub.log.read_text().splitlines():
                    if "WARNING" in line or "ERROR" in line:
                        console.print(f"  hub: {line}", markup=False)
    baseline = rows[0]["p99_ms"] if rows else float("nan")
    table = Table(title=f"rastos-hub: delta latency agent -> UI (one change per agent every {args.interval:.0f}s)")
    for column in ("agents", "conn s", "changes", "lost", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99/base",
                   "RSS MB", "KB/agent", "hub CPU", "sim CPU"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["agents"]), f"{row['connect_s']:.1f}", str(row["changes"]), str(row["lost"]),
            f"{row['p50_ms']:.1f}", f"{row['p90_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['max_ms']:.0f}",
            f"{row['p99_ms'] / baseline:.1f}x", f"{row['rss_mb']:.0f}", f"{row['kb_per_agent']:.0f}",
            f"{row['cpu'] * 100:.0f}%", f"{row['own_cpu'] * 100:.0f}%",
        )  # fmt: skip
    console.print(table)
    held = [row["agents"] for row in rows if row["p99_ms"] <= GOAL_P99_MS and row["lost"] == 0]
    console.print(f"largest fleet with p99 <= {GOAL_P99_MS:.0f} ms: {max(held) if held else 0} (goal {GOAL_AGENTS})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
