"""The hub with real agents: each a real rastosd on its own private bus and scratch btrfs root,
connected to a real `rastos-hub serve` over WebSocket with its own host token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.daemon_fixtures import (
    MANAGER,
    STRICT_POLICY,
    Rastosd,
    private_bus,
    require_root,
    scratch_root,
)
from tests.hub_fixtures import Hub, UiClient, postgresql_server, shared_hubs
from tests.hub_fixtures import hub as hub

pytestmark = pytest.mark.root

HUB = "org.rastos.Daemon1.Hub"


class Fleet:
    """Real agents, made on demand, all torn down at the end."""

    def __init__(self, hub: Hub, directory: Path, stack: contextlib.ExitStack) -> None:
        self.hub = hub
        self.directory = directory
        self.stack = stack
        self.agents: dict[str, Rastosd] = {}

    def add(
        self, name: str, groups: list[str] = [], extra: list[str] = [], start: bool = True,  # noqa: B006
        ca: Path | Literal["hub"] | None = "hub", hubs: list[Hub] | None = None,
    ) -> Rastosd:  # fmt: skip
        """A real agent of host `name`; with a TLS hub it verifies the hub against `ca`: by default the
        hub's own CA, None for the system's store. `hubs`: the hub processes it knows, in order (by
        default the fleet's hub only)."""
        token = self.hub.api("POST", "/api/v1/hosts", {"name": name, "groups": groups})["token"]
        home = self.directory / name
        home.mkdir(parents=True)
        (home / "token").write_text(token + "\n")
        urls = [each.agent_url for each in hubs or [self.hub]]
        url = json.dumps(urls[0] if len(urls) == 1 else urls)  # a TOML string or list: one or several hubs
        config = f'[hub]\nurl = {url}\ntoken_file = "{home / "token"}"\n'
        if ca == "hub":
            ca = self.hub.tls.ca if self.hub.tls else None
        if ca is not None:
            config += f'ca = "{ca}"\n'
        (home / "daemon.toml").write_text(config)
        bus = self.stack.enter_context(private_bus(STRICT_POLICY))
        scratch = self.stack.enter_context(scratch_root(home))
        daemon = Rastosd(bus, scratch, home / "state", config=home / "daemon.toml", extra=extra)
        self.agents[name] = daemon
        if start:
            daemon.start()
        self.stack.callback(lambda: daemon.process is not None and daemon.stop())
        return daemon


@pytest.fixture
def fleet(hub: Hub, tmp_path: Path) -> Iterator[Fleet]:
    require_root()
    with contextlib.ExitStack() as stack:
        yield Fleet(hub, tmp_path / "agents", stack)


def hub_jobs(daemon: Rastosd) -> list[tuple[int, str, str]]:
    """(job, hub command, state) of every job the daemon ran for the hub, from its own store."""
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "state.db")) as db:
        rows = db.execute("SELECT id, hub_command, state FROM jobs WHERE hub_command IS NOT NULL ORDER BY id")
        return [(int(a), str(b), str(c)) for a, b, c in rows]


def hub_status(daemon: Rastosd) -> dict[str, Any]:
    """Hub.GetStatus: the link's state and the hub URL it uses."""
    status: dict[str, Any] = json.loads(daemon.call(HUB, "GetStatus")[0])
    return status


def daemon_events(daemon: Rastosd) -> list[tuple[int, str]]:
    return [(e[0], e[3]) for e in daemon.call(MANAGER, "GetEventLog", "tu", "0", "10000")[0]]


def hub_events(hub: Hub, host: str) -> list[tuple[int, str]]:
    stored = hub.api("GET", f"/api/v1/events?host={host}&limit=1000")
    return [(e["agent_event"], e["method"]) for e in stored if e["actor"] == "agent"]


def online(*names: str) -> Any:
    return lambda state: all(state["hosts"].get(n, {}).get("online") and state["hosts"][n]["facts"] for n in names)


