"""Benchmark of rastos-hub (printed, never asserted): how many agents a hub setup holds on this machine.

Simulated agents speak the real protocol to real `rastos-hub serve` processes: each connects with its
own host token, takes its welcome, sends its facts, then every INTERVAL seconds (at a random phase)
an event and new facts, as a daemon does after a job. Each setup is measured at the same load:

- `sqlite`: one hub process on an SQLite file, as the single-hub default;
- `pg1`, `pg2`: one or two hub processes on one PostgreSQL database (hub/bus.py), on a private
  PostgreSQL server the benchmark starts in a scratch directory, as the tests do. The agents are split
  between the hubs, agent n on hub n mod 2.

A UI client on each hub follows /api/v1/stream; the delta latency is the time from an agent sending a
fact change to that UI receiving the host's delta (both clocks are this machine's). It is counted
same-hub when the agent is connected to the UI's hub, cross-hub otherwise (the change then went over
the bus: a row written under the shared lock, a NOTIFY, the other hub's read). For each setup and
fleet size: connect time and failures, p50/p99 of both latencies, the hubs' RSS per agent and CPU,
PostgreSQL's CPU (the server and every backend) and its connections (pg_stat_activity). The baseline,
measured in the same run, is the same latency with one agent on one SQLite hub.

    .venv/bin/python -m bench.bench_hub --agents 1,1000,5000 --setups sqlite,pg2 --interval 30 --seconds 60

Simulated agents and UIs run in this process, the hubs and PostgreSQL in theirs: on two cores they all
compete for CPU (the `sim CPU` column is this process's share), so the figures are a floor for what
the hubs hold on machines of their own, and two hubs cannot show horizontal scaling here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from tests.hub_fixtures import Hub, postgresql_server

GOAL_AGENTS = 5000
GOAL_P99_MS = 1000.0
START_TIMEOUT = 600.0  # seconds: a hub reads every host's recent events at its start (over 30 s for 10,000)
WAVE = 200  # agents connecting at once, as a fleet after a hub restart would
SETUPS = {"sqlite": ("sqlite", 1), "pg1": ("postgresql", 1), "pg2": ("postgresql", 2)}


def proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime (and with `children`, of its children reaped), in clock ticks of 1/100 s."""
    fields = proc_stat(pid)
    return sum(int(value) for value in fields[11 : 15 if children else 13]) / 100


def postgresql_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, the backends it reaped, and those alive."""
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit() and int(proc_stat(int(entry.name))[1]) == postmaster:
                total += cpu_seconds(int(entry.name))
    return total


def postmaster_of(url: str) -> int:
    directory = parse_qs(urlparse(url).query)["host"][0]
    return int((Path(directory) / "data" / "postmaster.pid").read_text().split()[0])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


@dataclass
class Sent:
    """The changes agents sent: when, from which hub's agent; and which each UI has seen."""

    started: dict[str, tuple[float, int]] = field(default_factory=dict)  # hostname -> (time, hub index)
    seen: list[set[str]] = field(default_factory=list)  # per UI

    def unseen(self) -> int:
        return sum(len(self.started) - len(seen) for seen in self.seen)


