"""Named points between the steps of making a snapshot or a deployment, where a test can stop the
daemon: the crash-consistency tests (tests/test_daemon_bus.py, qemu-tests/test_power_cut.py) cut the
power or kill the daemon there, then check that the next start puts everything in agreement again.

Off unless $RASTOS_TEST_FAILPOINT names one (only root can set a system service's environment:
`systemctl set-environment`). At the named point the daemon says so on the console and in the log,
flushes nothing, and stops there until it is killed.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("rastosd.failpoints")

VARIABLE = "RASTOS_TEST_FAILPOINT"
SNAPSHOT_POINTS = (
    "snapshot-written",  # Create: the btrfs snapshot exists, its boot menu entry not yet
    "deployment-made",  # Rollback: the writable deployment exists, no entry changed yet
    "order-changed",  # Rollback: the other entries are re-sorted, the new entry not yet written
    "entry-written",  # Rollback: the new entry is on the ESP; the store not told, an earlier deployment not retired
)
UPDATE_POINTS = (
    "update-received",  # Stage: the image is in @images, no deployment yet
    "update-deployed",  # Stage: @deployments/NAME is in place, its kernel and entry not yet
    "update-kernel-written",  # Stage: the kernel is on the ESP, the entry not yet
)
POINTS = (
    *SNAPSHOT_POINTS,
    "follow-ups-owed",  # a step: its files written, its follow-ups (service reloads) recorded, not yet run
    *UPDATE_POINTS,
    "update-entry-written",  # Stage: the entry boots next; the store not told, an earlier staging not removed
)


def failpoint(name: str) -> None:
    assert name in POINTS, name
    if os.environ.get(VARIABLE) != name:
        return
    message = f"rastos failpoint {name} reached"
    log.warning("%s; stopping here until killed", message)
    if "INVOCATION_ID" in os.environ:  # run by systemd, in a guest: the harness reads the console
        try:
            with Path("/dev/console").open("w") as console:
                console.write(message + "\n")
        except OSError:
            pass
    threading.Event().wait()
