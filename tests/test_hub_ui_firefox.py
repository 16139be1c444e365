"""The hub's web UI in Debian's firefox-esr (headless, driven over WebDriver BiDi: tests/firefox_bidi.py)
against a real hub with simulated agents: the fleet table follows an agent's facts live, a run started
from the form its op's schema makes reaches both agents and its progress and output show as they report
them, and a host's page opens. The pages are saved under the test's tmp_path, on a desktop and on a
phone, to look at for what only Firefox lays out wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firefox_bidi import Firefox, Page, firefox, installed
from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_live_output import output
from tests.test_hub_rollouts import eventually
from tests.test_hub_ui import DESKTOP, PHONE
from tests.test_hub_ui_fleet import agents

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firefox]:
    if not installed():
        pytest.skip("Debian's firefox-esr is not installed (./setup-host installs it)")
    with firefox(tmp_path_factory.mktemp("firefox")) as launched:
        yield launched


def screenshots(page: Page, directory: Path, name: str) -> None:
    """The whole page on a desktop and on a phone, saved to look at; neither is wider than its window."""
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport(viewport["width"], viewport["height"])
        widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], f"{name} at {size}: the page is {widths[0]} px wide in {widths[1]}"
        page.screenshot(directory / f"firefox-{name}-{size}.png")
    page.set_viewport(DESKTOP["width"], DESKTOP["height"])


def cell(host: str, column: int) -> str:
    return f'#hosts tr[data-host="{host}"] td:nth-child({column})'


def test_the_fleet_a_run_and_a_host_page_work_in_firefox(hub: Hub, browser: Firefox, tmp_path: Path) -> None:
    with agents(hub) as fleet:
        web1, web2 = fleet.add("web-1", ["web"]), fleet.add("web-2", ["web"])
        page = browser.new_page(DESKTOP["width"], DESKTOP["height"])
        page.goto(hub.url)
        page.fill("#token", hub.admin_token)
        page.click("#login button")
        page.eventually(lambda: page.text("#connection") == "live", "the stream is live")
        page.evaluate("() => { window.notReloaded = true; }")

        # The fleet table, then an agent's new facts in it without a reload.
        page.eventually(lambda: page.text(cell("web-2", 3)) == "web-2", "both hosts are listed")
        assert page.evaluate("() => [...document.querySelectorAll('#hosts tbody tr')].map((r) => r.dataset.host)") == [
            "web-1",
            "web-2",
        ]
        renamed = {"hostname": "renamed-in-firefox", "boot_state": web1.boot}
        fleet.run(web1.send({"type": "facts", "facts": renamed}))
        page.eventually(lambda: page.text(cell("web-1", 3)) == "renamed-in-firefox", "web-1's new hostname shows")

        # A run from the form the motd op's schema makes, to the group: the page counts its hosts and
        # marks the required field; both agents get the command; their reports show live.
        page.select("#target-kind", "group")
        page.select("#target-group", "web")
        page.eventually(lambda: page.text("#target-count") == "2 hosts", "the group's count")
        page.select("#step-list .step select.op", "motd")
        text = '#step-list .step [name="text"]'
        page.eventually(lambda: page.evaluate("(s) => document.querySelector(s)?.ariaRequired", text), "motd's form")
        page.fill(text, "set from Firefox")
        page.click("#run-button")
        fleet.run(eventually(lambda: web1.commands and web2.commands, "both hosts have the command"))
        assert web1.commands[0]["steps"] == [{"op": "motd", "params": {"text": "set from Firefox"}}]
        assert page.text("#dispatch-error") == ""
        run = "#runs .run"
        page.eventually(lambda: "motd on group web" in (page.text(run) or ""), "the run is listed")
        fleet.run(web1.status("running", 7))
        page.eventually(lambda: "job 7" in (page.text(f'{run} tr[data-host="web-1"]') or ""), "web-1's job shows")
        # Its output, on the run's own stream (a second WebSocket), as the agent sends it.
        fleet.run(web1.send(output(web1.commands[0]["id"], 0, 0, ["<b>not bold</b>", "line 1"])))
        pane = f'{run} .output-step[data-step="0"] pre'
        page.eventually(lambda: page.text(pane) == "<b>not bold</b>\nline 1\n", "web-1's output shows live")
        screenshots(page, tmp_path, "run-output-live")
        create = {"subject": "/etc/motd", "action": "create", "detail": "+set from Firefox"}
        changed = {"op": "motd", "state": "changed", "changes": [create]}
        for agent in (web1, web2):
            fleet.run(agent.status("done", 7, {"steps": [changed]}))
        page.eventually(lambda: page.text(f"{run} .badge") == "complete", "the run completes")
        screenshots(page, tmp_path, "run-form")

        # The host's page, opened from its row.
        page.click('#hosts tr[data-host="web-1"]')
        page.eventually(lambda: page.text("#detail-name") == "web-1", "web-1's page opens")
        assert page.evaluate("() => document.getElementById('host-detail').getBoundingClientRect().height") > 0
        screenshots(page, tmp_path, "host")
        assert page.evaluate("() => window.notReloaded") is True, "nothing above needed a reload"
        assert page.evaluate("() => document.querySelectorAll('#main b').length") == 0, "an agent's words are text"
        assert page.errors == [], page.errors
        # The page's stream was refused once, before the login (that is how the page learns it must
        # ask for one), and never cut after it.
        refused = [message for message in page.messages if message.endswith("/api/v1/stream.")]
        assert len(refused) == 1, page.messages
        page.close()
