"""The hub's web UI as an operator uses it, in headless Chromium against a real hub with simulated
agents (the real protocol over a real WebSocket, answering as each test says): runs started from the
forms the ops' schemas make, a pipeline of two ops among them, checked in the page before anything is
sent; and the fleet at a glance, its counts live, its hosts sorted and filtered, whatever the agents
report. Each test saves the pages it looks at, on a desktop and on a phone, under its tmp_path."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_rollouts import SimAgent, SimFleet, api, eventually
from tests.test_hub_ui import DESKTOP, PHONE, Background
from tests.test_hub_ui import browser as browser

pytestmark = pytest.mark.root


class Agent(SimAgent):
    """A simulated agent that keeps the commands and actions the hub sends it, and reports on them as told."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.commands: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(message.data)
            if frame["type"] == "command":
                self.commands.append(frame["command"])
            elif frame["type"] == "action":
                self.actions.append(frame["action"])

    async def status(self, state: str, job: int | None = None, result: dict[str, Any] | None = None) -> None:
        """Where the last command sent stands, as rastosd's hub link reports it."""
        await self.send({"type": "command_status", "command": self.commands[-1]["id"], "state": state, "job": job,
                         "result": result})  # fmt: skip

    async def answer(self, state: str, **result: Any) -> None:
        """How the last action sent ended, as rastosd's hub link answers (daemon/hub_actions.py)."""
        outcome = {"snapshot": self.actions[-1]["snapshot"], "entry": None, "reboot_needed": False, "error": None}
        await self.send({"type": "action_status", "action": self.actions[-1]["id"], "state": state,
                         **outcome, **result})  # fmt: skip


class Agents:
    """Simulated agents on an event loop of their own, beside Playwright's synchronous API."""

    def __init__(self, hub: Hub) -> None:
        self.hub, self.run, self.sims = hub, Background(), SimFleet(hub)
        self.run(self.sims.__aenter__())

    def add(self, name: str, groups: list[str], online: bool = True, **boot: str) -> Agent:
        async def add() -> Agent:
            token = (await api(self.hub, "POST", "/api/v1/hosts", {"name": name, "groups": groups}))["token"]
            assert self.sims.session is not None
            agent = self.sims.agents[name] = Agent(self.hub, name, token, "1.0", self.sims.session)
            agent.boot.update(boot)
            if online:
                await agent.connect()
            return agent

        return self.run(add())

    def close(self) -> None:
        self.run(self.sims.__aexit__(None, None, None))
        self.run.close()


@contextmanager
def agents(hub: Hub) -> Iterator[Agents]:
    fleet = Agents(hub)
    try:
        yield fleet
    finally:
        fleet.close()


def logged_in(hub: Hub, browser: Browser, token: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(hub.url)
    page.fill("#token", token)
    page.click("#login button")
    expect(page.locator("#connection")).to_have_text("live")
    page.evaluate("window.notReloaded = true")
    return page, errors


def screenshots(page: Page, directory: Path, name: str) -> None:
    """The whole page on a desktop and on a phone, saved to look at; neither is wider than its window."""
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], f"{name} at {size}: the page is {widths[0]} px wide in {widths[1]}"
        page.screenshot(path=directory / f"{name}-{size}.png", full_page=True)
    page.set_viewport_size(DESKTOP)


