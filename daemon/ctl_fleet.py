"""One rastosctl command on many hosts at once (`--inventory`): at most `--parallel` at a time, each
through the same path as `-H`; a live view of every host on a terminal; one block of output per host
as it ends (or, with `--json`, one JSON record per line); a final table. A failed host does not stop
the others, unless `--fail-fast`: then no host starts after it, and those that had begun run to their
end, since stopping to follow a job does not stop the job.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO

from daemon.ctl_output import table
from daemon.inventory import InventoryHost

if TYPE_CHECKING:
    from rich.console import Group
    from rich.live import Live

VIEW_REFRESH = 0.125  # seconds between redraws of the live view


class Outcome(StrEnum):
    CHANGED = "changed"  # the command ran and changed the host (in a dry run: would change it)
    UNCHANGED = "unchanged"  # it ran and had nothing to change, or only read
    FAILED = "failed"  # it ran and failed: a job that did not end `done`, an error from rastosd
    UNREACHABLE = "unreachable"  # it did not run: no connection to rastosd there
    SKIPPED = "skipped"  # not started: --fail-fast after another host failed


@dataclass
class HostResult:
    host: InventoryHost
    outcome: Outcome
    exit: int
    seconds: float = 0.0
    document: Any = None  # what the command printed with --json
    text: str = ""  # what it printed otherwise
    error: str | None = None
    reason: str | None = None  # why it was unreachable (daemon/ctl_target.py Reason)

    def headline(self) -> str:
        """The error's first line; for a command that failed of itself (a job), its result's."""
        if self.error:
            return self.error.splitlines()[0]
        return self.text.splitlines()[0] if self.outcome is Outcome.FAILED and self.text else ""

    def record(self) -> dict[str, Any]:
        return {
            "host": self.host.name, "address": str(self.host.target), "outcome": str(self.outcome),
            "exit": self.exit, "seconds": round(self.seconds, 3), "result": self.document,
            "error": None if self.error is None else {"reason": self.reason, "message": self.error},
        }  # fmt: skip


class Recorder:
    """What one host's command prints, kept for its record and block, instead of printed; its news
    (progress, a job's output) goes to the live view."""

    def __init__(self, as_json: bool, news: Callable[[str], None]) -> None:
        self.as_json = as_json
        self.news = news
        self.documents: list[Any] = []
        self.texts: list[str] = []
        self.notes: list[str] = []
        self.changed = False
        self.tail: collections.deque[str] = collections.deque(maxlen=20)

    def emit(self, document: Any, text: str, verbatim: bool = False) -> None:
        del verbatim  # a host's block holds its text, its record the document
        self.documents.append(document)
        self.texts.append(text)

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.news(text)

    def progress(self, text: str) -> None:
        self.news(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def document(self) -> Any:
        return self.documents[0] if len(self.documents) == 1 else self.documents or None

    @property
    def text(self) -> str:
        return "\n".join([*self.notes, *self.texts])


Runner = Callable[[InventoryHost, Recorder], Awaitable[HostResult]]


@dataclass
class _Row:
    state: str = "waiting"
    news: str = ""
    started: float = 0.0
    seconds: float = 0.0


STYLE = {"waiting": "dim", "changed": "yellow", "unchanged": "green", "failed": "red", "unreachable": "magenta",
         "skipped": "dim"}  # fmt: skip


@dataclass
class FleetView:
    """On a terminal, a live row per host (state, time, its latest news) on stderr; elsewhere nothing
    but the blocks and the table. Redrawn from the event loop, not rich's thread: connecting moves
    stderr for a moment (daemon/ctl_target.py), and a redraw then would land in ssh's file. rich is
    imported only for the live rows: an image's rastosctl has no rich (it is not among the image's
    Debian packages), and there the run goes on without them."""

    hosts: Sequence[InventoryHost]
    as_json: bool
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    rows: dict[str, _Row] = field(default_factory=dict)
    live: Live | None = None

    def __post_init__(self) -> None:
        self.rows = {host.name: _Row() for host in self.hosts}
        if not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            return
        console = Console(stderr=True)
        if console.is_terminal:
            self.live = Live(self.render(), console=console, auto_refresh=False, redirect_stdout=False,
                             redirect_stderr=False, transient=True)  # fmt: skip
            self.live.start()

    def render(self) -> Group:
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))
        now = time.monotonic()
        for name, row in self.rows.items():
            mark: Any = Spinner("dots", style="cyan") if row.state == "running" else Text("·")
            seconds = now - row.started if row.state == "running" else row.seconds
            elapsed = Text(f"{seconds:6.1f}s" if row.started else "", "dim")
            grid.add_row(mark, Text(name, "bold"), Text(row.state, STYLE.get(row.state, "")), elapsed,
                         Text(row.news[-100:], "dim"))  # fmt: skip
        counts = collections.Counter(row.state for row in self.rows.values())
        return Group(grid, Text(", ".join(f"{n} {state}" for state, n in counts.items()), "dim"))

    def started(self, host: InventoryHost) -> None:
        self.rows[host.name] = _Row("running", "connecting", time.monotonic())

    def news(self, host: InventoryHost, text: str) -> None:
        self.rows[host.name].news = text

    def finished(self, result: HostResult) -> None:
        row = self.rows[result.host.name]
        row.state, row.seconds = str(result.outcome), result.seconds
        row.news = result.headline()
        if self.as_json:
            self.print(json.dumps(result.record()))
        elif result.outcome is not Outcome.SKIPPED:
            body = "\n".join(part for part in (result.text, result.error) if part)
            self.print(f"== {result.host.name} ({result.host.target}): {result.outcome}\n{body}".rstrip() + "\n")

    def print(self, text: str) -> None:
        if self.live is not None and os.isatty(self.stdout.fileno()):
            self.live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stdout.write(text + "\n")
            self.stdout.flush()

    def redraw(self) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