def test_a_pipeline_runs_on_a_group_with_and_semantics_per_host(hub: Hub, fleet: Fleet) -> None:
    one, two = fleet.add("one", ["web"]), fleet.add("two", ["web"])
    fleet.add("db", ["db"])
    (two.scratch.root / "etc" / "motd").mkdir()  # two's first step fails: a directory is in the way
    hub.wait_state(online("one", "two", "db"), "three agents online")
    steps = [{"op": "motd", "params": {"text": "managed by the hub"}},
             {"op": "sysctl", "params": {"settings": {"vm.swappiness": "10"}}}]  # fmt: skip
    run = hub.api("POST", "/api/v1/runs", {"target": {"group": "web"}, "steps": steps})
    assert sorted(c["host"] for c in run["commands"]) == ["one", "two"], "the group, and only the group"
    state = hub.wait_state(lambda s: s["runs"][run["id"]]["state"] != "running", "the run finished")
    finished = state["runs"][run["id"]]
    assert finished["state"] == "partial"
    by_host = {c["host"]: c for c in finished["commands"]}
    assert by_host["one"]["state"] == "done" and by_host["two"]["state"] == "failed"
    assert [s["state"] for s in by_host["one"]["result"]["steps"]] == ["changed", "changed"]
    assert [s["state"] for s in by_host["two"]["result"]["steps"]] == ["failed", "skipped"], "&& on two"
    assert (one.scratch.root / "etc/motd").read_text() == "managed by the hub\n"
    assert (one.scratch.root / "etc/sysctl.d/90-rastos.conf").exists()
    assert not (two.scratch.root / "etc/sysctl.d/90-rastos.conf").exists(), "two stopped at its failed step"
    for daemon, command in ((one, by_host["one"]), (two, by_host["two"])):
        assert [(job, key) for job, key, _ in hub_jobs(daemon)] == [(command["job_id"], command["id"])]
    assert hub_jobs(fleet.agents["db"]) == []
    # The hub heard each job's end through the agents' event logs, with its steps and output.
    hosts = hub.wait_state(lambda s: s["hosts"]["one"]["jobs"] and s["hosts"]["two"]["jobs"], "job history")["hosts"]
    assert hosts["one"]["jobs"][-1]["ops"] == ["motd", "sysctl"] and hosts["one"]["jobs"][-1]["state"] == "done"
    assert "wrote /etc/motd" in hosts["one"]["jobs"][-1]["result"]["steps"][0]["output"]
    # One's last change is the run, by its admin; two's changed nothing before its step failed.
    assert {k: hosts["one"]["last_change"][k] for k in ("by", "kind", "id", "what")} == {
        "by": "alice", "kind": "run", "id": run["id"], "what": "motd && sysctl"}  # fmt: skip
    assert hosts["two"]["last_change"] is None
    # The facts follow the event log: the pipeline's snapshots reach the hub among them.
    hub.wait_state(lambda s: bool(s["hosts"]["one"]["facts"].get("snapshots")), "the pipeline's snapshots in the facts")


