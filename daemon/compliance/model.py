"""What a check is, what it found, and the report that holds a scan: plain data that round-trips JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.compliance.facts import Facts

REPORT_VERSION = 1


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_APPLICABLE = "not-applicable"


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True)
class Remediation:
    """The op step that makes a failed check pass; the params are only what this check needs, merged
    with other checks' and the host's current settings when the pipeline is built (remediate.py)."""

    op: str
    params: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"op": self.op, "params": self.params}


@dataclass(frozen=True)
class Outcome:
    status: Status
    finding: str  # one line: what was found, with the value and where it comes from
    remediable: bool = True  # False: the op cannot fix it here as things are (the finding says why)


def passed(finding: str) -> Outcome:
    return Outcome(Status.PASS, finding)


def failed(finding: str, remediable: bool = True) -> Outcome:
    return Outcome(Status.FAIL, finding, remediable)


def not_applicable(finding: str) -> Outcome:
    return Outcome(Status.NOT_APPLICABLE, finding)


@dataclass(frozen=True)
class Check:
    id: str  # stable: scripts and `rastosctl compliance remediate --check` name checks by it
    title: str
    rationale: str
    severity: Severity
    evaluate: Callable[[Facts], Outcome]
    remediation: Remediation | None = None
    manual: str = ""  # what an admin does when no op remediates it (a test: one of the two is there)


@dataclass(frozen=True)
class CheckResult:
    id: str
    title: str
    rationale: str
    severity: Severity
    status: Status
    finding: str
    remediation: Remediation | None  # None when no op remediates it, or not here (Outcome.remediable)
    manual: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "rationale": self.rationale, "severity": str(self.severity),
            "status": str(self.status), "finding": self.finding,
            "remediation": self.remediation.as_json() if self.remediation else None, "manual": self.manual,
        }  # fmt: skip

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> CheckResult:
        remediation = document["remediation"]
        return cls(
            document["id"], document["title"], document["rationale"], Severity(document["severity"]),
            Status(document["status"]), document["finding"],
            Remediation(remediation["op"], remediation["params"]) if remediation else None, document["manual"],
        )  # fmt: skip


@dataclass(frozen=True)
class Report:
    target: str  # the root scanned
    live: bool  # whether the running kernel's values were read too
    time: float
    results: tuple[CheckResult, ...]
    # Per op, the params that keep what the host has now: a remediation changes only what it must.
    context: dict[str, dict[str, Any]] = field(default_factory=dict)

    def count(self, status: Status) -> int:
        return sum(1 for result in self.results if result.status is status)

    @property
    def failed(self) -> list[CheckResult]:
        return [result for result in self.results if result.status is Status.FAIL]

    def as_json(self) -> dict[str, Any]:
        """The report; report.py's `to_json` adds what is derived from it (the remediation pipeline)."""
        return {
            "version": REPORT_VERSION, "target": self.target, "live": self.live, "time": self.time,
            "summary": {str(status): self.count(status) for status in Status},
            "checks": [result.as_json() for result in self.results], "context": self.context,
        }  # fmt: skip

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Report:
        if document.get("version") != REPORT_VERSION:
            raise ValueError(f"a compliance report of version {document.get('version')!r}; this reads {REPORT_VERSION}")
        results = tuple(CheckResult.from_json(check) for check in document["checks"])
        return cls(document["target"], document["live"], document["time"], results, document["context"])