class Agent:
    def __init__(self, name: str, token: str, hub: int) -> None:
        self.name = name
        self.token = token
        self.hub = hub  # its index among the setup's hubs
        self.event_id = 0
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None

    async def connect(self, session: aiohttp.ClientSession, url: str) -> None:
        self.socket = await session.ws_connect(url, headers={"Authorization": f"Bearer {self.token}"}, heartbeat=60)
        welcome = await self.socket.receive_json(timeout=60)
        self.event_id = welcome["last_event"]
        # Read from now on: the hub's pings want their pongs while the rest of the fleet connects
        # (a socket left unread for its heartbeat is closed by the hub).
        self.reader = asyncio.create_task(self._drain())
        await self.report("up")

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.socket is not None:
            await self.socket.close()

    async def report(self, marker: str) -> None:
        assert self.socket is not None
        self.event_id += 1
        event = {"id": self.event_id, "time": time.time(), "uid": 0, "method": "Apply", "job": None, "detail": {}}
        await self.socket.send_json({"type": "events", "events": [event]})
        facts = {"hostname": f"{self.name}-{marker}", "version": "bench", "boot_state": {"health": "good"}}
        await self.socket.send_json({"type": "facts", "facts": facts})

    async def live(self, interval: float, sent: Sent, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(0, interval))
        while not stop.is_set():
            marker = f"{time.monotonic_ns()}"
            sent.started[f"{self.name}-{marker}"] = (time.monotonic(), self.hub)
            await self.report(marker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _drain(self) -> None:  # acks and pings; a close ends it
        assert self.socket is not None
        with contextlib.suppress(aiohttp.ClientError):
            async for _ in self.socket:
                pass


async def ui_latencies(
    hub: Hub, index: int, sent: Sent, latencies: dict[str, list[float]], stop: asyncio.Event
) -> None:
    """Follow one hub's stream: each agent's change, once, as same-hub or cross-hub latency in ms."""
    seen = sent.seen[index]
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
                if hostname not in seen and (start := sent.started.get(hostname)) is not None:
                    seen.add(hostname)
                    kind = "same" if start[1] == index else "cross"
                    latencies[kind].append((time.monotonic() - start[0]) * 1000)


async def connect_all(agents: list[Agent], hubs: list[Hub], session: aiohttp.ClientSession) -> list[Agent]:
    """Connect in waves; returns the agents that connected (the others' failures are counted)."""

    async def one(agent: Agent) -> bool:
        try:
            await agent.connect(session, hubs[agent.hub].agent_url)
            return True
        except (aiohttp.ClientError, OSError, TimeoutError, KeyError, TypeError, ValueError):
            return False

    connected = []
    for start in range(0, len(agents), WAVE):
        wave = agents[start : start + WAVE]
        results = await asyncio.gather(*(one(agent) for agent in wave))
        connected += [agent for agent, ok in zip(wave, results, strict=True) if ok]
    return connected


def pg_connections(url: str | None) -> int | None:
    """Sessions on the hubs' database now, this query's own left out."""
    if url is None:
        return None
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else None


async def measure(hubs: list[Hub], tokens: dict[str, str], args: argparse.Namespace, cluster: str | None,
                  ) -> dict[str, Any]:  # fmt: skip
    pids = [hub.process.pid for hub in hubs if hub.process is not None]
    idle_rss = sum(rss_mb(pid) for pid in pids)
    postmaster = postmaster_of(cluster) if cluster else None
    agents = [Agent(name, token, n % len(hubs)) for n, (name, token) in enumerate(tokens.items())]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        connected = await connect_all(agents, hubs, session)
        connect_seconds = time.monotonic() - started
        sent = Sent(seen=[set() for _ in hubs])
        latencies: dict[str, list[float]] = {"same": [], "cross": []}
        stop, done = asyncio.Event(), asyncio.Event()  # the agents', then the UIs' once they have caught up
        uis = [asyncio.create_task(ui_latencies(hub, n, sent, latencies, done)) for n, hub in enumerate(hubs)]
        await asyncio.sleep(1)
        wall_before, own_before = time.monotonic(), time.process_time()
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        pg_before = postgresql_cpu(postmaster) if postmaster else 0.0
        lives = [asyncio.create_task(a.live(args.interval, sent, stop)) for a in connected]
        await asyncio.sleep(args.seconds)
        stop.set()
        wall = time.monotonic() - wall_before
        cpu = (sum(cpu_seconds(pid) for pid in pids) - cpu_before) / wall
        pg_cpu = (postgresql_cpu(postmaster) - pg_before) / wall if postmaster else None
        own_cpu = (time.process_time() - own_before) / wall
        dropped = sum(1 for agent in connected if agent.socket is None or agent.socket.closed)  # by a hub
        sessions = await asyncio.to_thread(pg_connections, hubs[0].database_url)
        await asyncio.gather(*lives, return_exceptions=True)
        deadline = time.monotonic() + 10  # changes sent just before the stop may still be on their way
        while sent.unseen() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*uis, return_exceptions=True)
        rss = sum(rss_mb(pid) for pid in pids)
        for agent in agents:
            await agent.close()
    same, cross = latencies["same"], latencies["cross"]
    return {
        "agents": len(agents), "failed": len(agents) - len(connected), "dropped": dropped, "connect_s": connect_seconds,
        "changes": len(sent.started), "lost": sent.unseen(),
        "p50_ms": percentile(same, 0.5), "p99_ms": percentile(same, 0.99), "max_ms": max(same, default=float("nan")),
        "cross_p50_ms": percentile(cross, 0.5), "cross_p99_ms": percentile(cross, 0.99),
        "mean_ms": statistics.fmean(same) if same else float("nan"),
        "rss_mb": rss, "kb_per_agent": (rss - idle_rss) * 1024 / max(1, len(agents)), "cpu": cpu,
        "pg_cpu": pg_cpu, "pg_sessions": sessions, "own_cpu": own_cpu,
    }  # fmt: skip


