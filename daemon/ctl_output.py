"""How rastosctl shows what rastosd answers, when not asked for JSON: tables, changes, diffs, jobs."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol


def table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def format_changes(changes: list[dict[str, str]]) -> str:
    lines = []
    for change in changes:
        lines.append(f"{change['action']:>7} {change['subject']}")
        lines += [f"          {line}" for line in change.get("detail", "").splitlines() if change["action"] != "run"]
        if change["action"] == "run":
            lines.append(f"          $ {change['detail']}")
    return "\n".join(lines)


def format_diff(document: dict[str, Any]) -> str:
    """Every planned change with its detail (the unified diffs): what a dry run would do, in full."""
    sections = []
    for position, step in enumerate(document["steps"], 1):
        changes = (step.get("result") or {}).get("changes", [])
        if changes:
            sections.append(f"--- step {position}: {step['op']}\n{format_changes(changes)}")
    return "\n\n" + "\n\n".join(sections) if sections else "\n\nno changes"


def format_job(document: dict[str, Any]) -> str:
    lines = [f"job {document['id']} ({document['kind']}): {document['state']}"]
    for position, step in enumerate(document["steps"], 1):
        lines.append(f"  step {position}: {step['op']} {step['state']}")
        result = step.get("result") or {}
        if step["state"] == "planned":
            lines += [f"    would {c['action']} {c['subject']}" for c in result.get("changes", [])] or [
                "    nothing to change"
            ]
        if result.get("error"):
            lines.append(f"    error: {result['error']}")
    result = document.get("result") or {}
    if result.get("snapshots"):
        lines.append(f"  snapshots: pre {result['snapshots']['pre']}, post {result['snapshots']['post']}")
    if result.get("restored"):
        lines.append(f"  restored: {', '.join(result['restored'])}")
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    confirmation = document.get("confirmation")
    if confirmation and confirmation["state"] == "pending":
        deadline = time.strftime("%H:%M:%S", time.localtime(confirmation["deadline"]))
        lines.append(f"  PENDING: reverted at {deadline} unless confirmed: rastosctl confirm {document['id']}")
    elif confirmation:
        lines.append(f"  confirmation: {confirmation['state']} {confirmation.get('detail') or ''}".rstrip())
    return "\n".join(lines)


def format_size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count / 1024:.1f} KiB"


def format_progress(phase: str, done: int, total: int) -> str:
    if not total:
        return f"[{phase}]" + (f" {format_size(done)}" if done else "")
    return f"[{phase}] {format_size(done)} of {format_size(total)} ({100 * done // total}%)"


def format_update_result(result: dict[str, Any]) -> str:
    """One staging's end, as Completed and GetStatus carry it."""
    version = result.get("version") or "?"
    if result.get("state") == "staged":
        lines = [
            f"update {result['id']} staged: version {version} boots next, on trial",
            f"  deployment: {result.get('deployment')} (image {result.get('image')}"
            f"{'' if result.get('received') else ', here already'})",
            f"  entry:      {result.get('entry')} (kernel {result.get('kernel')})",
        ]
        lines += [f"  replaces:   {earlier} (removed)" for earlier in result.get("replaced") or []]
        hand = (result.get("carried") or {}).get("hand_changes") or []
        lines += [f"  changed by hand, not carried: {change}" for change in hand]
        if result.get("reboot"):
            lines.append("  rebooting into it")
        return "\n".join(lines)
    error = result.get("error") or {}
    name = f"{error['name']}: " if error.get("name") else ""
    return f"update {result.get('id')} (version {version}) {result.get('state')}: {name}{error.get('message', '')}"


def format_update_status(status: dict[str, Any]) -> str:
    progress = status["progress"]
    lines = [
        f"state:           {status['state']}",
        f"running version: {status['running_version'] or '-'}",
        f"staged version:  {status['staged_version'] or '-'} (boots next)" if status["staged_version"] else
        "staged version:  -",
    ]  # fmt: skip
    if status.get("id"):
        lines.append(f"update:          {status['id']} from {status['source']} (version {status['version'] or '?'})")
    if status["state"] not in ("idle", "staged", "failed", "cancelled"):
        lines.append(f"progress:        {format_progress(progress['phase'], progress['done'], progress['total'])}")
    if status.get("last_error"):
        error = status["last_error"]
        lines.append(f"last error:      {error.get('name') or ''} {error.get('message', '')}".rstrip())
    lines += [f"hand change:     {change}" for change in status.get("hand_changes") or []]
    return "\n".join(lines)


def format_hub_status(status: dict[str, Any]) -> str:
    since = status.get("since")
    lines = [
        f"state: {status['state']}" + (f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})"
                                       if since else ""),
        f"hub:   {status.get('url') or '-'}",
    ]  # fmt: skip
    if len(urls := status.get("urls", [])) > 1:  # the hubs it fails over between, in the order tried
        lines.append(f"hubs:  {', '.join(urls)}")
    if status.get("error"):
        lines.append(f"error: {status['error']}")
    return "\n".join(lines)


def format_joined(joined: dict[str, Any]) -> str:
    lines = [
        f"joined the hub at {joined['url']}",
        f"  token:    {joined['token_file']} (0600)",
        f"  settings: {joined['config_file']} ([hub] url{', ca' if joined['ca_file'] else ''})",
    ]
    if joined["ca_file"]:
        lines.append(f"  CA:       {joined['ca_file']}")
    lines += [f"            {c['subject']} (SHA256 {c['sha256']}, until {c['not_after']})" for c in joined["ca"]]
    return "\n".join(lines)


class Output(Protocol):
    """Where a command's output goes: printed (one host), or kept per host (daemon/ctl_fleet.py)."""

    as_json: bool
    changed: bool  # set when the command changed the host, or in a dry run would

    def emit(self, document: Any, text: str, verbatim: bool = False) -> None:
        """The command's result: `document` with --json, else `text`; `verbatim`: `text` either way
        (a report already rendered in the format asked for)."""

    def line(self, text: str) -> None:
        """A line of a running job's output."""

    def progress(self, text: str) -> None:
        """How far a job or a staging has got."""

    def note(self, text: str) -> None:
        """A remark beside the result, on stderr."""


class PrintOutput:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.changed = False

    def emit(self, document: Any, text: str, verbatim: bool = False) -> None:
        print(json.dumps(document, indent=2) if self.as_json and not verbatim else text)

    def line(self, text: str) -> None:
        if not self.as_json:
            print(f"  | {text}", flush=True)

    def progress(self, text: str) -> None:
        if not self.as_json:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        print(f"rastosctl: {text}", file=sys.stderr)
