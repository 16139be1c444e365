"""The hub's web UI in headless Chromium (Playwright driving Debian's chromium) against a real hub
with a real rastosd agent: it logs in, shows a change on the host without a reload, and dispatches
an op whose progress and result appear as they happen."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.daemon_fixtures import MANAGER
from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_fleet import fleet as fleet

pytestmark = pytest.mark.root
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = next((path for path in CHROMIUM if Path(path).exists()), None) or shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (./setup-host installs it)")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium refuses its own sandbox.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_the_ui_follows_the_fleet_live_and_dispatches_an_op(hub: Hub, fleet: Fleet, browser: Browser) -> None:
    agent = fleet.add("web-1", ["web"])
    hub.wait_state(online("web-1"), "the agent online")
    page = browser.new_page()
    page.goto(hub.url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "wrong")
    page.click("#login button")
    expect(page.locator("#login-error")).to_contain_text("not a valid admin token")
    page.fill("#token", hub.admin_token)
    page.click("#login button")
    row = page.locator('#hosts tr[data-host="web-1"]')
    expect(row).to_contain_text("web-1")
    expect(row.locator("td").nth(2)).to_have_text("rastos")
    page.evaluate("window.notReloaded = true")

    # A change made on the host itself shows up without a reload.
    agent.call(MANAGER, "Apply", "sst", "hostname", json.dumps({"hostname": "renamed-on-host"}), "0")
    expect(row.locator("td").nth(2)).to_have_text("renamed-on-host", timeout=30_000)

    # An op dispatched from the UI: its run, its host's command and the job's output appear live.
    page.select_option("#target-kind", "hosts")
    page.fill("#target-value", "web-1")
    page.fill("#steps", json.dumps([{"op": "motd", "params": {"text": "set from the web UI"}}]))
    page.click("#dispatch button")
    run = page.locator("#runs .run").first
    expect(run).to_contain_text("motd")
    expect(run.locator(".badge").first).to_have_text("complete", timeout=60_000)
    expect(run.locator("tr").first).to_contain_text("done")
    row.click()
    expect(page.locator("#detail-name")).to_have_text("web-1")
    expect(page.locator("#jobs")).to_contain_text("wrote /etc/motd", timeout=30_000)
    expect(page.locator("#snapshots tbody tr").first).to_be_visible()

    # A bad dispatch is refused with the field named, in the page.
    page.fill("#steps", json.dumps([{"op": "No Such Op"}]))
    page.click("#dispatch button")
    expect(page.locator("#dispatch-error")).to_contain_text("steps.0.op")
    assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
    assert (agent.scratch.root / "etc/motd").read_text() == "set from the web UI\n"
    page.close()
