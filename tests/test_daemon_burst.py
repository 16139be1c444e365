"""A burst of 2,000 signals of 4 KB from the daemon's own emission path must not cost its connection.

This is why the daemon uses sdbus: dbus-fast 5.2.0 treats EAGAIN on a full socket as fatal and drops
the connection under exactly this load (measured before the choice). sd-bus queues and flushes.
The daemon's objects run in this process, on a private dbus-daemon; a separate process subscribes
and counts, and busctl reads a property while the burst drains.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sdbus import sd_bus_open_system

from daemon.bus.interfaces import BUS_NAME, ROOT_PATH
from daemon.bus.objects import BusFace
from daemon.config import DaemonConfig
from daemon.core import Daemon
from daemon.jobs import Job
from tests.daemon_fixtures import CHECKOUT, PrivateBus, ScratchRoot

pytestmark = pytest.mark.root

SIGNALS = 2000
LINE = 4096

SUBSCRIBER = """
import asyncio, sys
from sdbus import sd_bus_open_system
from daemon.bus.interfaces import JobInterface, BUS_NAME

async def main():
    job = JobInterface.new_proxy(BUS_NAME, sys.argv[1], sd_bus_open_system())
    count = 0
    print("listening", flush=True)
    async for line in job.output:
        assert len(line) == int(sys.argv[3]), len(line)
        count += 1
        if count == int(sys.argv[2]):
            break
    print(count, flush=True)

asyncio.run(main())
"""


def test_a_burst_of_signals_leaves_the_connection_up(daemon_env: tuple[PrivateBus, ScratchRoot, Path]) -> None:
    bus, scratch, state_dir = daemon_env
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        asyncio.run(burst(bus, scratch, state_dir))
    finally:
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]


async def burst(bus: PrivateBus, scratch: ScratchRoot, state_dir: Path) -> None:
    connection = sd_bus_open_system()
    config = DaemonConfig(root=scratch.root, snapshots_dir=scratch.snapshots, state_dir=state_dir, esp=scratch.esp)
    daemon = Daemon(config)
    face = BusFace(daemon, connection)
    face.root.export_to_dbus(ROOT_PATH, connection)
    await connection.request_name_async(BUS_NAME, 0)
    job = Job(1, "pipeline", [], 0, 0, state="running")
    daemon.job_added(job)

    subscriber = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, "/org/rastos/Daemon1/job/1", str(SIGNALS), str(LINE),
        stdout=subprocess.PIPE, cwd=CHECKOUT, env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
    )  # fmt: skip
    assert subscriber.stdout is not None
    assert (await asyncio.wait_for(subscriber.stdout.readline(), 30)).strip() == b"listening"
    await asyncio.sleep(0.5)  # let its match rule reach the bus before the first signal

    # The burst: no await in between, so nothing drains until it is all queued.
    for number in range(SIGNALS):
        daemon.job_output(job, 0, f"{number:06d} ".ljust(LINE, "x"))
        job.progress = (number * 100 // SIGNALS, f"line {number}")
        daemon.job_changed(job, "Progress")

    reader = await asyncio.create_subprocess_exec(
        "busctl", f"--address={bus.address}", "get-property", BUS_NAME, ROOT_PATH, "org.rastos.Daemon1.Manager",
        "Version", stdout=subprocess.PIPE,
    )  # fmt: skip
    version, _ = await asyncio.wait_for(reader.communicate(), 60)
    assert reader.returncode == 0 and version.strip() == b's "0.1.0"', "the connection answers after the burst"
    received, _ = await asyncio.wait_for(subscriber.communicate(), 120)
    assert received.strip() == str(SIGNALS).encode(), "every signal arrived"
    daemon.store.close()