def add_hosts(hub: Hub, numbers: range, prefix: str) -> dict[str, str]:
    def add(n: int) -> tuple[str, str]:
        return f"{prefix}{n}", hub.api("POST", "/api/v1/hosts", {"name": f"{prefix}{n}"})["token"]

    with ThreadPoolExecutor(8) as pool:  # the hub commits each; a few at once keep it busy
        return dict(pool.map(add, numbers))


@dataclass
class Setup:
    """Hub processes on one database, kept from one fleet size to the next (its hosts are only added)."""

    name: str
    hubs: list[Hub]
    tokens: dict[str, str] = field(default_factory=dict)
    logged: dict[Path, int] = field(default_factory=dict)  # how much of each hub's log was shown

    @classmethod
    def make(cls, name: str, directory: Path, cluster: str | None) -> Setup:
        backend, count = SETUPS[name]
        database = new_database(cluster) if backend == "postgresql" and cluster else None
        hubs = [Hub(directory / name / f"hub-{n}", database_url=database) for n in range(count)]
        for hub in hubs:
            hub.directory.mkdir(parents=True)
        created = hubs[0].cli("admin", "add", "bench")
        assert created.returncode == 0, created.stderr
        for hub in hubs:
            hub.admin_token = created.stdout.strip().splitlines()[-1]
        return cls(name, hubs)

    @contextlib.contextmanager
    def serving(self) -> Iterator[list[Hub]]:
        try:
            for hub in self.hubs:
                started = time.monotonic()
                hub.start(timeout=START_TIMEOUT)
                print(f"  {self.name} {hub.directory.name} answered {time.monotonic() - started:.1f}s after its start")
            yield self.hubs
        finally:
            for hub in self.hubs:
                if hub.process is not None:
                    hub.stop()
            self.show_warnings()

    def show_warnings(self) -> None:
        for hub in self.hubs:
            lines = hub.log.read_text().splitlines() if hub.log.exists() else []
            for line in lines[self.logged.get(hub.log, 0) :]:
                if "WARNING" in line or "ERROR" in line:
                    print(f"  {self.name} {hub.directory.name}: {line}")
            self.logged[hub.log] = len(lines)


