"""Time a QEMU run to a line on its serial console: how the benchmarks time a guest that reports
nothing else (the firmware alone, another builder's image)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Sequence

from rastos.process import start

# Enough of the console for a marker split between two reads, and for an error's last lines; a
# whole boot's console is long.
KEPT = 4096


def seconds_until(argv: Sequence[str], marker: bytes, timeout: float) -> float:
    """Seconds from starting `argv` (a QEMU with `-serial stdio`) until `marker` appears on its
    console; the process is killed then. Waits in select(), so a console that stays silent ends in
    an error at the timeout rather than a read that blocks for ever."""
    started = time.monotonic()
    # QEMU's own complaints (a bad option, a missing file) go into the console text, so an error
    # says why the marker never came.
    with start(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        seen = b""
        try:
            while marker not in seen:
                seen = seen[-KEPT:]
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise RuntimeError(f"{argv[0]}: no {marker!r} after {timeout:.0f} s; it ended:\n{tail(seen)}")
                if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        status = proc.wait()
                        raise RuntimeError(f"{argv[0]} exited ({status}) before {marker!r}; it ended:\n{tail(seen)}")
                    seen += chunk
            return time.monotonic() - started
        finally:
            proc.kill()


def tail(console: bytes) -> str:
    return console[-600:].decode(errors="replace")
