"""A host's page and the fleet's table as an operator reads them, in headless Chromium against a real
hub with simulated agents speaking the real protocol: each job with its steps and what they changed
(the diffs), the host's boots newest first with the ones that fell back, no rollback offered to the
snapshot that runs, and per host in the table its image, its boot's state and the last change the hub
made there, by whom. Whatever an agent reports in those, the views keep working and show it as text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Locator, expect

from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_rollouts import eventually
from tests.test_hub_ui import DESKTOP, PHONE
from tests.test_hub_ui import browser as browser
from tests.test_hub_ui_fleet import HOSTILE, Agent, Agents, agents, logged_in, run_on, screenshots

MOTD_DIFF = "--- /etc/motd\n+++ /etc/motd\n@@ -1 +1 @@\n-welcome\n+managed by the hub"
CHANGED = {"op": "motd", "state": "changed", "output": ["wrote /etc/motd"],
           "changes": [{"action": "write", "subject": "/etc/motd", "detail": MOTD_DIFF}]}  # fmt: skip
UNCHANGED = {"op": "hostname", "state": "unchanged", "changes": []}


def events(agent: Agent, fleet: Agents, *items: dict[str, Any]) -> None:
    """Events of the agent's daemon log, numbered after the ones it sent before, as rastosd sends them."""
    sent = getattr(agent, "sent_events", 0)
    numbered = [{"id": sent + index + 1, "time": time.time(), "uid": 0, "job": None, **item}
                for index, item in enumerate(items)]  # fmt: skip
    agent.sent_events = sent + len(items)  # type: ignore[attr-defined]
    fleet.run(agent.send({"type": "events", "events": numbered}))


def job_finished(job: int, state: str, steps: list[Any], **detail: Any) -> dict[str, Any]:
    result = {"steps": steps, "dry_run": False, "state": state, **detail.pop("result", {})}
    return {"method": "JobFinished", "job": job, "uid": detail.pop("uid", 0),
            "detail": {"state": state, "kind": "pipeline", "ops": [s["op"] for s in steps], "result": result,
                       "hub_command": None, **detail}}  # fmt: skip


def booted(boot: str, **detail: Any) -> dict[str, Any]:
    fields = {"root": "@", "kind": "deployment", "snapshot": None, "entry": "rastos.conf", "image_version": "1.0",
              "failed_entry": "", "failed_root": ""}  # fmt: skip
    return {"method": "Booted", "detail": {"boot": boot, **fields, **detail}}


