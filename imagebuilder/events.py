"""What a build reports while it runs: stage starts, progress and ends, cache decisions, the outputs.

Three renderings of the same events: a live rich display on a terminal, plain lines elsewhere
(CI logs), and JSON lines for programs (`--json`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text


class BuildEvents(Protocol):
    def build_started(self, profile: str, stages: list[str]) -> None: ...
    def stage_started(self, stage: str) -> None: ...
    def stage_progress(self, stage: str, note: str) -> None: ...
    def stage_finished(self, stage: str, seconds: float, note: str) -> None: ...
    def stage_failed(self, stage: str, seconds: float, error: str) -> None: ...
    def build_finished(self, outputs: dict[str, str], seconds: float) -> None: ...
    def close(self) -> None: ...


class JsonEvents:
    """One JSON object per line on stdout; every object has `event` and `time` (Unix seconds)."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream

    def _emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        self.stream.flush()

    def build_started(self, profile: str, stages: list[str]) -> None:
        self._emit("build-started", profile=profile, stages=stages)

    def stage_started(self, stage: str) -> None:
        self._emit("stage-started", stage=stage)

    def stage_progress(self, stage: str, note: str) -> None:
        self._emit("stage-progress", stage=stage, note=note)

    def stage_finished(self, stage: str, seconds: float, note: str) -> None:
        self._emit("stage-finished", stage=stage, seconds=round(seconds, 3), note=note)

    def stage_failed(self, stage: str, seconds: float, error: str) -> None:
        self._emit("stage-failed", stage=stage, seconds=round(seconds, 3), error=error)

    def build_finished(self, outputs: dict[str, str], seconds: float) -> None:
        self._emit("build-finished", outputs=outputs, seconds=round(seconds, 3))

    def close(self) -> None:
        pass


@dataclass
class _Row:
    stage: str
    state: str = "waiting"  # waiting, running, done, failed
    seconds: float = 0.0
    note: str = ""
    started: float = field(default_factory=time.monotonic)


class ConsoleEvents:
    """A live table of stages on a terminal; plain lines when stderr is not a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.rows: dict[str, _Row] = {}
        self.live: Live | None = None

    def build_started(self, profile: str, stages: list[str]) -> None:
        self.rows = {s: _Row(s) for s in stages}
        self.console.print(f"[bold]Building profile '{profile}'[/bold]")
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=False)
            self.live.start()

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for row in self.rows.values():
            if row.state == "running":
                mark: Any = Spinner("dots", style="cyan")
                seconds = time.monotonic() - row.started
            else:
                mark = {"waiting": Text("·", "dim"), "done": Text("✓", "green"), "failed": Text("✗", "red")}[row.state]
                seconds = row.seconds
            time_text = Text(f"{seconds:6.1f}s" if row.state != "waiting" else "", "dim")
            table.add_row(
                mark, Text(row.stage, "bold" if row.state == "running" else ""), time_text, Text(row.note, "dim")
            )
        return table

    def _refresh(self) -> None:
        if self.live:
            self.live.update(self._render())

    def stage_started(self, stage: str) -> None:
        row = self.rows.setdefault(stage, _Row(stage))
        row.state, row.started = "running", time.monotonic()
        if self.live:
            self.live.update(self._render())
        else:
            self.console.print(f"[cyan]▶[/cyan] {stage}")

    def stage_progress(self, stage: str, note: str) -> None:
        """The running stage's row shows the note (the build log has every one; plain output none)."""
        row = self.rows.setdefault(stage, _Row(stage))
        row.note = note
        self._refresh()

    def stage_finished(self, stage: str, seconds: float, note: str) -> None:
        row = self.rows[stage]
        row.state, row.seconds, row.note = "done", seconds, note
        if self.live:
            self._refresh()
        else:
            self.console.print(f"[green]✓[/green] {stage} {seconds:.1f}s {note}".rstrip())

    def stage_failed(self, stage: str, seconds: float, error: str) -> None:
        row = self.rows[stage]
        row.state, row.seconds, row.note = "failed", seconds, "failed"
        if self.live:
            self._refresh()
        else:
            self.console.print(f"[red]✗[/red] {stage} failed after {seconds:.1f}s")

    def build_finished(self, outputs: dict[str, str], seconds: float) -> None:
        self.close()
        self.console.print(f"[bold green]Built in {seconds:.1f}s[/bold green]")
        for kind, path in outputs.items():
            self.console.print(f"  {kind:9} {path}")

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None