def test_hub_killed_mid_run_and_agent_changed_while_it_was_away_converge_exactly_once(hub: Hub, fleet: Fleet) -> None:
    one, two = fleet.add("one"), fleet.add("two", start=False)
    hub.wait_state(online("one"), "agent one online")
    run = hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "parallelism": 1,
                                          "steps": [{"op": "motd", "params": {"text": "exactly once"}}]})  # fmt: skip
    hub.wait_state(lambda s: any(c["state"] != "pending" for c in s["runs"][run["id"]]["commands"]), "one sent")
    assert hub.stop(signal.SIGKILL) == -signal.SIGKILL
    # While the hub is gone, an admin on host one changes it locally: the agent must deliver this.
    one.call(MANAGER, "Apply", "sst", "hostname", json.dumps({"hostname": "changed-offline"}), "0")
    hub.start()
    two.start()  # its command has waited, pending, through the hub's death

    async def watch() -> None:
        async with UiClient(hub) as ui:
            await ui.until(lambda s: s["runs"][run["id"]]["state"] == "complete", "the run complete", timeout=120)
            await ui.until(
                lambda s: (s["hosts"]["one"]["facts"] or {}).get("hostname") == "changed-offline", "offline change"
            )
            await ui.assert_converged()

    asyncio.run(watch())
    for daemon in (one, two):
        assert len(hub_jobs(daemon)) == 1 and hub_jobs(daemon)[0][2] == "done", "each command ran exactly once"
        assert (daemon.scratch.root / "etc/motd").read_text() == "exactly once\n"
    for name, daemon in (("one", one), ("two", two)):
        # Every event of the daemon's log reaches the hub, once each and in order.
        deadline = time.monotonic() + 30
        while (delivered := hub_events(hub, name)) != (expected := daemon_events(daemon)):
            assert time.monotonic() < deadline, (name, delivered, expected)
            time.sleep(0.2)
    assert any(method == "Apply" for _, method in hub_events(hub, "one")), "the offline change reached the hub"


def test_a_hub_of_two_killed_mid_run_its_agents_move_to_the_other_and_the_run_completes_exactly_once(
    tmp_path: Path,
) -> None:
    """The twin of the test above with two hubs on one PostgreSQL database, each agent given both
    hubs' URLs (hub.url as a list): hub a is killed, and the agents move to hub b by themselves, one
    connected to a until then, two started after a is gone; b knows the run a started and which
    command a sent, and a run started on b reaches them there."""
    require_root()
    with (
        postgresql_server() as cluster,
        shared_hubs(cluster, tmp_path / "hubs") as (a, b),
        contextlib.ExitStack() as stack,
    ):
        fleet = Fleet(a, tmp_path / "agents", stack)
        one, two = fleet.add("one", hubs=[a, b]), fleet.add("two", start=False, hubs=[a, b])
        a.wait_state(online("one"), "agent one online on hub a")
        urls = [a.agent_url, b.agent_url]
        assert hub_status(one) | {"since": 0} == {"state": "connected", "url": a.agent_url, "urls": urls,
                                                  "error": None, "since": 0}, "the first hub of the list"  # fmt: skip
        steps = [{"op": "motd", "params": {"text": "exactly once"}}]
        run = a.api("POST", "/api/v1/runs", {"target": {"all": True}, "parallelism": 1, "steps": steps})
        b.wait_state(lambda s: any(c["state"] != "pending" for c in s["runs"][run["id"]]["commands"]), "one sent, on b")
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        two.start()  # tries hub a first, refused, then b

        async def watch() -> None:
            async with UiClient(b) as ui:
                await ui.until(lambda s: s["runs"][run["id"]]["state"] == "complete", "the run complete", timeout=120)
                await ui.assert_converged()

        asyncio.run(watch())
        for daemon in (one, two):
            assert len(hub_jobs(daemon)) == 1 and hub_jobs(daemon)[0][2] == "done", "each command ran exactly once"
            assert (daemon.scratch.root / "etc/motd").read_text() == "exactly once\n"
            status = hub_status(daemon)
            assert (status["state"], status["url"], status["urls"]) == ("connected", b.agent_url, urls), status
        assert one.process is not None and one.process.poll() is None, "one moved without a restart"
        steps = [{"op": "motd", "params": {"text": "from hub b"}}]
        later = b.api("POST", "/api/v1/runs", {"target": {"all": True}, "steps": steps})
        b.wait_state(lambda s: s["runs"][later["id"]]["state"] == "complete", "b's own run complete")
        for daemon in (one, two):
            assert [state for _, _, state in hub_jobs(daemon)] == ["done", "done"]
            assert (daemon.scratch.root / "etc/motd").read_text() == "from hub b\n"
        for name, daemon in (("one", one), ("two", two)):
            deadline = time.monotonic() + 30
            while (delivered := hub_events(b, name)) != (expected := daemon_events(daemon)):
                assert time.monotonic() < deadline, (name, delivered, expected)
                time.sleep(0.2)


