"""Compliance through the hub with a real agent: rastosd on its private bus and scratch btrfs root scans
itself when a run asks, remediates the checks named as one job, and scans again; the hub keeps what it
reported (tests/test_hub_compliance.py has the hub's side with simulated agents)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.daemon_fixtures import MANAGER
from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, hub_jobs, online
from tests.test_hub_fleet import fleet as fleet

pytestmark = pytest.mark.root
SYSCTL_FILE = "etc/sysctl.d/95-rastos-compliance.conf"


def ended(hub: Hub, run: dict[str, Any]) -> dict[str, Any]:
    state = hub.wait_state(lambda s: s["runs"][run["id"]]["state"] != "running", f"run {run['id']} ended")
    found: dict[str, Any] = state["runs"][run["id"]]
    return found


def test_a_real_agent_scans_remediates_the_checks_named_and_scans_again(hub: Hub, fleet: Fleet) -> None:
    agent = fleet.add("web-1", ["web"])
    hub.wait_state(online("web-1"), "the agent online")

    # A scan: the hub's report is the daemon's own scan, as ComplianceScan gives it on the bus.
    run = ended(hub, hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "compliance": {"action": "scan"}}))
    assert run["state"] == "complete", run
    own = json.loads(agent.call(MANAGER, "ComplianceScan")[0])
    kept = hub.api("GET", "/api/v1/hosts/web-1")["compliance"]
    assert [check["id"] for check in kept["failed_checks"]] == [c["id"] for c in own["checks"] if c["status"] == "fail"]
    assert (kept["passed"], kept["failed"], kept["not_applicable"]) == (
        own["summary"]["pass"], own["summary"]["fail"], own["summary"]["not-applicable"])  # fmt: skip
    assert kept["score"] == kept["passed"] / (kept["passed"] + kept["failed"]) and kept["command"] is not None
    assert "kernel-aslr" in [check["id"] for check in kept["failed_checks"]]
    assert run["commands"][0]["result"] == {"compliance": {key: kept[key] for key in ("passed", "failed",
                                                                                       "not_applicable")}}  # fmt: skip
    assert hub_jobs(agent) == [], "a scan changes nothing, and is no job"

    # A remediation of one check: one job on the host (a pipeline with its snapshots), then a scan again.
    body: dict[str, Any] = {"target": {"group": "web"},
                            "compliance": {"action": "remediate", "checks": ["kernel-aslr"]}}  # fmt: skip
    run = ended(hub, hub.api("POST", "/api/v1/runs", body))
    command = run["commands"][0]
    assert run["state"] == "complete" and command["job_id"] is not None, run
    assert [(job, key, state) for job, key, state in hub_jobs(agent)] == [(command["job_id"], command["id"], "done")]
    assert [step["op"] for step in command["result"]["steps"]] == ["sysctl"], command["result"]
    assert "kernel.randomize_va_space" in (agent.scratch.root / SYSCTL_FILE).read_text()
    after = hub.api("GET", "/api/v1/hosts/web-1")["compliance"]
    assert after["command"] == command["id"], "the scan after the job is the host's report now"
    failing = [check["id"] for check in after["failed_checks"]]
    assert "kernel-aslr" not in failing and "net-rp-filter" in failing, "only the check named was remediated"
    assert after["score"] > kept["score"] and command["result"]["compliance"]["failed"] == after["failed"]

    # A check the host does not know: refused by the agent, naming it, and nothing is run.
    body["compliance"]["checks"] = ["no-such-check"]
    run = ended(hub, hub.api("POST", "/api/v1/runs", body))
    assert run["state"] == "failed", run
    assert run["commands"][0]["result"]["error"].startswith("compliance.checks: no check 'no-such-check'"), run
    assert len(hub_jobs(agent)) == 1
