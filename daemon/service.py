"""rastosd's process: the bus connection, the core and its face on the bus wired together, the
worker, the hub link, systemd's notifications and watchdog, and a clean stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from sdbus import sd_bus_open_system

from daemon.bus.interfaces import BUS_NAME, ROOT_PATH
from daemon.bus.objects import BusFace
from daemon.bus.polkit import AUTHENTICATION_TIMEOUT_USEC, find_polkit
from daemon.config import DaemonConfig
from daemon.core import Daemon
from ops import OP_CLASSES
from rastos import __version__
from rastos.sdnotify import notify, watchdog

log = logging.getLogger("rastosd")

STOP_TIMEOUT = 100.0  # a running step may finish; below the unit's TimeoutStopSec=120s
# A cancelled staging stops at its next chunk and cleans up in seconds; with STOP_TIMEOUT still below 120s.
UPDATE_STOP_TIMEOUT = 15.0


async def serve(config: DaemonConfig) -> None:
    if config.bus_address is not None:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = config.bus_address  # sd-bus reads it when it connects
    bus = sd_bus_open_system()
    # The first call on the bus, before anything is read from the host: at boot rastosd starts beside
    # sysinit.target's work, and dbus.service, ordered after basic.target, answers only once it is done.
    polkit = await find_polkit(bus)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    daemon = Daemon(config, Path(credentials) if credentials else None)
    face = BusFace(daemon, bus)
    face.callers.polkit = polkit
    bus.method_call_timeout_usec = AUTHENTICATION_TIMEOUT_USEC
    log.info("access: %s", face.callers.describe())
    interrupted = daemon.store.interrupt_unfinished_jobs()
    if interrupted:
        log.warning("jobs interrupted when rastosd last stopped: %s", ", ".join(map(str, interrupted)))
    face.root.export_to_dbus(ROOT_PATH, bus)
    await bus.request_name_async(BUS_NAME, 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pings = asyncio.create_task(watchdog())
    log.info("rastosd %s serving %s (root %s)", __version__, BUS_NAME, config.root)
    # On the bus before the start's repairs: reads are answered meanwhile, and what changes the host or
    # shows its snapshots and updates waits for them (daemon.settled). systemd counts rastosd started,
    # jobs run and the hub hears of this host only once they are done, so "started" still means repaired.
    await daemon.settle()
    worker = asyncio.create_task(daemon.jobs.run_forever())
    daemon.start_hub()
    snapshots = "on" if daemon.snapshots else "off"
    notify(f"READY=1\nSTATUS=serving {BUS_NAME}; {len(OP_CLASSES)} ops; snapshots {snapshots}")
    await stop.wait()
    notify("STOPPING=1")
    log.info("stopping")
    await daemon.jobs.shutdown(STOP_TIMEOUT)
    await asyncio.to_thread(daemon.updates.shutdown, UPDATE_STOP_TIMEOUT)
    pings.cancel()
    worker.cancel()
    await daemon.stop_hub()
    daemon.store.close()
