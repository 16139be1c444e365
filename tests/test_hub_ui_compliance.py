"""Compliance in the hub's web UI: a scan started from the run form, each host's score live in the
fleet table (sortable) and its failed checks on its page, rendered as text whatever an agent reports.
Headless Chromium against a real hub with simulated agents; the pages are saved under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_rollouts import eventually
from tests.test_hub_ui import browser as browser
from tests.test_hub_ui_fleet import agents, logged_in, screenshots
from tests.test_hub_ui_runs import token

pytestmark = pytest.mark.root

HOSTILE = '<img src=x onerror="window.pwned=1"> PermitRootLogin yes in /etc/ssh/sshd_config'


def failed(check: str, severity: str, finding: str) -> dict[str, str]:
    return {"id": check, "title": f"{check}: the title", "severity": severity, "finding": finding}


def test_a_scan_started_from_the_form_shows_each_hosts_score_live_and_its_failed_checks(
    hub: Hub, browser: Browser, tmp_path: Path
) -> None:
    operator = token(hub, "otto", "operator")
    with agents(hub) as fleet:
        web1, web2 = fleet.add("web-1", ["web"]), fleet.add("web-2", ["web"])
        page, errors = logged_in(hub, browser, operator)
        cells = page.locator('#hosts td[data-label="Compliance"]')
        expect(cells).to_have_text(["", ""])  # never scanned

        page.select_option("#target-kind", "group")
        page.check("#kind-compliance")
        expect(page.locator("#ops-form")).to_be_hidden()
        expect(page.locator("#compliance-form")).to_be_visible()
        expect(page.locator("#compliance-checks-field")).to_be_hidden()  # a scan runs every check

        # A remediation's check ids are checked in the page: a bad one is named, and nothing is sent.
        page.select_option("#compliance-action", "remediate")
        page.fill("#compliance-checks", "ssh-no-root-login, Not/An/Id")
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text(
            'compliance.checks: "Not/An/Id" is not a check\'s id (lower case letters, digits and -)'
        )
        expect(page.locator("#compliance-checks")).to_be_focused()
        assert hub.api("GET", "/api/v1/runs") == [], "nothing was sent"
        screenshots(page, tmp_path, "run-form-remediate")
        page.fill("#compliance-checks", "ssh-no-root-login")
        expect(page.locator("#compliance-checks-error")).to_have_text("")  # changed: its complaint goes

        page.select_option("#compliance-action", "scan")
        screenshots(page, tmp_path, "run-form-compliance")
        page.click("#run-button")
        expect(page.locator("#dispatch-error")).to_have_text("")
        fleet.run(eventually(lambda: web1.commands and web2.commands, "both hosts have the command"))
        assert web1.commands[0]["compliance"] == {"action": "scan", "checks": []} and "steps" not in web1.commands[0]
        run = page.locator("#runs .run").first
        expect(run).to_contain_text("compliance scan on group web")

        # Each host's report reaches the table as it comes, without a reload.
        checks = [failed("ssh-no-root-login", "high", HOSTILE), failed("banner-set", "low", "no /etc/issue.net")]
        for agent, passed, found in ((web1, 6, checks), (web2, 10, [])):
            fleet.run(agent.send({"type": "compliance", "command": agent.commands[0]["id"], "report": {
                "time": 1700000000, "passed": passed, "failed": len(found), "not_applicable": 3,
                "failed_checks": found}}))  # fmt: skip
            fleet.run(agent.status("done", None, {"compliance": {"passed": passed, "failed": len(found),
                                                                 "not_applicable": 3}}))  # fmt: skip
        row = page.locator('#hosts tr[data-host="web-1"]')
        expect(row.locator('td[data-label="Compliance"]')).to_have_text("75% (2 failed)")
        expect(page.locator('#hosts tr[data-host="web-2"] td[data-label="Compliance"]')).to_have_text("100%")
        expect(run.locator(".badge").first).to_have_text("complete")
        expect(run.locator('tr[data-host="web-1"] .steps-done')).to_have_text("6 passed, 2 failed")

        # Sorted by score: the least compliant first, then the other way.
        page.click('#hosts th[data-sort="compliance"] button')
        rows = page.locator("#hosts tbody tr")
        expect(rows.first).to_have_attribute("data-host", "web-1")
        expect(rows.last).to_have_attribute("data-host", "web-2")
        expect(page.locator('#hosts th[data-sort="compliance"]')).to_have_attribute("aria-sort", "ascending")
        page.click('#hosts th[data-sort="compliance"] button')
        expect(rows.first).to_have_attribute("data-host", "web-2")
        expect(rows.last).to_have_attribute("data-host", "web-1")

        # The host's page lists its failed checks, the finding as text: the markup in it does nothing.
        row.locator("button.link").click()
        expect(page.locator("#detail-compliance")).to_contain_text("Score 75% (2 failed): 6 passed, 2 failed, 3 not")
        items = page.locator("#failed-checks li")
        expect(items).to_have_count(2)
        expect(items.first).to_have_attribute("data-check", "ssh-no-root-login")
        expect(items.first).to_contain_text("high ssh-no-root-login ssh-no-root-login: the title")
        expect(items.first.locator(".help")).to_have_text(HOSTILE)
        expect(page.locator("#failed-checks img")).to_have_count(0)
        assert page.evaluate("window.pwned") is None
        screenshots(page, tmp_path, "host-compliance")

        # A later scan replaces the report, live.
        fleet.run(web1.send({"type": "compliance", "command": None, "report": {
            "time": 1700000100, "passed": 8, "failed": 0, "not_applicable": 3, "failed_checks": []}}))  # fmt: skip
        expect(row.locator('td[data-label="Compliance"]')).to_have_text("100%")
        expect(items).to_have_count(0)
        assert page.evaluate("window.notReloaded") is True
        assert errors == [], errors
        page.close()