def test_runs_start_from_forms_made_from_the_ops_schemas(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    added = hub.call("admin", "add", "otto", "--role", "operator")
    assert added.returncode == 0, added.stderr
    with agents(hub) as fleet:
        web1, web2, db1 = fleet.add("web-1", ["web"]), fleet.add("web-2", ["web"]), fleet.add("db-1", ["db"])
        page, errors = logged_in(hub, browser, added.stdout.strip().splitlines()[-1])
        expect(page.locator("#who")).to_have_text("otto (operator)")
        # An operator may not upload images: neither the form nor its empty error line takes room.
        assert page.locator("#images-error").bounding_box() is None
        expect(page.locator("#image-upload")).to_be_hidden()

        # The target: a group of the live state's, and how many hosts it names.
        page.select_option("#target-kind", "group")
        expect(page.locator("#target-group option")).to_have_text(["db", "web"])
        page.select_option("#target-group", "web")
        expect(page.locator("#target-count")).to_have_text("2 hosts")
        page.select_option("#target-kind", "hosts")
        page.fill("#target-value", "web-1, web-9")
        expect(page.locator("#target-count")).to_have_text("1 host; no host named web-9")
        page.select_option("#target-kind", "group")

        # A step's form from its op's schema: labelled fields, defaults filled, required ones marked.
        steps = page.locator("#step-list .step")
        first = steps.nth(0)
        first.locator("select.op").select_option("motd")
        expect(first.get_by_label("dynamic")).not_to_be_checked()
        expect(first.locator('.field:has([name="text"]) abbr[title="required"]')).to_have_count(1)
        expect(first.locator('[name="text"]')).to_have_attribute("aria-required", "true")
        page.click("#add-step")
        expect(steps).to_have_count(2)
        second = steps.nth(1)
        expect(second.locator("select.op")).to_be_focused()
        second.locator("select.op").select_option("sysctl")
        expect(second.locator('[name="name"]')).to_have_value("90-rastos")
        expect(second.get_by_label("security")).not_to_be_checked()
        expect(second.locator(".field.pairs .help")).to_contain_text("NAME=VALUE, one a line")

        # Checked in the page: a required field left empty, a line that is no NAME=VALUE, a number out
        # of its range, each named; the first refused gets the focus; nothing is sent.
        second.locator('[name="settings"]').fill("vm.swappiness=10\nnot a setting")
        page.click("#add-step")
        third = steps.nth(2)
        third.locator("select.op").select_option("ssh")
        third.locator('[name="port"]').fill("70000")
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text(
            "step 1 (motd): text: required; step 2 (sysctl): settings: line 2: write NAME=VALUE; "
            "step 3 (ssh): port: must be at most 65535"
        )
        expect(first.locator('[name="text"]')).to_be_focused()
        expect(first.locator('[name="text"]')).to_have_attribute("aria-invalid", "true")
        expect(third.locator(".field:has([name=port]) .error")).to_have_text("must be at most 65535")
        assert hub.api("GET", "/api/v1/runs") == [], "nothing was sent"
        screenshots(page, tmp_path, "run-form-refused")

        # Put right, the third step removed: a pipeline of two ops goes to the group's hosts, with the
        # params set and none of the defaults.
        third.get_by_role("button", name="Remove step 3").click()
        expect(steps).to_have_count(2)
        first.locator('[name="text"]').fill("set from a form")
        second.locator('[name="settings"]').fill("vm.swappiness=10\nnet.core.somaxconn = 1024")
        second.get_by_label("security").check()
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text("")
        fleet.run(eventually(lambda: web1.commands and web2.commands, "both hosts have the command"))
        assert web1.commands[0]["steps"] == [
            {"op": "motd", "params": {"text": "set from a form"}},
            {"op": "sysctl", "params": {"settings": {"vm.swappiness": "10", "net.core.somaxconn": "1024"},
                                        "sets": ["security"]}},
        ], web1.commands  # fmt: skip
        assert web1.commands[0]["flags"] == 0
        assert db1.commands == [], "db-1 is not in the group"

        # Its progress, live: each host's state and job as its agent reports them, then the outcome.
        run = page.locator("#runs .run").first
        expect(run).to_contain_text("motd && sysctl on group web by otto")
        fleet.run(web1.status("running", 7))
        expect(run.locator('tr[data-host="web-1"]')).to_contain_text("running")
        expect(run.locator('tr[data-host="web-1"]')).to_contain_text("job 7")
        expect(run.locator(".badge").first).to_have_text("running")
        changed = {"op": "motd", "state": "changed",
                   "changes": [{"subject": "/etc/motd", "action": "create", "detail": "+set from a form"}]}  # fmt: skip
        fleet.run(web1.status("done", 7, {"steps": [changed, {"op": "sysctl", "state": "unchanged", "changes": []}]}))
        # What a real run changed is there too, folded away; unfolded, it stays so as the run goes on.
        expect(run.locator(".plan summary")).to_have_text("changes: 1 change")
        expect(run.locator(".plan .diff")).to_be_hidden()
        run.locator(".plan summary").click()
        fleet.run(web2.status("failed", 3, {"error": "step 1 (motd): /etc/motd: is a directory"}))
        expect(run.locator(".badge").first).to_have_text("partial")
        expect(run.locator('tr[data-host="web-2"]')).to_contain_text("/etc/motd: is a directory")
        expect(run.locator(".plan .diff .add")).to_have_text(["+set from a form"])
        expect(page.locator('#glance [data-glance="failed-run"] strong')).to_have_text("1")
        screenshots(page, tmp_path, "run-form")

        # The JSON mode holds what the form does; a parameter no form has keeps the page in it.
        page.check("#advanced")
        expect(page.locator("#steps-form")).to_be_hidden()
        assert json.loads(page.input_value("#steps")) == web1.commands[0]["steps"]
        page.fill("#steps", json.dumps([{"op": "motd", "params": {"text": "x", "colour": "red"}}]))
        page.click("#advanced")
        expect(page.locator("#advanced")).to_be_checked()
        expect(page.locator("#dispatch-error")).to_contain_text("steps[0].params.colour: motd has no such parameter")
        # Sent as written, the hub refuses it, naming the field, beside the form.
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_contain_text("colour")
        page.fill("#steps", json.dumps([{"op": "hostname", "params": {"hostname": "web-7"}}]))
        page.click("#advanced")
        expect(steps).to_have_count(1)
        expect(steps.first.locator("select.op")).to_have_value("hostname")
        expect(steps.first.locator('[name="hostname"]')).to_have_value("web-7")
        assert len(hub.api("GET", "/api/v1/runs")) == 1
        assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
        assert errors == [], errors
        page.close()


# What an agent may send that the hub lets through (hub/protocol.py): strings up to their limits and of
# any content, and job summaries and results of any shape.
HOSTILE = "<img src=x onerror=window.pwned=1><script>window.pwned=1</script>"
HOSTILE_BOOT = {"kind": HOSTILE, "root": "@" + "x" * 4000, "health": "<b>bold</b>", "image_version": "\u202e1.0"}
HOSTILE_STEPS = [7, {"op": {"a": 1}, "state": None, "changes": HOSTILE, "output": {"x": HOSTILE}},
                 {"op": HOSTILE, "changes": [5, {"subject": [HOSTILE], "detail": {"a": 1}}]}]  # fmt: skip
HOSTILE_JOB = {"state": {"nested": [HOSTILE]}, "kind": 5, "ops": HOSTILE, "result": {"steps": HOSTILE_STEPS}}


def run_on(hub: Hub, fleet: Agents, agent: Agent, state: str, result: dict[str, Any]) -> None:
    """A run of one op on the agent's host, which the agent reports ended in `state` with `result`."""
    body = {"target": {"hosts": [agent.name]}, "steps": [{"op": "motd", "params": {"text": "x"}}]}
    command = hub.api("POST", "/api/v1/runs", body)["commands"][0]["id"]
    fleet.run(eventually(lambda: agent.commands and agent.commands[-1]["id"] == command, f"{agent.name}'s command"))
    fleet.run(agent.status(state, 1, result))


def test_the_fleet_at_a_glance_counts_sorts_and_filters_live_whatever_agents_report(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"], image_version="1.10")
        fleet.add("web-2", ["web"], kind="fallback", health="bad", image_version="1.9")
        db1 = fleet.add("db-1", ["db"], image_version="1.2")
        fleet.add("web-3", ["web"], online=False)
        evil = fleet.add("evil", ["db"])
        fleet.run(evil.send({"type": "facts", "facts": {"hostname": HOSTILE, "boot_state": HOSTILE_BOOT,
                                                        "jobs": [HOSTILE_JOB]}}))  # fmt: skip
        event = {"id": 1, "time": time.time(), "uid": 0, "method": "JobFinished", "job": 4, "detail": HOSTILE_JOB}
        fleet.run(evil.send({"type": "events", "events": [event]}))
        # db-1's last run failed; evil's result is of no shape the page expects.
        for agent, state in ((db1, "failed"), (evil, "done")):
            run_on(hub, fleet, agent, state, {"error": {"nested": HOSTILE}, "steps": HOSTILE_STEPS})
        page, errors = logged_in(hub, browser, hub.admin_token)
        hosts = page.locator("#hosts tbody tr")

        def shown() -> list[str | None]:
            return [row.get_attribute("data-host") for row in hosts.all()]

        # The counts: web-3 never came online; evil's health is whatever its agent said.
        glance = page.locator("#glance li")
        expect(glance).to_have_text(
            ["4 online", "1 offline", "2 healthy", "1 in fallback", "0 pending confirmation", "1 failed last run"]
        )
        expect(hosts).to_have_count(5)
        assert shown() == ["db-1", "evil", "web-1", "web-2", "web-3"], "by name at first"

        # An agent goes away: the counts follow, unreloaded, and the count the keyboard is on keeps its focus.
        offline = page.locator('#glance [data-glance="offline"] button')
        offline.focus()
        fleet.run(web1.disconnect())
        expect(glance).to_have_text(
            ["3 online", "2 offline", "1 healthy", "1 in fallback", "0 pending confirmation", "1 failed last run"]
        )
        expect(offline).to_be_focused()

        # Sorted by a click on a column's header, the other way by a second; by the keyboard too.
        page.locator('#hosts th[data-sort="name"] button').click()
        expect(page.locator('#hosts th[data-sort="name"]')).to_have_attribute("aria-sort", "descending")
        assert shown() == ["web-3", "web-2", "web-1", "evil", "db-1"]
        page.locator('#hosts th[data-sort="image"] button').focus()
        page.keyboard.press("Enter")
        expect(page.locator('#hosts th[data-sort="image"]')).to_have_attribute("aria-sort", "ascending")
        # Versions in their order (1.2 < 1.9 < 1.10), hosts without one first.
        assert shown() == ["web-3", "evil", "db-1", "web-2", "web-1"], shown()
        page.locator('#hosts th[data-sort="run"] button').press("Space")
        assert shown()[-2:] == ["evil", "db-1"], "done, then failed: by the last run's state"

        # Filtered: by group, by a count (which is the health filter's choice too), by words.
        page.select_option("#filter-group", "db")
        expect(hosts).to_have_count(2)
        expect(page.locator("#hosts-shown")).to_have_text("2 of 5 hosts")
        page.select_option("#filter-group", "")
        page.locator('#glance [data-glance="fallback"] button').click()
        expect(page.locator("#filter-health")).to_have_value("is:fallback")
        assert shown() == ["web-2"]
        page.select_option("#filter-health", "is:offline")
        assert sorted(shown()) == ["web-1", "web-3"]  # type: ignore[type-var]
        page.select_option("#filter-health", "")
        page.fill("#filter-text", "web-")
        expect(hosts).to_have_count(3)
        page.fill("#filter-text", "no such host")
        expect(hosts).to_have_text(["No host matches these filters."])
        page.fill("#filter-text", "")
        expect(hosts).to_have_count(5)

        # Nothing an agent sent ran or became markup; its host's detail and run show as text.
        page.locator('#hosts tr[data-host="evil"]').click()
        expect(page.locator("#detail-name")).to_have_text("evil")
        expect(page.locator("#jobs .run")).to_have_count(1)
        expect(page.locator('#hosts tr[data-host="evil"] td').nth(2)).to_have_text(HOSTILE)
        evil_run = page.locator("#runs .run", has_text="on hosts evil")
        expect(evil_run.locator("tr").first).to_contain_text(json.dumps({"nested": HOSTILE}, separators=(",", ":")))
        expect(evil_run.locator(".plan summary")).to_have_text("changes: 2 changes")
        evil_run.locator(".plan summary").click()
        expect(evil_run.locator(".plan .change").last).to_contain_text(f'["{HOSTILE}"]')
        for area in ("#main img", "#main script", "#main b"):
            expect(page.locator(area)).to_have_count(0)
        assert page.evaluate("window.pwned") is None
        expect(page.locator('#hosts tr[data-host="db-1"]')).to_be_visible()
        screenshots(page, tmp_path, "fleet")
        assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
        assert errors == [], errors
        page.close()


SNAPSHOTS = [
    {"id": 1, "created": 1_700_000_000.0, "description": "first boot", "kind": "manual", "known_good": True},
    {"id": 2, "created": 1_700_086_400.0, "description": "before motd", "kind": "pre", "known_good": False},
    {"id": 3, "created": 1_700_172_800.0, "description": "x" * 300, "kind": "manual", "known_good": False},
]


def test_a_hosts_snapshots_are_a_timeline_acted_on_after_a_confirmation(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"], snapshot="2", kind="rollback", root="@snapshots/2/deployment")
        fleet.add("db-1", ["db"])
        fleet.run(web1.send({"type": "facts", "facts": {"hostname": "web-1", "boot_state": web1.boot,
                                                         "snapshots": SNAPSHOTS}}))  # fmt: skip
        page, errors = logged_in(hub, browser, hub.admin_token)
        page.locator('#hosts tr[data-host="web-1"]').click()
        timeline = page.locator("#snapshots li.snapshot")
        # Newest first; the booted one and the known-good one marked; a long description cut.
        expect(timeline).to_have_count(3)
        assert [item.get_attribute("data-snapshot") for item in timeline.all()] == ["3", "2", "1"]
        expect(timeline.nth(1).locator(".badge")).to_have_text(["booted"])
        expect(timeline.nth(2).locator(".badge")).to_have_text(["known good"])
        expect(timeline.nth(0).locator(".description")).to_have_text("x" * 100 + "…")
        expect(page.locator("#detail-boot")).to_contain_text("Running rollback @snapshots/2/deployment (snapshot 2)")

        # Asked first, in a dialog naming the host and the snapshot; Escape or Cancel send nothing.
        dialog = page.locator("#confirm")
        rollback = timeline.nth(2).get_by_role("button", name="Roll back…")
        rollback.click()
        expect(dialog).to_be_visible()
        expect(dialog.locator("#confirm-title")).to_have_text("Roll web-1 back to snapshot 1?")
        expect(dialog.locator("#confirm-text")).to_contain_text("snapshot 1 (manual,")
        expect(dialog.locator("#confirm-cancel")).to_be_focused()
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.screenshot(path=tmp_path / f"host-dialog-{size}.png")
        page.set_viewport_size(DESKTOP)
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        rollback.click()
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert web1.actions == [], "nothing was sent"
        assert not [e for e in hub.api("GET", "/api/v1/events?method=HostActionRequested")], "nor logged"

        # Confirmed (by the keyboard): sent to the agent, and its answer shows live.
        rollback.click()
        page.keyboard.press("Tab")
        expect(dialog.locator("#confirm-ok")).to_be_focused()
        page.keyboard.press("Enter")
        expect(dialog).to_be_hidden()
        fleet.run(eventually(lambda: web1.actions, "the action reached the agent"))
        assert {k: web1.actions[0][k] for k in ("kind", "snapshot", "description")} == {
            "kind": "rollback", "snapshot": 1, "description": None}  # fmt: skip
        action = page.locator("#actions li").first
        expect(action.locator(".badge")).to_have_text("sent")
        expect(action).to_contain_text("roll back snapshot 1 by alice")
        fleet.run(web1.answer("done", entry="rastos-snapshot-1.conf", reboot_needed=True))
        expect(action.locator(".badge")).to_have_text("done")
        expect(action.locator(".outcome")).to_have_text(" boots next (entry rastos-snapshot-1.conf): reboot needed")
        expect(timeline.nth(2).locator(".badge")).to_have_text(["known good", "next boot"])

        # A snapshot, with its description; the daemon's refusal shows as the action's error.
        page.fill("#snapshot-description", "before <b>the</b> upgrade")
        page.click("#snapshot-button")
        expect(dialog.locator("#confirm-text")).to_have_text(
            "Host web-1 snapshots its running root as “before <b>the</b> upgrade”."
        )
        dialog.get_by_role("button", name="Take the snapshot").click()
        fleet.run(eventually(lambda: len(web1.actions) == 2, "the snapshot action reached the agent"))
        assert web1.actions[1]["description"] == "before <b>the</b> upgrade"
        fleet.run(web1.answer("failed", error="snapshots are off: / is not a btrfs subvolume"))
        expect(page.locator("#actions li").first.locator(".error")).to_have_text(
            " snapshots are off: / is not a btrfs subvolume"
        )
        expect(page.locator("#snapshot-description")).to_have_value("")
        expect(page.locator("#host-detail b")).to_have_count(0)
        screenshots(page, tmp_path, "host")
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.locator("#host-detail").screenshot(path=tmp_path / f"host-page-{size}.png")
        page.set_viewport_size(DESKTOP)

        # Offline, the host's actions are still shown, but not offered.
        fleet.run(web1.disconnect())
        expect(page.locator("#detail-online")).to_have_text("offline")
        expect(rollback).to_be_disabled()
        expect(page.locator("#snapshot-button")).to_be_disabled()
        assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
        assert errors == [], errors
        page.close()


def test_the_event_log_is_filtered_by_host_actor_kind_and_time_and_shows_details_as_fields(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    with agents(hub) as fleet:
        web1, db1 = fleet.add("web-1", ["web"]), fleet.add("db-1", ["db"])
        now = time.time()
        detail = {"state": "done", "kind": "apply", "ops": ["motd"], "note": "y" * 500,
                  "result": {"steps": [{"op": "motd", "state": "changed", "output": ["wrote /etc/motd"]}]}}  # fmt: skip
        fleet.run(web1.send({"type": "events", "events": [
            {"id": 1, "time": now - 7200, "uid": 0, "method": "Rollback", "job": None, "detail": {"snapshot": 4}},
            {"id": 2, "time": now - 60, "uid": 0, "method": "JobFinished", "job": 7, "detail": detail},
        ]}))  # fmt: skip
        # The log is in the hub's order of arrival, and two agents' sockets race: web-1's events are
        # stored before db-1 sends, so db-1's is the newest.
        fleet.run(eventually(lambda: hub.api("GET", "/api/v1/events?method=JobFinished"), "web-1's events stored"))
        fleet.run(db1.send({"type": "events", "events": [
            {"id": 1, "time": now - 30, "uid": 1000, "method": "Create", "job": None, "detail": {"snapshot": 9}},
        ]}))  # fmt: skip
        page, errors = logged_in(hub, browser, hub.admin_token)
        rows = page.locator("#events tbody tr")

        def methods() -> list[str]:
            return [row.locator("td").nth(3).inner_text() for row in rows.all()]

        # Unfiltered: every event, newest first (the hub's own, each host added, among them).
        expect(rows.first.locator("td").nth(3)).to_have_text("Create")
        assert {"HostAdded", "Rollback", "JobFinished", "Create"} <= set(methods())
        page.select_option("#event-host", "web-1")
        expect(page.locator("#events-shown")).to_have_text("3 matching")
        assert methods() == ["JobFinished", "Rollback", "HostAdded"]
        page.fill("#event-kind", "Rollback")
        expect(rows).to_have_count(1)
        expect(rows.first.locator("td").nth(3)).to_have_text("Rollback")
        page.fill("#event-kind", "")
        page.fill("#event-actor", "alice")
        expect(rows).to_have_count(1)
        expect(rows.first.locator("td").nth(3)).to_have_text("HostAdded")
        page.fill("#event-actor", "agent")
        page.select_option("#event-range", "3600")
        expect(rows).to_have_count(1)
        expect(rows.first.locator("td").nth(3)).to_have_text("JobFinished")
        page.select_option("#event-range", "range")
        page.fill("#event-from", "2001-01-01T00:00")
        page.fill("#event-to", "2001-01-02T00:00")
        expect(rows).to_have_text(["No event matches these filters."])
        page.select_option("#event-range", "")
        expect(rows).to_have_count(2)

        # A detail is fields, never JSON: a key and its value a line, nested ones indented, a long value
        # cut with the whole on hover.
        job = page.locator("#events tbody tr", has_text="JobFinished").locator("td.detail")
        top = job.locator(":scope > dl.fields")
        expect(top.locator(":scope > dt")).to_have_text(["state", "kind", "ops", "note", "result", "uid", "job"])
        expect(top.locator(":scope > dd").nth(2)).to_have_text("motd")
        note = top.locator(":scope > dd").nth(3).locator(".cut")
        expect(note).to_have_text("y" * 120 + "…")
        expect(note).to_have_attribute("title", "y" * 500)
        step = top.locator(":scope > dd").nth(4).locator("dl.fields dl.fields dl.fields")
        expect(step.locator(":scope > dt")).to_have_text(["op", "state", "output"])
        expect(step.locator(":scope > dd")).to_have_text(["motd", "changed", "wrote /etc/motd"])
        assert "{" not in job.inner_text() and '"' not in job.inner_text(), job.inner_text()
        screenshots(page, tmp_path, "events")
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.locator("#events").locator("xpath=..").screenshot(path=tmp_path / f"event-log-{size}.png")
        page.set_viewport_size(DESKTOP)

        # Filtered, the log still follows: a new event that matches shows without a reload.
        fleet.run(web1.send({"type": "events", "events": [
            {"id": 3, "time": time.time(), "uid": 0, "method": "MarkGood", "job": None, "detail": {}}]}))  # fmt: skip
        expect(rows.first.locator("td").nth(3)).to_have_text("MarkGood")
        expect(rows.first.locator("td.detail")).to_have_text("uid0jobnone")
        assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
        assert errors == [], errors
        page.close()
