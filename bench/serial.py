"""Time a QEMU run to a line on its serial console: how the benchmarks time a guest that reports
nothing else (the firmware alone, another builder's image)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Sequence


def seconds_until(argv: Sequence[str], marker: bytes, timeout: float) -> float:
    """Seconds from starting `argv` (a QEMU with `-serial stdio`) until `marker` appears on its
    console; the process is killed then. Waits in select(), so a console that stays silent ends in
    an error at the timeout rather than a read that blocks forever."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    try:
        while True:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                ending = tail(seen)
                raise RuntimeError(f"{argv[0]}: no {marker!r} on the console after {timeout:.0f} s; its end:\n{ending}")
            if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    ending = tail(seen)
                    raise RuntimeError(f"{argv[0]} ended (status {proc.wait()}) before {marker!r}; its end:\n{ending}")
                seen += chunk
                if marker in seen:
                    break
                # Only the last stretch is kept: enough for a marker split between reads, and for
                # the error's tail; a whole boot's console is long.
                seen = seen[-4096:]
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()


def tail(console: bytes) -> str:
    return console[-600:].decode(errors="replace")