def test_a_fallback_boot_reaches_the_hub_and_a_cancelled_run_ends_its_pending_commands(hub: Hub, fleet: Fleet) -> None:
    broken = fleet.add("broken", extra=["--booted-entry", "rastos-0.conf"], start=False)
    (broken.scratch.esp / "loader/entries/rastos-snapshot-4+0-3.conf").write_text(
        "title broken\nsort-key rastos-1\nlinux /rastos/vmlinuz\n"
        "options root=UUID=0 rootflags=subvol=@snapshots/4/deployment rw\n"
    )
    broken.start()
    fleet.add("away", start=False)  # registered, never connected: its commands stay pending
    # The agent sends its event log before its facts: wait for both, the event and the boot state.
    state = hub.wait_state(
        lambda s: (
            s["hosts"]["broken"]["last_rollback"] is not None and "boot_state" in (s["hosts"]["broken"]["facts"] or {})
        ),
        "the fallback and the facts after it",
    )
    host = state["hosts"]["broken"]
    assert host["health"] == "fell back" and host["facts"]["boot_state"]["kind"] == "fallback"
    assert host["last_rollback"]["method"] == "BootFallback"
    assert host["last_rollback"]["detail"]["failed_entry"] == "rastos-snapshot-4.conf"
    # rastosd said what booted once, at its start: the boot history shows the fallback, newest last.
    boots = hub.wait_state(lambda s: s["hosts"]["broken"]["boots"], "the boot reported")["hosts"]["broken"]["boots"]
    assert [(b["kind"], b["entry"], b["failed_entry"], b["failed_root"]) for b in boots] == [
        ("fallback", "rastos-0.conf", "rastos-snapshot-4.conf", "@snapshots/4/deployment")], boots  # fmt: skip
    assert host["boot_status"] == "fell back"
    assert state["hosts"]["away"]["health"] == "offline"

    run = hub.api(
        "POST", "/api/v1/runs", {"target": {"hosts": ["away"]}, "steps": [{"op": "motd", "params": {"text": "x"}}]}
    )
    assert run["commands"][0]["state"] == "pending"
    cancelled = hub.api("POST", f"/api/v1/runs/{run['id']}/cancel")
    assert cancelled["state"] == "cancelled" and cancelled["commands"][0]["state"] == "cancelled"
    status, answer = hub.request("POST", f"/api/v1/runs/{run['id']}/cancel")
    assert status == 409 and answer["error"].endswith("is cancelled already")


def test_a_risky_change_from_the_hub_is_confirmed_by_the_round_trip(hub: Hub, fleet: Fleet) -> None:
    """The agent's final status reaching the hub, and the hub's confirm reaching back, is the check that
    the host is still reachable after a network change: the change stands without anyone confirming."""
    agent = fleet.add("edge")
    hub.wait_state(online("edge"), "the agent online")
    steps = [{"op": "network", "params": {"interface": "eth0", "dhcp": "yes", "confirm_timeout": 30}}]
    run = hub.api("POST", "/api/v1/runs", {"target": {"hosts": ["edge"]}, "steps": steps})
    hub.wait_state(lambda s: s["runs"][run["id"]]["state"] == "complete", "the run complete")
    job_id = hub_jobs(agent)[0][0]
    deadline = time.monotonic() + 30
    while (confirmation := agent.job(job_id)["confirmation"])["state"] != "confirmed":
        assert confirmation["state"] == "pending", confirmation
        assert time.monotonic() < deadline, "the hub's confirm never arrived"
        time.sleep(0.2)
    assert "HubConfirm" in [method for _, method in daemon_events(agent)]
    assert "ConfirmSent" in [e["method"] for e in hub.api("GET", "/api/v1/events?limit=1000")]
    assert (agent.scratch.root / "etc/systemd/network/50-rastos-eth0.network").exists(), "the change stood"