def new_database(cluster: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return make_url(cluster).set(database=name).render_as_string(hide_password=False)


def run_setup(setup: Setup, size: int, args: argparse.Namespace, cluster: str | None, console: Console,
              ) -> dict[str, Any]:  # fmt: skip
    """Grow the setup's fleet to `size` hosts, then measure it on freshly started hubs (so their RSS
    before the agents connect is the fleet's in memory, and what the agents add is theirs)."""
    started = time.monotonic()
    with setup.serving() as hubs:
        setup.tokens |= add_hosts(hubs[0], range(len(setup.tokens), size), "agent-")
    console.print(
        f"{setup.name}: {size} hosts ({time.monotonic() - started:.0f}s to add); measuring {args.seconds:.0f}s"
    )
    with setup.serving() as hubs:
        tokens = dict(list(setup.tokens.items())[:size])
        row = asyncio.run(measure(hubs, tokens, args, cluster if hubs[0].database_url else None))
    console.print(f"  {json.dumps({'setup': setup.name, **row})}", markup=False)
    return {"setup": setup.name, "load": Path("/proc/loadavg").read_text().split()[0], **row}


def held_well(row: dict[str, Any]) -> bool:
    """Every agent connected, every change seen by every UI, each p99 (cross-hub too) within the goal."""
    worst = max(row["p99_ms"], 0.0 if math.isnan(row["cross_p99_ms"]) else row["cross_p99_ms"])
    return bool(row["failed"] == 0 and row["dropped"] == 0 and row["lost"] == 0 and worst <= GOAL_P99_MS)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, console: Console) -> None:
    baseline = rows[0]["p99_ms"] if rows else float("nan")
    table = Table(title=f"rastos-hub: delta latency agent -> UI (one change per agent every {args.interval:.0f}s)")
    for column in ("setup", "agents", "failed", "dropped", "conn s", "changes", "lost", "p50 ms", "p99 ms", "max ms",
                   "x p50 ms", "x p99 ms", "p99/base", "RSS MB", "KB/agent", "hub CPU", "PG CPU", "PG conns",
                   "sim CPU", "load"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["setup"], str(row["agents"]), str(row["failed"]), str(row["dropped"]), f"{row['connect_s']:.1f}",
            str(row["changes"]), str(row["lost"]), f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
            f"{row['max_ms']:.0f}", f"{row['cross_p50_ms']:.1f}", f"{row['cross_p99_ms']:.1f}",
            f"{row['p99_ms'] / baseline:.1f}x",
            f"{row['rss_mb']:.0f}", f"{row['kb_per_agent']:.0f}", f"{row['cpu'] * 100:.0f}%",
            "-" if row["pg_cpu"] is None else f"{row['pg_cpu'] * 100:.0f}%",
            "-" if row["pg_sessions"] is None else str(row["pg_sessions"]), f"{row['own_cpu'] * 100:.0f}%",
            row["load"],
        )  # fmt: skip
    console.print(table)
    console.print("p50/p99: same-hub; x p50/x p99: cross-hub (an agent on the other hub). CPU in % of one core; "
                  "sim CPU: the agents' and UIs' own, on the same cores. load: 1-minute load average.")  # fmt: skip
    for setup in dict.fromkeys(row["setup"] for row in rows):
        held = [row["agents"] for row in rows if row["setup"] == setup and held_well(row)]
        console.print(f"{setup}: largest fleet with p99 <= {GOAL_P99_MS:.0f} ms: {max(held, default=0)} "
                      f"(goal {GOAL_AGENTS})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="1,100,1000", help="fleet sizes, comma-separated (default 1,100,1000)")
    parser.add_argument("--setups", default="sqlite,pg2", help=f"of {', '.join(SETUPS)}, comma-separated")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between one agent's changes")
    parser.add_argument("--seconds", type=float, default=40.0, help="measuring time per fleet size")
    args = parser.parse_args()
    sizes = [int(size) for size in args.agents.split(",")]
    setups = args.setups.split(",")
    if unknown := [setup for setup in setups if setup not in SETUPS]:
        parser.error(f"unknown setup {', '.join(unknown)} (known: {', '.join(SETUPS)})")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * max(sizes) + 1024)), hard))
    console = Console(width=200)
    rows = []
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rastos-bench-hub-")))
        wanted = any(SETUPS[setup][0] == "postgresql" for setup in setups)
        cluster = stack.enter_context(postgresql_server()) if wanted else None
        prepared = [Setup.make(name, directory, cluster) for name in setups]
        for size in sorted(sizes):  # setups side by side at each size, so a change of the machine's load hits both
            for setup in prepared:
                rows.append(run_setup(setup, size, args, cluster, console))
    report(rows, args, console)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
