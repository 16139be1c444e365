"""Compliance scans and remediations the hub asks for: what its command carries, and what is sent back.

A hub command may carry `compliance: {"action", "checks"}` instead of steps (docs/hub.md, hub/protocol.py).
It is checked here field by field, as every frame from the hub is. `scan` runs the checks, as
`Manager.ComplianceScan` does; `remediate` scans, turns the failed checks' remediations (the `checks`
named, or every one an op fixes) into one pipeline, as `rastosctl compliance remediate` does, and the
link runs it as the command's job, then scans again. Each scan goes to the hub as a `compliance` frame:
the counts its score is made of and the failed checks, each finding cut to what the hub keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from daemon.compliance.model import Report, Status
from daemon.compliance.remediate import pipeline, select
from daemon.errors import InvalidParams

ACTIONS = ("scan", "remediate")
CHECK_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_CHECKS = 100  # named in one remediation
MAX_TITLE = 200  # of a check's title, and
MAX_FINDING = 1000  # of a finding, in what the hub is sent (hub/protocol.py's limits)


@dataclass(frozen=True)
class ComplianceRequest:
    action: str  # one of ACTIONS
    checks: tuple[str, ...]  # remediate: only these (every failed one an op fixes when empty)


def parse_request(command: dict[str, Any]) -> ComplianceRequest:
    """The `compliance` of a hub command; InvalidParams naming the field."""
    request = command.get("compliance")
    if not isinstance(request, dict):
        raise InvalidParams("compliance", "must be an object with action (scan or remediate) and checks")
    if unknown := sorted(set(request) - {"action", "checks"}):
        raise InvalidParams(f"compliance.{str(unknown[0])[:64]}", "not a key of a compliance request (action, checks)")
    action = request.get("action")
    if action not in ACTIONS:
        raise InvalidParams("compliance.action", f"must be scan or remediate, got {str(action)[:64]!r}")
    checks = request.get("checks", [])
    if not isinstance(checks, list) or len(checks) > MAX_CHECKS:
        raise InvalidParams("compliance.checks", f"must be a list of at most {MAX_CHECKS} check ids")
    for index, check in enumerate(checks):
        if not isinstance(check, str) or not CHECK_ID.match(check):
            raise InvalidParams(f"compliance.checks[{index}]", "must be a check's id (lower case, digits and -)")
    if checks and action != "remediate":
        raise InvalidParams("compliance.checks", "only a remediation takes checks; a scan runs them all")
    return ComplianceRequest(action, tuple(dict.fromkeys(checks)))


def remediation_steps(report: Report, checks: tuple[str, ...]) -> list[dict[str, Any]]:
    """The pipeline that fixes the failed checks named (all when none is) an op can fix; ValueError
    naming a check the scan does not know."""
    try:
        chosen = select(report.results, checks)
    except ValueError as error:
        raise InvalidParams("compliance.checks", str(error)) from None
    return pipeline(chosen, report.context)


def summary(report: Report) -> dict[str, int]:
    """What a command's result says of a scan: its counts."""
    return {"passed": report.count(Status.PASS), "failed": report.count(Status.FAIL),
            "not_applicable": report.count(Status.NOT_APPLICABLE)}  # fmt: skip


def report_frame(report: Report, command: str | None) -> dict[str, Any]:
    """The `compliance` frame of a scan: its counts and its failed checks, each cut to the hub's limits."""
    failed = [{"id": result.id, "title": _cut(result.title, MAX_TITLE), "severity": str(result.severity),
               "finding": _cut(result.finding, MAX_FINDING)} for result in report.failed]  # fmt: skip
    return {"type": "compliance", "command": command, "report": {"time": report.time, **summary(report),
            "failed_checks": failed}}  # fmt: skip


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."
