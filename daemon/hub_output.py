"""Step output on its way to the hub while a job runs, in batches: the `output` frame (hub/protocol.py).

A line a step prints reaches the hub within OUTPUT_INTERVAL, in one frame with the other lines of
that step from the same interval, so a chatty step costs a few frames a second, not one a line.
What is forwarded is bounded: OUTPUT_FRAME_LINES lines an interval (the rest of the interval's lines
are skipped), lines cut to OUTPUT_LINE_CHARS, and nothing while OUTPUT_BACKLOG frames wait to go out
(a slow link). Every line produced is numbered all the same (`first`, per command and step), so the
hub and whoever follows the run see a gap where lines were skipped, or produced while the link was
down, and never a line twice. The whole output stays in the daemon's job, and the job's end carries
its last lines (hub_link.KEPT_OUTPUT_LINES) to the hub as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

OUTPUT_INTERVAL = 0.25  # seconds a line may wait for the others of its batch
OUTPUT_FRAME_LINES = 500  # lines an interval forwards, all steps together (the hub takes 500 a frame)
OUTPUT_LINE_CHARS = 1000  # of one line; the hub refuses lines over 1,100 characters
OUTPUT_BACKLOG = 16  # frames waiting to be sent, above which a batch is skipped rather than queued
LINE_CUT = " (line cut)"


class OutputForwarder:
    """Batches the output lines of the hub's jobs into `output` frames for `send` (on the event loop)."""

    def __init__(self, send: Callable[[dict[str, Any]], None], backlog: Callable[[], int]) -> None:
        self._send = send
        self._backlog = backlog
        self._produced: dict[tuple[str, int], int] = {}  # (command, step) -> lines it printed so far
        self._pending: dict[tuple[str, int], tuple[int, list[str]]] = {}  # -> (number of the first, lines)
        self._pending_lines = 0
        self._timer: asyncio.TimerHandle | None = None

    def line(self, command: str, step: int, line: str, live: bool) -> None:
        """One line of the command's step; `live` when the hub is connected to hear it now."""
        key = (command, step)
        number = self._produced.get(key, 0)
        self._produced[key] = number + 1
        if not live or self._pending_lines >= OUTPUT_FRAME_LINES:
            return  # skipped, but counted: the next frame's `first` shows the gap
        first, lines = self._pending.setdefault(key, (number, []))
        if first + len(lines) != number:  # lines were skipped since this batch began: start a new one
            self.flush()
            first, lines = self._pending.setdefault(key, (number, []))
        lines.append(line if len(line) <= OUTPUT_LINE_CHARS else line[:OUTPUT_LINE_CHARS] + LINE_CUT)
        self._pending_lines += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(OUTPUT_INTERVAL, self.flush)

    def flush(self) -> None:
        """Send what waits now, one frame for each step that printed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._pending_lines = self._pending, {}, 0
        for (command, step), (first, lines) in pending.items():
            if self._backlog() >= OUTPUT_BACKLOG:
                continue  # the link is behind: these are skipped, and the next frame's `first` says so
            self._send({"type": "output", "command": command, "step": step, "first": first, "lines": lines})

    def finished(self, command: str) -> None:
        """The command's job ended: what it printed last goes out before its end is reported."""
        self.flush()
        for key in [key for key in self._produced if key[0] == command]:
            del self._produced[key]
