"""Step output while a run executes: what the agents' `output` frames carry (hub/protocol.py), kept
in memory only, bounded, and pulled by each follower of the run (the run's stream, hub/runs_api.py).

Each line has its number among all the lines its step printed on its host (the agent numbers them),
so a follower keeps a cursor per host and step and is sent only what comes after it: a follower that
joins late, or falls behind, is sent what is still kept, and the jump in numbers tells it how many
lines it missed. Nothing is queued per follower: a slow one costs no memory, it only misses lines.

What is kept: the newest HOST_LINES lines and HOST_BYTES of each host in a run (its older steps'
lines go first), RUN_BYTES of a run (its largest host gives way first), TOTAL_BYTES of the whole hub
(the largest run gives way first). A run's lines are forgotten OUTPUT_LINGER seconds after it ended,
once its followers have been sent them; the stored run keeps its steps' last lines, from each job's end.

What an agent may send: OutputGate, one per connection, lets through LINES_PER_SECOND lines (bursts
of LINE_BURST) and drops the rest, logged once a minute at most; an agent sending more than
FRAMES_PER_SECOND frames (bursts of FRAME_BURST) is cut off, as for any frame the hub refuses.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HOST_LINES = 1000
HOST_BYTES = 256 << 10
RUN_BYTES = 4 << 20
TOTAL_BYTES = 32 << 20
LINE_OVERHEAD = 64  # bytes a kept line costs beyond its characters (its number, the deque's slot)
PULL_LINES = 500  # lines a message to a follower carries at most
OUTPUT_LINGER = 60.0  # seconds a run's lines are kept after it ended: its followers may still be sending
FRAMES_PER_SECOND, FRAME_BURST = 50.0, 200.0  # an agent's honest pace is 4 a second (daemon/hub_output.py)
LINES_PER_SECOND, LINE_BURST = 2500.0, 10000.0  # and 2,000 lines a second at most

OUTPUT_READY: dict[str, Any] = {"type": "output_ready"}  # queued for a follower when it has lines to pull


def _cost(line: str) -> int:
    return len(line) + LINE_OVERHEAD


@dataclass
class _HostOutput:
    command: str
    steps: dict[int, deque[tuple[int, str]]] = field(default_factory=dict)  # step -> (number, line), in order
    next: dict[int, int] = field(default_factory=dict)  # step -> number of the next line expected
    lines: int = 0
    bytes: int = 0

    def drop_oldest(self) -> int:
        """Forget the oldest line of the earliest step that has one; the bytes it held."""
        step = min(step for step, kept in self.steps.items() if kept)
        _, line = self.steps[step].popleft()
        self.lines -= 1
        self.bytes -= _cost(line)
        return _cost(line)


@dataclass(eq=False)  # each follower is its own, however alike two are
class Watch:
    """One follower of a run: where it is in each host's steps, and whether it was told to pull."""

    run: str
    queue: asyncio.Queue[dict[str, Any]]
    cursors: dict[tuple[str, int], int] = field(default_factory=dict)
    pending: bool = False


