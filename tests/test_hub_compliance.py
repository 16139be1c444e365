"""Compliance scans and remediations dispatched through the hub: the run that carries them (REST and
`rastos-hub run start --compliance`), simulated agents that answer with the real protocol, each host's
newest report kept (score, failed checks) on both databases and across a restart, and the `compliance`
frame checked at both ends (tests/test_hub_compliance_agent.py has a real rastosd do the scanning)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.compliance.model import CheckResult, Remediation, Report, Severity, Status
from daemon.errors import InvalidParams
from daemon.hub_compliance import parse_request, report_frame
from hub.protocol import MAX_FINDING, ComplianceReport, ProtocolError, command_frame, parse_agent_message
from tests.hub_fixtures import Hub, _serving
from tests.hub_fixtures import any_hub as any_hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_run_cli import Agent, Agents, now, scenario

RUNS = "/api/v1/runs"


def failing(*ids: str) -> list[dict[str, str]]:
    return [{"id": check, "title": f"the title of {check}", "severity": "high", "finding": f"{check} found <b>x</b>"}
            for check in ids]  # fmt: skip


def report(command: str | None, passed: int, failed: list[dict[str, str]], not_applicable: int = 2) -> dict[str, Any]:
    return {"type": "compliance", "command": command, "report": {
        "time": 1700000000.5, "passed": passed, "failed": len(failed), "not_applicable": not_applicable,
        "failed_checks": failed}}  # fmt: skip


class ComplianceAgent(Agent):
    """Answers a compliance command as rastosd does: its report (`failed` fails, `passed` pass), then
    the command's end with the scan's counts."""

    def __init__(self, *args: Any, passed: int = 8, failed: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.passed, self.failed = passed, failed

    async def _carry_out(self, command: dict[str, Any], job: int) -> None:
        assert self.socket is not None and "steps" not in command, command
        frame = report(command["id"], self.passed, failing(*self.failed))
        await self.socket.send_json(frame)
        counts = {key: frame["report"][key] for key in ("passed", "failed", "not_applicable")}
        await self.socket.send_json({"type": "command_status", "command": command["id"], "state": "done",
                                     "job": None, "result": {"compliance": counts}})  # fmt: skip


async def add(agents: Agents, name: str, groups: tuple[str, ...] = (), **kwargs: Any) -> ComplianceAgent:
    token = await asyncio.to_thread(agents.hub.api, "POST", "/api/v1/hosts", {"name": name, "groups": list(groups)})
    agent = agents.agents[name] = ComplianceAgent(agents.hub, name, token["token"], agents.session, "done", **kwargs)
    await agent.connect()
    return agent


def test_a_scan_on_a_group_reaches_its_hosts_and_each_score_is_kept_across_a_restart(any_hub: Hub) -> None:
    hub = any_hub

    async def body(agents: Agents) -> None:
        web1 = await add(agents, "web-1", ("web",), passed=9, failed=("ssh-no-root-login",))
        web2 = await add(agents, "web-2", ("web",), passed=10)
        db = await add(agents, "db", ("db",))
        await asyncio.to_thread(hub.wait_state, lambda s: all(h["online"] for h in s["hosts"].values()), "online")
        run = await asyncio.to_thread(hub.api, "POST", RUNS, {"target": {"group": "web"},
                                                              "compliance": {"action": "scan"}})  # fmt: skip
        assert run["steps"] == [] and run["compliance"] == {"action": "scan", "checks": []}, run
        assert sorted(c["host"] for c in run["commands"]) == ["web-1", "web-2"]
        ended = await asyncio.to_thread(hub.wait_state, lambda s: s["runs"][run["id"]]["state"] != "running", "end")
        assert ended["runs"][run["id"]]["state"] == "complete"
        for agent in (web1, web2):
            assert list(agent.commands.values()) == [
                {"id": c["id"], "compliance": {"action": "scan", "checks": []}, "flags": 0}
                for c in run["commands"] if c["host"] == agent.name
            ], "a compliance command carries no steps"  # fmt: skip
        assert db.commands == {}, "the group, and only the group"

    scenario(hub, body)
    hosts = {host["name"]: host for host in hub.api("GET", "/api/v1/hosts")}
    assert hosts["db"]["compliance"] is None, "no scan, no report"
    one = hosts["web-1"]["compliance"]
    assert one["score"] == 0.9 and (one["passed"], one["failed"], one["not_applicable"]) == (9, 1, 2), one
    assert one["failed_checks"] == failing("ssh-no-root-login") and one["time"] == 1700000000.5
    assert hosts["web-2"]["compliance"]["score"] == 1.0 and hosts["web-2"]["compliance"]["failed_checks"] == []
    logged = [e for e in hub.api("GET", "/api/v1/events?method=ComplianceReport") if e["host"] == "web-1"]
    assert [(e["actor"], e["detail"]["score"], e["detail"]["failed_checks"]) for e in logged] == [
        ("agent", 0.9, ["ssh-no-root-login"])]  # fmt: skip
    hub.stop()
    hub.start()
    assert hub.api("GET", "/api/v1/hosts/web-1")["compliance"] == one, "kept in the database, not only in memory"


def test_a_newer_report_replaces_the_one_before_and_a_removed_host_takes_its_report_along(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        agent = await add(agents, "web-1")
        assert agent.socket is not None
        await agent.socket.send_json(report(None, 3, failing("a", "b", "c"), not_applicable=0))
        await asyncio.to_thread(hub.wait_state, lambda s: s["hosts"]["web-1"]["compliance"], "the first report")
        await agent.socket.send_json(report(None, 0, [], not_applicable=5))
        await asyncio.to_thread(
            hub.wait_state, lambda s: (s["hosts"]["web-1"]["compliance"] or {}).get("failed") == 0, "the second"
        )

    scenario(hub, body)
    kept = hub.api("GET", "/api/v1/hosts/web-1")["compliance"]
    assert kept["score"] is None and kept["not_applicable"] == 5, "no check applies: no score, not 0 nor 1"
    hub.api("DELETE", "/api/v1/hosts/web-1")
    hub.api("POST", "/api/v1/hosts", {"name": "web-1"})
    assert hub.api("GET", "/api/v1/hosts/web-1")["compliance"] is None, "a host of the same name starts anew"


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    for server in _serving(Hub(Path(tmp_path_factory.mktemp("compliance")) / "hub")):
        server.api("POST", "/api/v1/hosts", {"name": "away", "groups": ["web"]})
        yield server


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"compliance": {"action": "audit"}}, "compliance.action: 'audit' is not one of ['scan', 'remediate']"),
        ({"compliance": {"action": "scan", "checks": ["ssh-x"]}},
         "compliance.checks: only a remediation takes checks; a scan runs them all"),
        ({"compliance": {"action": "remediate", "checks": ["Not An Id"]}}, "compliance.checks.0: 'Not An Id' does"),
        ({"compliance": {"action": "remediate", "checks": ["a", "a"]}}, "compliance.checks: ['a', 'a'] has non-uniq"),
        ({"compliance": {"action": "scan", "why": 1}}, "compliance: Additional properties are not allowed"),
        ({"compliance": {}}, "compliance: 'action' is a required property"),
        ({"compliance": {"action": "scan"}, "steps": [{"op": "motd"}]},
         "compliance: a run has one of steps, a workflow or compliance, not steps and compliance"),
        ({"compliance": {"action": "scan"}, "workflow": {"name": "security"}},
         "compliance: a run has one of steps, a workflow or compliance, not workflow and compliance"),
        ({}, "steps: required (or a workflow, or compliance)"),
    ],
)  # fmt: skip
def test_a_bad_compliance_run_is_refused_naming_the_field(shared_hub: Hub, body: dict[str, Any], error: str) -> None:
    status, answer = shared_hub.request("POST", RUNS, {"target": {"all": True}, **body})
    assert status == 400 and answer["error"].startswith(error), answer
    assert shared_hub.api("GET", RUNS) == [], "nothing refused is made"


def test_a_viewer_may_not_start_a_scan_and_an_operator_may(shared_hub: Hub) -> None:
    hub = shared_hub
    tokens = {}
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        added = hub.cli("admin", "add", name, "--role", role)
        assert added.returncode == 0, added.stderr
        tokens[role] = added.stdout.strip().splitlines()[-1]
    body = {"target": {"group": "web"}, "compliance": {"action": "remediate", "checks": ["ssh-no-root-login"]}}
    status, answer = hub.request("POST", RUNS, body, token=tokens["viewer"])
    assert (status, answer["error"]) == (403, "role: POST /api/v1/runs needs the role operator; vera has the role "
                                              "viewer"), answer  # fmt: skip
    status, run = hub.request("POST", RUNS, body, token=tokens["operator"])
    assert status == 201 and run["admin"] == "otto" and run["compliance"] == body["compliance"], run
    assert [(c["host"], c["state"]) for c in run["commands"]] == [("away", "pending")], "offline: it waits"
    started = [e for e in hub.api("GET", "/api/v1/events?method=RunStarted") if e["detail"]["run"] == run["id"]]
    assert started[0]["detail"]["compliance"] == "remediate" and started[0]["detail"]["ops"] == []
    hub.api("POST", f"{RUNS}/{run['id']}/cancel")


# The frame, at each end


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"failed": 2}, "message.report.failed: 2, but failed_checks lists 1"),
        ({"passed": -1}, "message.report.passed: -1 is less than the minimum of 0"),
        ({"passed": 999, "not_applicable": 999}, "message.report: more than the 1000 checks a scan may count"),
        ({"time": "yesterday"}, "message.report.time: 'yesterday' is not of type 'number'"),
        ({"failed_checks": [{**failing("x")[0], "id": "../etc"}]}, "message.report.failed_checks[0].id: '../etc'"),
        ({"failed_checks": [{**failing("x")[0], "severity": "dire"}]}, "message.report.failed_checks[0].severity:"),
        ({"failed_checks": [{**failing("x")[0], "finding": "f" * (MAX_FINDING + 1)}]},
         "message.report.failed_checks[0].finding: 'fff"),
        ({"failed_checks": [{**failing("x")[0], "script": "<script>"}]},
         "message.report.failed_checks[0]: Additional properties are not allowed"),
        ({"failed_checks": failing("x", "x"), "failed": 2}, "message.report.failed_checks: a check is listed twice"),
        ({"score": 1.0}, "message.report: Additional properties are not allowed ('score' was unexpected)"),
    ],
)  # fmt: skip
def test_a_malformed_report_is_refused_by_the_hub_naming_the_field(change: dict[str, Any], error: str) -> None:
    frame = report("c1", 5, failing("x"))
    frame["report"].update(change)
    with pytest.raises(ProtocolError) as caught:
        parse_agent_message(frame)
    assert caught.value.message.startswith(error), caught.value.message
    with pytest.raises(ProtocolError) as caught:
        parse_agent_message({**report("c1", 5, []), "command": 7})
    assert caught.value.message.startswith("message.command: 7 is not valid"), caught.value.message


def test_a_malformed_report_from_an_agent_closes_its_link_and_stores_nothing(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "web-1"})["token"]

    async def body() -> None:
        async with aiohttp.ClientSession() as session:
            socket = await session.ws_connect(hub.agent_url, headers={"Authorization": f"Bearer {token}"})
            await socket.receive_json()  # welcome
            bad = report(None, 1, failing("x"))
            bad["report"]["failed"] = 0
            await socket.send_json(bad)
            answer = await socket.receive_json()
            assert answer == {"type": "error", "message": "message.report.failed: 0, but failed_checks lists 1"}
            assert (await socket.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    asyncio.run(body())
    assert hub.api("GET", "/api/v1/hosts/web-1")["compliance"] is None
    assert hub.api("GET", "/api/v1/events?method=ComplianceReport") == []


TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=1500)
RESULT = st.builds(
    CheckResult,
    id=st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True),
    title=TEXT, rationale=TEXT, severity=st.sampled_from(list(Severity)), status=st.sampled_from(list(Status)),
    finding=TEXT, remediation=st.none() | st.just(Remediation("motd", {"text": "x"})), manual=TEXT,
)  # fmt: skip


@settings(max_examples=100, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(results=st.lists(RESULT, max_size=70, unique_by=lambda r: r.id), command=st.none() | st.just("c1"))
def test_whatever_a_scan_found_the_agents_report_is_one_the_hub_takes(results: list[CheckResult], command: Any) -> None:
    scanned = Report("/", True, time.time(), tuple(results))
    frame = json.loads(json.dumps(report_frame(scanned, command)))  # as it crosses the wire
    kind, taken = parse_agent_message(frame)
    assert kind == "compliance" and isinstance(taken, ComplianceReport)
    assert (taken.passed, taken.failed, taken.not_applicable) == tuple(
        scanned.count(status) for status in (Status.PASS, Status.FAIL, Status.NOT_APPLICABLE)
    )
    assert [check["id"] for check in taken.failed_checks] == [result.id for result in scanned.failed]
    assert all(len(check["finding"]) <= MAX_FINDING for check in taken.failed_checks), "long findings cut, not refused"


REQUEST = st.fixed_dictionaries(
    {"action": st.sampled_from(["scan", "remediate"])},
    optional={"checks": st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True), max_size=5, unique=True)},
)
JUNK = st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2) | st.booleans()


@settings(max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=REQUEST, key=st.sampled_from(["action", "checks", "extra", None]), junk=JUNK)
def test_the_agent_takes_what_the_hub_sends_and_refuses_anything_else_naming_the_field(
    request: dict[str, Any], key: str | None, junk: Any
) -> None:
    if request.get("checks") and request["action"] == "scan":
        request = {**request, "action": "remediate"}  # what the hub sends (api.check_new_run)
    frame = command_frame("c1", [], 0, request)
    taken = parse_request(frame)
    assert (taken.action, list(taken.checks)) == (request["action"], request.get("checks", []))
    if key is None:
        return
    changed = {**request, key: junk}
    try:
        again = parse_request(command_frame("c1", [], 0, changed))
    except InvalidParams as error:
        assert error.field.startswith(f"compliance.{key}"), (error.field, changed)
    else:  # junk that happens to be a valid value
        assert key == "checks" and again.checks == tuple(junk), changed
    with pytest.raises(InvalidParams) as caught:
        parse_request({"id": "c1", "compliance": junk})
    assert caught.value.field == "compliance"


# rastos-hub run start --compliance


def test_the_cli_starts_a_scan_and_a_remediation_and_follows_each_hosts_counts(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        await add(agents, "web-1", passed=3, failed=("ssh-no-root-login",))
        await asyncio.to_thread(hub.wait_state, lambda s: s["hosts"]["web-1"]["online"], "online")
        from tests.test_hub_run_cli import rastos_hub

        done = await rastos_hub(hub, "run", "start", "--all", "--compliance", "scan", "--follow")
        assert done.status == 0, done.err
        assert "started: compliance scan on 1 host(s)" in done.out, done.out
        assert "  compliance: 3 passed, 1 failed, 2 not applicable (score 75%)" in done.out, done.out
        done = await rastos_hub(hub, "run", "start", "--host", "web-1", "--compliance", "remediate",
                                "--check", "ssh-no-root-login", "--dry-run", "--json")  # fmt: skip
        assert done.status == 0, done.err
        run = done.json()
        assert run["compliance"] == {"action": "remediate", "checks": ["ssh-no-root-login"]} and run["flags"] == 1

    scenario(hub, body)
    for args, error in (
        (("--check", "ssh-x", "--compliance", "scan"), "--check: only with --compliance remediate"),
        (("--compliance", "remediate", "--check", "Bad Id"), "--check: 'Bad Id' is not a check's id"),
    ):
        refused = now(hub, "run", "start", "--all", *args)
        assert refused.status == 2 and error in refused.err, refused
    refused = now(hub, "run", "start", "--all", "--compliance", "audit")
    assert refused.status == 2 and "invalid choice: 'audit'" in refused.err, refused
    assert len(hub.api("GET", RUNS)) == 2, "nothing refused was sent"
    shown = now(hub, "run", "list")
    assert "compliance remediate (ssh-no-root-login)" in shown.out and "compliance scan" in shown.out, shown.out
