"""How runs read in a terminal and in JSON lines: a run's summary, each host's command with its steps
and output, and a follower that turns a run's stream (hub/runs_api.py) into one line per change and
one per line of output, as the steps print it."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINAL = frozenset({"done", "failed", "cancelled", "interrupted", "rejected"})
FLAGS = ((1, "dry-run"), (2, "no-snapshot"), (4, "restore-on-failure"))


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def target_text(target: dict[str, Any]) -> str:
    if "hosts" in target:
        return "hosts " + ",".join(target["hosts"])
    if "group" in target:
        return f"group {target['group']}"
    return "all hosts"


def steps_text(run: dict[str, Any]) -> str:
    compliance = run.get("compliance")
    if isinstance(compliance, dict):
        checks = compliance.get("checks") or []
        return f"compliance {compliance.get('action')}" + (f" ({', '.join(map(str, checks))})" if checks else "")
    return " && ".join(step["op"] for step in run["steps"])


def flags_text(flags: int) -> str:
    return ", ".join(name for bit, name in FLAGS if flags & bit) or "-"


def tally(run: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for command in run["commands"]:
        counts[command["state"]] = counts.get(command["state"], 0) + 1
    return ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no hosts"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])  # fmt: skip


def runs_table(runs: list[dict[str, Any]]) -> str:
    rows = [[run["id"], run["state"], when(run["created"]), run["admin"], target_text(run["target"]),
             steps_text(run), tally(run)] for run in sorted(runs, key=lambda run: run["created"])]  # fmt: skip
    return table(["ID", "STATE", "CREATED", "BY", "TARGET", "STEPS", "HOSTS"], rows) if rows else "no runs"


def run_text(run: dict[str, Any]) -> str:
    lines = [
        f"run {run['id']}",
        f"state:       {run['state']}" + (f", finished {when(run['finished'])}" if run["finished"] else ""),
        f"created:     {when(run['created'])} by {run['admin']}",
        f"target:      {target_text(run['target'])}",
        f"steps:       {steps_text(run)}",
        f"flags:       {flags_text(run['flags'])}",
        f"parallelism: {run['parallelism']}",
        "hosts:",
    ]
    for command in run["commands"]:
        lines += ["  " + line for line in command_lines(command, with_result=True)]
    return "\n".join(lines)


def command_lines(command: dict[str, Any], with_result: bool, shown: frozenset[int] = frozenset()) -> list[str]:
    """A host's command: its state (and job), then, once it has a result, each step with its output
    (but for the steps in `shown`, whose output was followed as they printed it)."""
    job = f" (job {command['job_id']})" if command["job_id"] is not None else ""
    result = command["result"] if isinstance(command["result"], dict) else {}
    error = f": {result['error']}" if command["state"] in FINAL and result.get("error") else ""
    lines = [f"{command['host']}: {command['state']}{job}{error}"]
    if with_result:
        lines += step_lines(result, shown)
        if isinstance(found := result.get("compliance"), dict):
            lines.append(f"  compliance: {compliance_text(found)}")
    return lines


def compliance_text(counts: dict[str, Any]) -> str:
    """A scan's counts and its score: passed over the checks that apply."""
    passed, failed = counts.get("passed"), counts.get("failed")
    text = f"{passed} passed, {failed} failed, {counts.get('not_applicable')} not applicable"
    if isinstance(passed, int) and isinstance(failed, int) and passed + failed:
        text += f" (score {100 * passed // (passed + failed)}%)"
    return text


def step_lines(result: dict[str, Any], shown: frozenset[int] = frozenset()) -> list[str]:
    lines = []
    steps = result.get("steps")
    for index, step in enumerate(steps if isinstance(steps, list) else [], 1):
        if not isinstance(step, dict):
            continue
        error = f": {step['error']}" if step.get("error") else ""
        lines.append(f"  {index}. {step.get('op')}: {step.get('state')}{error}")
        output = step.get("output")
        if index - 1 not in shown:
            lines += [f"       {line}" for line in (output if isinstance(output, list) else [])]
    return lines


def output_prefix(run: dict[str, Any], host: str, step: int) -> str:
    """`web-1 [2 user]`: the host, and the step by its number and op."""
    given = run.get("steps")
    steps: list[Any] = given if isinstance(given, list) else []
    op = steps[step].get("op") if 0 <= step < len(steps) and isinstance(steps[step], dict) else "?"
    return f"{host} [{step + 1} {op}]"


@dataclass
class Follower:
    """Follows a run's stream and says each change of a host's command once: as a line of text, or as
    a JSON line {"type": "command", "host", "command", "state", "job"[, "result"]}; and each line of
    output once, as the steps print it: `web-1 [2 user] LINE`, or {"type": "output", "host",
    "command", "step", "first", "lines"}. Lines the hub did not keep or relay are said as a gap."""

    say: Callable[[str], None]
    as_json: Callable[[dict[str, Any]], None] | None = None  # JSON lines instead of text
    run: dict[str, Any] = field(default_factory=dict)
    _said: dict[str, tuple[str, Any, bool]] = field(default_factory=dict)
    _next: dict[tuple[str, int], int] = field(default_factory=dict)  # (host, step) -> next line's number

    def take(self, message: dict[str, Any]) -> bool:
        """Take one message of the stream; True once the run has ended."""
        if message["type"] in ("run", "end"):
            self.run = message["run"]
            for command in self.run["commands"]:
                self._changed(command)
        elif message["type"] == "command":
            command = message["command"]
            commands = self.run["commands"]
            index = next((i for i, known in enumerate(commands) if known["id"] == command["id"]), None)
            if index is None:
                commands.append(command)
            else:
                commands[index] = command
            self._changed(command)
        elif message["type"] == "output":
            self._output(message)
        if message["type"] != "end":
            return False
        if self.as_json is not None:
            self.as_json({"type": "end", "run": self.run})
        else:
            self.say(f"run {self.run['id']}: {self.run['state']} ({tally(self.run)})")
        return True

    def _output(self, message: dict[str, Any]) -> None:
        host, step, first, lines = message["host"], message["step"], message["first"], message["lines"]
        expected = self._next.get((host, step), 0)
        fresh = lines[max(0, expected - first) :]  # a stream opened again sends what it kept again
        if not fresh:
            return
        start = max(first, expected)
        self._next[(host, step)] = start + len(fresh)
        if self.as_json is not None:
            self.as_json({"type": "output", "host": host, "command": message["command"], "step": step,
                          "first": start, "lines": fresh})  # fmt: skip
            return
        prefix = output_prefix(self.run, host, step)
        if start > expected:
            self.say(f"{prefix} ... ({start - expected} lines not shown)")
        for line in fresh:
            self.say(f"{prefix} {line}")

    def _changed(self, command: dict[str, Any]) -> None:
        has_result = command["state"] in FINAL and command["result"] is not None
        now = (command["state"], command["job_id"], has_result)
        if self._said.get(command["id"]) == now:
            return
        self._said[command["id"]] = now
        if self.as_json is not None:
            change = {"type": "command", "host": command["host"], "command": command["id"],
                      "state": command["state"], "job": command["job_id"]}  # fmt: skip
            self.as_json({**change, "result": command["result"]} if has_result else change)
            return
        shown = frozenset(step for host, step in self._next if host == command["host"])
        for line in command_lines(command, with_result=has_result, shown=shown):
            self.say(line)