def test_a_hosts_jobs_show_each_step_with_its_changes_and_diffs(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"])
        # A job of the hub's run, one from the host's own admin, a dry run, and one that failed.
        run_on(hub, fleet, web1, "done", {"steps": [CHANGED], "state": "done"})
        command = web1.commands[-1]["id"]
        dry = {**CHANGED, "state": "planned", "output": []}
        failed = {"op": "sysctl", "state": "failed", "error": "sysctl: cannot write vm.swappiness"}
        why = "step 1 (sysctl) failed: sysctl: cannot write vm.swappiness"
        events(web1, fleet,
               job_finished(1, "done", [CHANGED], hub_command=command),
               job_finished(2, "done", [UNCHANGED, CHANGED], uid=1000),
               job_finished(3, "done", [dry], result={"dry_run": True}),
               job_finished(4, "failed", [failed, {"op": "motd", "state": "skipped"}],
                            result={"error": why}))  # fmt: skip
        page, errors = logged_in(hub, browser, hub.admin_token)
        page.locator('#hosts tr[data-host="web-1"] button.link').click()
        jobs = page.locator("#jobs .job")
        expect(jobs).to_have_count(4)
        assert [job.get_attribute("data-job") for job in jobs.all()] == ["4", "3", "2", "1"], "newest first"
        expect(jobs.nth(3)).to_contain_text("motd · ")
        expect(jobs.nth(3)).to_contain_text("run by alice")
        expect(jobs.nth(2)).to_contain_text("on the host, by uid 1000")

        # A job's steps are folded until asked for; then each step's changes, with the diff's lines marked.
        own = jobs.nth(2)
        expect(own.locator("summary")).to_have_text("2 steps, 1 change")
        expect(own.locator(".plan-step").first).to_be_hidden()
        own.locator("summary").focus()
        page.keyboard.press("Enter")
        expect(own.locator(".plan-step")).to_have_count(2)
        expect(own.locator(".plan-step").nth(0)).to_have_text("hostname: unchanged nothing to change")
        change = own.locator(".plan-step").nth(1).locator(".change")
        expect(change.locator("div").first).to_have_text("write /etc/motd")
        expect(change.locator("pre.diff .del")).to_have_text(["-welcome"])
        expect(change.locator("pre.diff .add")).to_have_text(["+managed by the hub"])
        expect(own.locator("pre.output")).to_have_text("wrote /etc/motd")

        # A dry run says what it would change; a failed job its error and the step that failed.
        expect(jobs.nth(1).locator(".badge.dry-run")).to_have_text("dry run")
        expect(jobs.nth(1).locator("summary")).to_have_text("1 step, 1 change planned")
        jobs.nth(1).locator("summary").click()
        expect(jobs.nth(1).locator(".change div").first).to_have_text("would write /etc/motd")
        expect(jobs.nth(0).locator(":scope > .error")).to_have_text(
            "step 1 (sysctl) failed: sysctl: cannot write vm.swappiness"
        )
        jobs.nth(0).locator("summary").click()
        expect(jobs.nth(0).locator(".plan-step").first).to_contain_text("sysctl: failed sysctl: cannot write")

        # Unfolded stays unfolded as the state changes.
        events(web1, fleet, job_finished(5, "done", [UNCHANGED]))
        expect(jobs).to_have_count(5)
        expect(jobs.nth(3).locator(".plan-step").first).to_be_visible()
        screenshots(page, tmp_path, "host-jobs")
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.locator("#jobs").screenshot(path=tmp_path / f"jobs-{size}.png")
        page.set_viewport_size(DESKTOP)
        assert errors == [], errors
        page.close()


SNAPSHOTS = [
    {"id": 1, "created": 1_700_000_000.0, "description": "first boot", "kind": "manual", "known_good": True},
    {"id": 3, "created": 1_700_086_400.0, "description": "before motd", "kind": "pre", "known_good": False},
]


def test_a_hosts_boots_are_listed_newest_first_with_its_fallbacks(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"], root="@snapshots/3/deployment", kind="rollback", snapshot="3",
                         health="good", entry="rastos-snapshot-3+2-1.conf")  # fmt: skip
        fleet.run(web1.send({"type": "facts", "facts": {"hostname": "web-1", "boot_state": web1.boot,
                                                         "snapshots": SNAPSHOTS}}))  # fmt: skip
        # The image it was installed with, confirmed good; an update that did not boot, so 1.0 again;
        # then a rollback to snapshot 3, blessed by systemd-boot (its facts say good, no MarkGood).
        events(web1, fleet,
               booted("b1"), {"method": "MarkGood", "detail": {"boot": "b1", "snapshot": 1}},
               booted("b2", kind="fallback", failed_entry="rastos-update-2.0.conf", failed_root="@deployments/2.0"),
               booted("b3", root="@snapshots/3/deployment", kind="rollback", snapshot=3,
                      entry="rastos-snapshot-3+2-1.conf"))  # fmt: skip
        page, errors = logged_in(hub, browser, hub.admin_token)
        page.locator('#hosts tr[data-host="web-1"] button.link').click()
        boots = page.locator("#boots li.boot")
        expect(boots).to_have_count(3)
        expect(boots.locator(".what")).to_have_text(["rollback to snapshot 3 (image 1.0) good", "image 1.0 fell back",
                                                     "image 1.0 good"])  # fmt: skip
        expect(boots.nth(1).locator(".error")).to_have_text(
            "rastos-update-2.0.conf (@deployments/2.0) did not boot: its tries were used up, and the deployment "
            "before it booted again"
        )
        expect(boots.nth(0).locator(".description")).to_have_text("root @snapshots/3/deployment, entry "
                                                                  "rastos-snapshot-3+2-1.conf")  # fmt: skip

        # The snapshot that runs is offered no rollback; the others are, and each a one-shot boot.
        timeline = page.locator("#snapshots li.snapshot")
        expect(timeline.nth(0).locator(".badge")).to_have_text(["booted"])
        expect(timeline.nth(0).get_by_role("button")).to_have_text(["Boot once…"])
        expect(timeline.nth(1).get_by_role("button")).to_have_text(["Roll back…", "Boot once…"])

        # A new boot on trial, live: the newest first, and nothing confirmed it yet.
        events(web1, fleet, booted("b4", image_version="2.1", root="@deployments/2.1",
                                   entry="rastos-update-2.1+3.conf"))  # fmt: skip
        expect(boots).to_have_count(4)
        expect(boots.nth(0).locator(".what")).to_have_text("image 2.1 on trial")
        expect(boots.nth(1).locator(".badge")).to_have_text("good")
        screenshots(page, tmp_path, "host-boots")
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.locator("#host-detail").screenshot(path=tmp_path / f"host-detail-{size}.png")
        page.set_viewport_size(DESKTOP)

        # A restarted hub rebuilds the history from its event log.
        page.close()
        hub.stop()
        hub.start()
        state = hub.wait_state(lambda s: len(s["hosts"]["web-1"]["boots"]) == 4, "the boots after a restart")
        boots_kept = state["hosts"]["web-1"]["boots"]
        assert [b["boot"] for b in boots_kept] == ["b1", "b2", "b3", "b4"], boots_kept
        assert [boots_kept[0]["health"], boots_kept[3]["health"]] == ["good", "pending"], boots_kept
        assert boots_kept[1]["failed_entry"] == "rastos-update-2.0.conf" and boots_kept[2]["snapshot"] == 3
        assert errors == [], errors


def test_the_hosts_table_shows_image_boot_state_and_the_last_change_by_whom(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    added = hub.cli("admin", "add", "otto", "--role", "operator")
    assert added.returncode == 0, added.stderr
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"], image_version="2.0", health="pending", entry="rastos-update-2.0+2.conf")
        web2 = fleet.add("web-2", ["web"], image_version="1.0", kind="fallback", failed_entry="rastos-update-2.0.conf")
        db1 = fleet.add("db-1", ["db"], image_version="1.0")
        fleet.add("db-2", ["db"], image_version="1.0")
        # A change on db-1 by alice's run; one on web-2 by otto's, later; a dry run and an unchanged run
        # change nothing.
        run_on(hub, fleet, db1, "done", {"steps": [CHANGED], "state": "done"})
        run_on(hub, fleet, db1, "done", {"steps": [UNCHANGED], "state": "done"})
        page, errors = logged_in(hub, browser, added.stdout.strip().splitlines()[-1])
        hosts = page.locator("#hosts tbody tr")
        expect(hosts).to_have_count(4)

        def cell(host: str, column: int) -> Locator:
            return page.locator(f'#hosts tr[data-host="{host}"] td').nth(column)

        expect(cell("web-1", 3).locator(".badge")).to_have_text("on trial")
        expect(page.locator('#glance [data-glance="trial"]')).to_have_text("1 pending confirmation")
        expect(cell("web-2", 3).locator(".badge")).to_have_text("fell back")
        expect(cell("db-1", 3).locator(".badge")).to_have_text("healthy")
        expect(cell("db-1", 3)).to_have_text("healthy deployment @")
        expect(cell("web-1", 4)).to_have_text("2.0")
        expect(cell("db-1", 8)).to_contain_text("motd by alice, ")
        expect(cell("web-2", 8)).to_have_text("")

        # An operator's rollback from the host's page is the host's last change once done.
        fleet.run(web2.send({"type": "facts", "facts": {"hostname": "web-2", "boot_state": web2.boot,
                                                         "snapshots": SNAPSHOTS}}))  # fmt: skip
        page.locator('#hosts tr[data-host="web-2"] button.link').click()
        page.locator('#snapshots li[data-snapshot="1"]').get_by_role("button", name="Roll back…").click()
        page.locator("#confirm-ok").click()
        fleet.run(eventually(lambda: web2.actions, "the rollback reached web-2"))
        fleet.run(web2.answer("done", entry="rastos-snapshot-1.conf", reboot_needed=True))
        # As rastosd does, its event log says so too: what a restarted hub rebuilds the action from.
        outcome = {"action": web2.actions[-1]["id"], "kind": "rollback", "state": "done", "snapshot": 1,
                   "entry": "rastos-snapshot-1.conf", "reboot_needed": True, "error": None}  # fmt: skip
        events(web2, fleet, {"method": "HubAction", "detail": outcome})
        expect(cell("web-2", 8)).to_contain_text("roll back to snapshot 1 by otto, ")
        body = {"target": {"hosts": ["web-1"]}, "steps": [{"op": "motd", "params": {"text": "x"}}], "flags": 1}
        hub.api("POST", "/api/v1/runs", body)
        fleet.run(eventually(lambda: web1.commands, "the dry run reached web-1"))
        fleet.run(web1.status("done", 1, {"steps": [{**CHANGED, "state": "planned"}], "dry_run": True}))
        expect(page.locator("#runs .run").first.locator(".badge").first).to_have_text("complete")
        expect(cell("web-1", 8)).to_have_text("")

        # Sorted by the last change (none first), by the boot's state; found by who made it.

        def shown() -> list[str | None]:
            return [row.get_attribute("data-host") for row in hosts.all()]

        page.locator('#hosts th[data-sort="change"] button').click()
        assert shown() == ["db-2", "web-1", "db-1", "web-2"], shown()
        page.locator('#hosts th[data-sort="change"] button').press("Enter")
        assert shown() == ["web-2", "db-1", "db-2", "web-1"], shown()
        page.locator('#hosts th[data-sort="boot"] button').click()
        assert shown() == ["web-2", "db-1", "db-2", "web-1"], "fell back, healthy, on trial"
        page.fill("#filter-text", "otto")
        assert shown() == ["web-2"]
        page.fill("#filter-text", "")

        # On a phone each host is a card, its boot state and last change labelled.
        page.set_viewport_size(PHONE)
        expect(cell("web-2", 8)).to_be_visible()
        expect(cell("web-2", 8)).to_have_attribute("data-label", "Last change")
        expect(cell("web-2", 3)).to_have_attribute("data-label", "Boot")
        assert cell("web-2", 8).evaluate("(td) => getComputedStyle(td).display") == "block", "a line of its card"
        page.locator("#fleet").screenshot(path=tmp_path / "fleet-cards-phone.png")
        page.set_viewport_size(DESKTOP)
        screenshots(page, tmp_path, "fleet-changes")

        # Both survive a restart of the hub: the run from its commands, the rollback from its event log.
        page.close()
        hub.stop()
        hub.start()
        state = hub.wait_state(lambda s: len(s["hosts"]) == 4, "the hosts after a restart")
        changes = {name: host["last_change"] for name, host in state["hosts"].items()}
        assert changes["db-1"]["by"] == "alice" and changes["db-1"]["what"] == "motd", changes
        assert changes["web-2"]["by"] == "otto" and changes["web-2"]["kind"] == "action", changes
        assert changes["web-1"] is None and changes["db-2"] is None, changes
        assert errors == [], errors


def test_malformed_jobs_and_boots_from_an_agent_never_break_the_views(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    with agents(hub) as fleet:
        evil = fleet.add("evil", ["db"], health=HOSTILE, kind="deployment")
        fleet.add("good", ["db"])
        hostile_boots = [
            {"method": "Booted", "detail": {"boot": ["b"], "root": {"x": HOSTILE}, "kind": HOSTILE, "snapshot": "abc",
                                            "entry": 5, "image_version": HOSTILE, "failed_entry": HOSTILE * 50,
                                            "failed_root": None}},
            {"method": "Booted", "detail": {"boot": "b2", "snapshot": -4, "kind": "rollback"}},
            {"method": "Booted", "detail": {}},
            {"method": "MarkGood", "detail": {"boot": {"b": 1}}},
            {"method": "BootFallback", "detail": {"failed_entry": [HOSTILE], "failed_root": 7}},
            # As a daemon older than `Booted` reports a fallback: a boot of its own.
            {"method": "BootFallback", "detail": {"failed_entry": "rastos-update-3.0.conf",
                                                  "failed_root": "@deployments/3.0"}},
        ]  # fmt: skip
        hostile_jobs = [
            {"method": "JobFinished", "job": 1, "detail": {"state": [HOSTILE], "ops": HOSTILE, "result": HOSTILE,
                                                            "hub_command": {"x": 1}, "result_omitted": [1]}},
            {"method": "JobFinished", "job": 2, "detail": {"result": {"steps": [None, 5, HOSTILE, {
                "op": [HOSTILE], "state": {"a": 1}, "error": {"e": HOSTILE}, "output": [HOSTILE, 5, None],
                "changes": [None, {"action": HOSTILE, "subject": {"s": 1}, "detail": HOSTILE + "\n+" + HOSTILE}]}],
                "note": [HOSTILE], "dry_run": "yes", "error": {"nested": HOSTILE}}}},
            {"method": "JobFinished", "job": 3, "detail": {"result": {"steps": {"not": "a list"}}}},
        ]  # fmt: skip
        events(evil, fleet, *hostile_boots, *hostile_jobs)
        run_on(hub, fleet, evil, "done", {"steps": [{"state": "changed", "op": None}, HOSTILE]})
        page, errors = logged_in(hub, browser, hub.admin_token)
        page.locator('#hosts tr[data-host="evil"] button.link').click()
        expect(page.locator("#detail-name")).to_have_text("evil")
        boots = page.locator("#boots li.boot")
        # Four boots: the first BootFallback names no entry the hub can keep, so it adds none.
        expect(boots).to_have_count(4)
        expect(boots.nth(0).locator(".what")).to_have_text("the deployment before fell back")
        expect(boots.nth(0).locator(".error")).to_contain_text("rastos-update-3.0.conf (@deployments/3.0) did not boot")
        expect(boots.nth(3).locator(".what strong")).to_have_text(f"image {HOSTILE}")
        expect(boots.nth(3).locator(".error")).to_contain_text("…")  # 255 characters of it, cut in the page
        jobs = page.locator("#jobs .job")
        expect(jobs).to_have_count(3)
        for index in range(3):
            summary = jobs.nth(index).locator("summary")
            if summary.count():
                summary.click()
        expect(jobs.nth(1).locator(".change pre.diff")).to_contain_text(HOSTILE)
        expect(page.locator('#hosts tr[data-host="evil"] td').nth(8)).to_contain_text("motd by alice")
        for area in ("#main img", "#main script", "#main b"):
            expect(page.locator(area)).to_have_count(0)
        assert page.evaluate("window.pwned") is None
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator('#hosts tr[data-host="good"]')).to_be_visible()
        screenshots(page, tmp_path, "host-hostile")
        state = hub.api("GET", "/api/v1/hosts/evil")
        assert [b["snapshot"] for b in state["boots"]] == [None, None, None, None], state["boots"]
        assert all(len(b["failed_entry"]) <= 255 for b in state["boots"]), "each text cut as the hub keeps it"
        assert errors == [], errors
        page.close()