async def run_fleet(
    hosts: Sequence[InventoryHost], runner: Runner, *, parallel: int, fail_fast: bool, as_json: bool
) -> list[HostResult]:
    view = FleetView(hosts, as_json)
    slots = asyncio.Semaphore(parallel)
    stopping = asyncio.Event()

    async def one(host: InventoryHost) -> HostResult:
        async with slots:
            if stopping.is_set():
                result = HostResult(host, Outcome.SKIPPED, 0, error="not started: another host failed (--fail-fast)")
            else:
                view.started(host)
                started = time.monotonic()
                result = await runner(host, Recorder(as_json, lambda text: view.news(host, text)))
                result.seconds = time.monotonic() - started
                if fail_fast and result.outcome in (Outcome.FAILED, Outcome.UNREACHABLE):
                    stopping.set()
            view.finished(result)
            return result

    async def redraw() -> None:
        while True:
            view.redraw()
            await asyncio.sleep(VIEW_REFRESH)

    painter = asyncio.create_task(redraw())
    try:
        return list(await asyncio.gather(*(one(host) for host in hosts)))
    finally:
        painter.cancel()
        view.close()


def summary(results: Sequence[HostResult]) -> str:
    rows = [[r.host.name, str(r.outcome), str(r.exit), f"{r.seconds:.1f}s", r.headline()] for r in results]
    counts = collections.Counter(r.outcome for r in results)
    totals = ", ".join(f"{counts[outcome]} {outcome}" for outcome in Outcome if counts[outcome])
    return table(["HOST", "RESULT", "EXIT", "TIME", "ERROR"], rows) + f"\n\n{len(results)} hosts: {totals}"


def exit_status(results: Sequence[HostResult]) -> int:
    """0 when the command succeeded on every host; otherwise the exit status of the first host, in the
    inventory's order, on which it did not (so one host's inventory exits as `-H` would). A host that
    was skipped did not fail; the one that made the others skip did."""
    return next((r.exit for r in results if r.exit != 0), 0)
