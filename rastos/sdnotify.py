"""systemd's service notifications for rastosd and rastos-hub (Type=notify units): READY=1 once a
process serves, STOPPING=1, and watchdog pings from the event loop, so a loop that hangs is restarted.

A hung rastos-hub would otherwise hang the fleet, not only its own agents: with several hubs on one
PostgreSQL database, a hub holds the dispatch lock while it changes the fleet, and a process that stops
in the middle keeps its session, and the lock, until it is killed."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("rastos.sdnotify")


def notify(message: str) -> None:
    """Tell systemd `message` (newline-separated assignments), when systemd is listening."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as systemd_daemon

    try:
        systemd_daemon.notify(message)
    except OSError as error:  # the manager went away; serving matters more than telling it
        log.debug("sd_notify %r failed: %s", message.split("=")[0], error)


async def watchdog() -> None:
    """Ping systemd's watchdog from the event loop, twice per WatchdogSec=: a loop that hangs stops the
    pings. Returns at once where no watchdog is set for this process."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2 / 1_000_000)
