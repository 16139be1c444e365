"""Runs in the hub's web UI beyond single ops: a workflow started from the run form, its variables in a
form made from the schemas the hub publishes, expanded and checked by the hub; and a run followed by
its progress bars and cancelled after a confirmation, by an operator only. Headless Chromium against a
real hub with a simulated agent; the pages looked at are saved under the test's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_rollouts import eventually
from tests.test_hub_ui import browser as browser
from tests.test_hub_ui_fleet import agents, logged_in, screenshots

pytestmark = pytest.mark.root


def token(hub: Hub, name: str, role: str) -> str:
    added = hub.call("admin", "add", name, "--role", role)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip().splitlines()[-1]


def test_a_workflow_runs_from_the_form_and_is_followed_and_cancelled(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    operator, viewer = token(hub, "otto", "operator"), token(hub, "vera", "viewer")
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"])
        page, errors = logged_in(hub, browser, operator)
        page.fill("#target-value", "web-1")
        page.check("#kind-workflow")
        expect(page.locator("#ops-form")).to_be_hidden()
        page.select_option("#workflow-name", "development")
        expect(page.locator("#workflow-help")).to_contain_text("Development host")
        users = page.locator('#workflow-variables [name="users"]')
        expect(users).to_have_attribute("aria-required", "true")
        expect(page.locator("#workflow-variables .field.lines .help")).to_contain_text("fills zsh.users")

        # A required variable left empty: named in the page, and nothing sent; the hub refuses it too.
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text("workflow development: users: required")
        expect(users).to_be_focused()
        assert hub.api("GET", "/api/v1/runs") == [], "nothing was sent"
        status, answer = hub.request("POST", "/api/v1/runs",
                                     {"target": {"hosts": ["web-1"]}, "workflow": {"name": "development"}})  # fmt: skip
        assert status == 422 and answer["error"].startswith("workflow.variables.users: required"), answer

        # Set, the hub expands it: the agent gets the workflow's steps with the variable in place.
        expect(users).to_have_attribute("aria-invalid", "true")
        users.fill("alice\nbob")
        expect(users).to_have_attribute("aria-invalid", "false")  # filled in, it no longer says "required"
        screenshots(page, tmp_path, "run-form-workflow")
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text("")
        fleet.run(eventually(lambda: web1.commands, "web-1 has the command"))
        assert web1.commands[0]["steps"] == [
            {"op": "update", "params": {"refresh": True,
                                        "packages": ["build-essential", "git", "vim", "less", "curl", "zsh"]}},
            {"op": "zsh", "params": {"users": ["alice", "bob"]}},
            {"op": "sysctl", "params": {"sets": ["performance"], "name": "91-rastos-performance"}},
        ], web1.commands  # fmt: skip

        # Its progress as the agent reports it: steps done on the host, hosts finished of the run's.
        run = page.locator("#runs .run").first
        host_bar = run.locator('tr[data-host="web-1"] progress')
        overall = run.locator(".run-progress progress")
        expect(host_bar).to_have_attribute("value", "0")
        expect(host_bar).to_have_attribute("max", "3")
        through = {"op": "update", "state": "changed", "changes": []}
        fleet.run(web1.status("running", 7, {"steps": [through]}))
        expect(host_bar).to_have_attribute("value", "1")
        fleet.run(web1.status("running", 7, {"steps": [through, {**through, "op": "zsh", "state": "unchanged"}]}))
        expect(run.locator('tr[data-host="web-1"] .progress')).to_have_text(" 2/3")
        expect(overall).to_have_attribute("value", "0")
        screenshots(page, tmp_path, "run-progress")

        # A viewer follows the same run but has no Cancel.
        watcher, watcher_errors = logged_in(hub, browser, viewer)
        expect(watcher.locator("#runs .run").first.locator(".run-progress")).to_have_text("hosts finished 0/1")
        expect(watcher.locator(".cancel-run")).to_have_count(0)
        watcher.close()

        # Cancel asks first: dismissed, nothing is sent; confirmed, the run is cancelled.
        run.locator(".cancel-run").click()
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-title")).to_have_text("Cancel this run?")
        page.click("#confirm-cancel")
        run_id = hub.api("GET", "/api/v1/runs")[0]["id"]
        assert not hub.api("GET", f"/api/v1/runs/{run_id}").get("cancel_requested"), "dismissed: nothing sent"
        run.locator(".cancel-run").click()
        page.click("#confirm-ok")
        fleet.run(eventually(lambda: hub.api("GET", f"/api/v1/runs/{run_id}").get("cancel_requested"), "cancel"))
        fleet.run(web1.status("cancelled", 7, {"steps": [through]}))
        expect(run.locator(".badge").first).to_have_text("cancelled")
        expect(overall).to_have_attribute("value", "1")
        expect(run.locator(".cancel-run")).to_have_count(0)
        assert errors == [] and watcher_errors == [], (errors, watcher_errors)
        page.close()