class LiveOutput:
    def __init__(self) -> None:
        self.runs: dict[str, dict[str, _HostOutput]] = {}
        self.run_bytes: dict[str, int] = {}
        self.total = 0
        self.watches: dict[str, set[Watch]] = {}

    def add(self, run: str, host: str, command: str, step: int, first: int, lines: list[str], sent: int) -> bool:
        """Keep `lines`, numbered from `first`, of the host's step; `sent` is how many the agent sent
        (more than `lines` when some were dropped here). True when something new was kept."""
        hosts = self.runs.setdefault(run, {})
        output = hosts.setdefault(host, _HostOutput(command))
        expected = output.next.get(step, 0)
        output.next[step] = max(expected, first + sent)
        skip = max(0, expected - first)  # sent before (an agent's repeat): never kept twice
        fresh = [(first + index, line) for index, line in enumerate(lines) if index >= skip]
        if not fresh:
            return False
        kept = output.steps.setdefault(step, deque())
        added = sum(_cost(line) for _, line in fresh)
        kept.extend(fresh)
        output.lines += len(fresh)
        output.bytes += added
        self.run_bytes[run] = self.run_bytes.get(run, 0) + added
        self.total += added
        self._trim(run, output)
        return True

    def _trim(self, run: str, output: _HostOutput) -> None:
        while output.lines > HOST_LINES or output.bytes > HOST_BYTES:
            self._dropped(run, output.drop_oldest())
        while self.run_bytes[run] > RUN_BYTES:
            self._dropped(run, max(self.runs[run].values(), key=lambda o: o.bytes).drop_oldest())
        while self.total > TOTAL_BYTES:
            largest = max(self.run_bytes, key=lambda r: self.run_bytes[r])
            self._dropped(largest, max(self.runs[largest].values(), key=lambda o: o.bytes).drop_oldest())

    def _dropped(self, run: str, cost: int) -> None:
        self.run_bytes[run] -= cost
        self.total -= cost

    def forget(self, run: str) -> None:
        self.runs.pop(run, None)
        self.total -= self.run_bytes.pop(run, 0)

    def watch(self, run: str, queue: asyncio.Queue[dict[str, Any]]) -> Watch:
        watch = Watch(run, queue)
        self.watches.setdefault(run, set()).add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self.watches.get(watch.run, set())
        watches.discard(watch)
        if not watches:
            self.watches.pop(watch.run, None)

    def wake(self, run: str) -> None:
        """Tell the run's followers there is something to pull, once until they pull it."""
        for watch in self.watches.get(run, ()):
            if watch.pending:
                continue
            try:
                watch.queue.put_nowait(OUTPUT_READY)
                watch.pending = True
            except asyncio.QueueFull:
                pass  # the queue is being replaced by a fresh start, after which the follower pulls anyway

    def pull(self, watch: Watch) -> list[dict[str, Any]]:
        """The `output` messages with what the follower has not been sent yet, each a run of
        consecutive lines of one host's step: {"type", "host", "command", "step", "first", "lines"}."""
        watch.pending = False
        messages = []
        for host, output in self.runs.get(watch.run, {}).items():
            for step, kept in output.steps.items():
                cursor = watch.cursors.get((host, step), 0)
                if not kept or kept[-1][0] < cursor:
                    continue
                fresh = [(number, line) for number, line in kept if number >= cursor]
                watch.cursors[(host, step)] = fresh[-1][0] + 1
                messages += _messages(host, output.command, step, fresh)
        return messages


def _messages(host: str, command: str, step: int, lines: list[tuple[int, str]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for number, line in lines:
        last = messages[-1] if messages else None
        if last is None or last["first"] + len(last["lines"]) != number or len(last["lines"]) >= PULL_LINES:
            last = {"type": "output", "host": host, "command": command, "step": step, "first": number, "lines": []}
            messages.append(last)
        last["lines"].append(line)
    return messages


class OutputGate:
    """How much output one agent connection may send: token buckets for frames and for lines."""

    def __init__(self) -> None:
        now = time.monotonic()
        self._frames, self._lines, self._at = FRAME_BURST, LINE_BURST, now
        self.dropped = 0  # lines dropped since the last time it was logged
        self.stray = False  # output of a command not the agent's own in flight came, and was logged
        self.logged = 0.0  # when that was (monotonic)

    def take(self, lines: int) -> int | None:
        """How many of a frame's `lines` may pass now; None when the frame itself is one too many."""
        now = time.monotonic()
        elapsed, self._at = now - self._at, now
        self._frames = min(FRAME_BURST, self._frames + elapsed * FRAMES_PER_SECOND)
        self._lines = min(LINE_BURST, self._lines + elapsed * LINES_PER_SECOND)
        if self._frames < 1:
            return None
        self._frames -= 1
        allowed = min(lines, int(self._lines))
        self._lines -= allowed
        self.dropped += lines - allowed
        return allowed

    def report(self) -> int:
        """Lines dropped to be logged now (at most once a minute), or 0."""
        now = time.monotonic()
        if not self.dropped or now - self.logged < 60.0:
            return 0
        dropped, self.dropped, self.logged = self.dropped, 0, now
        return dropped
