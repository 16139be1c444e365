"""The hub's web UI in headless Chromium (Playwright driving Debian's chromium) against a real hub
with a real rastosd agent: it logs in, shows a change on the host without a reload, and dispatches
an op whose progress and result appear as they happen; with simulated agents, it uploads an image and
follows and steers a rollout of it."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from rastos.bundle import generate_key
from tests.daemon_fixtures import MANAGER
from tests.hub_fixtures import Hub, make_bundle, upload
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_fleet import fleet as fleet
from tests.test_hub_rollouts import SimFleet

pytestmark = pytest.mark.root
T = TypeVar("T")
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
DESKTOP, PHONE = ViewportSize(width=1280, height=800), ViewportSize(width=390, height=844)


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

    # An op dispatched from the form its schema makes: its run, its host's command and the job's
    # output appear live.
    page.select_option("#target-kind", "hosts")
    page.fill("#target-value", "web-1")
    expect(page.locator("#target-count")).to_have_text("1 host")
    step = page.locator("#step-list .step").first
    step.locator("select.op").select_option("motd")
    step.locator('[name="text"]').fill("set from the web UI")
    page.click("#run-button")
    run = page.locator("#runs .run").first
    expect(run).to_contain_text("motd on hosts web-1")
    expect(run.locator(".badge").first).to_have_text("complete", timeout=60_000)
    expect(run.locator("tr").first).to_contain_text("done")
    row.click()
    expect(page.locator("#detail-name")).to_have_text("web-1")
    expect(page.locator("#jobs")).to_contain_text("wrote /etc/motd", timeout=30_000)
    expect(page.locator("#snapshots li.snapshot").first).to_be_visible()

    # A dry run: the host plans and changes nothing, and its plan, with the diff, shows under the run.
    page.check("#dry-run")
    step.locator('[name="text"]').fill("planned in a dry run")
    page.click("#run-button")
    dry = page.locator("#runs .run").first
    expect(dry.locator(".badge.dry-run")).to_have_text("dry run")
    expect(dry.locator(".badge").first).to_have_text("complete", timeout=60_000)
    plan = dry.locator(".plan")
    expect(plan).to_contain_text("would modify /etc/motd")
    expect(plan.locator(".diff .del")).to_have_text(["-set from the web UI"])
    expect(plan.locator(".diff .add")).to_have_text(["+planned in a dry run"])
    page.uncheck("#dry-run")

    # Steps written as JSON (the advanced mode): the hub refuses a bad one, naming the field, in the page.
    page.check("#advanced")
    assert json.loads(page.input_value("#steps")) == [{"op": "motd", "params": {"text": "planned in a dry run"}}]
    page.fill("#steps", json.dumps([{"op": "No Such Op"}]))
    page.click("#run-button")
    expect(page.locator("#dispatch-error")).to_contain_text("steps.0.op")
    assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
    assert (agent.scratch.root / "etc/motd").read_text() == "set from the web UI\n"
    page.close()


def assert_fits(page: Page) -> None:
    """The event log, and the page, are no wider than the window: long details wrap inside them."""
    widths = page.evaluate("""() => ({table: document.getElementById("events").scrollWidth,
                                      page: document.documentElement.scrollWidth,
                                      window: document.documentElement.clientWidth})""")
    assert widths["table"] <= widths["window"] and widths["page"] <= widths["window"], widths


class Background:
    """An event loop in a thread of its own, for simulated agents beside Playwright's synchronous API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_the_ui_shows_images_and_rollouts_live_and_steers_them(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    generate_key(tmp_path / "key")
    bundle = make_bundle(tmp_path, tmp_path / "key", "2.0")
    run = Background()
    sims = SimFleet(hub)
    try:
        run(sims.__aenter__())
        for name in ("web-1", "web-2"):
            run(sims.add(name, "1.0"))
        page = browser.new_page(viewport=DESKTOP)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(hub.url)
        page.fill("#token", hub.admin_token)
        page.click("#login button")
        expect(page.locator("#connection")).to_have_text("live")
        page.evaluate("window.notReloaded = true")
        expect(page.locator('#hosts tr[data-host="web-1"] td').nth(4)).to_have_text("1.0")

        # An upload from the page: the bundle is kept, and listed with its size.
        page.set_input_files("#bundle", str(bundle))
        page.click("#image-upload button")
        image = page.locator("#images tbody tr").first
        expect(image).to_contain_text("minimal")
        expect(image.locator("td").nth(4)).to_have_text("30.0 KiB")
        image_id = image.get_attribute("data-image")

        # A rollout from the page: its canary wave, live.
        page.select_option("#rollout-target-kind", "group")
        page.fill("#rollout-target-value", "web")
        page.click("#rollout-form button")
        rollout = page.locator("#rollouts .rollout").first
        expect(rollout.locator(".badge").first).to_have_text("running")
        expect(rollout.locator('[data-host="web-1"] .badge')).to_have_text("sent")
        expect(rollout).to_contain_text("wave 1 (canary)")
        canary = sims.agents["web-1"]
        assert canary.updates[-1]["url"] == f"/api/v1/images/{image_id}/bundle"
        # An agent's words, long and with a long path in them (as a receive's error may be).
        why = f"receive: <b>no space</b> left writing /var/lib/rastos/updates/{'x' * 300}.partial"
        run(canary.report("failed", why))
        expect(rollout.locator(".badge").first).to_have_text("halted")
        expect(rollout.locator(".reason")).to_have_text(f"halted: web-1: staging failed: {why}")
        assert rollout.locator(".reason b").count() == 0, "an agent's words stay text"
        expect(page.locator("#events tbody tr").first).to_contain_text("RolloutHalted")
        assert_fits(page)

        # Steered from the page: resumed (the next wave goes), paused, aborted.
        rollout.locator("button.resume").click()
        expect(rollout.locator('[data-host="web-2"] .badge')).to_have_text("sent")
        rollout.locator("button.pause").click()
        expect(rollout.locator(".badge").first).to_have_text("paused")
        rollout.locator("button.abort").click()
        expect(rollout.locator(".badge").first).to_have_text("aborted")
        expect(rollout.locator("button")).to_have_count(0)
        # Why it halted stays in its history after the resume cleared it, with who steered it.
        expect(rollout.locator(".reason")).to_have_count(0)
        history = rollout.locator(".history li")
        expect(history).to_have_count(5)
        expect(history.nth(0)).to_contain_text("started by alice")
        expect(history.nth(1)).to_contain_text(f"halted by hub: web-1: staging failed: {why}")
        expect(history.nth(2)).to_contain_text("resumed by alice")
        expect(history.nth(3)).to_contain_text("paused by alice")
        expect(history.nth(4)).to_contain_text("aborted by alice")
        assert rollout.locator(".history b").count() == 0, "an agent's words stay text"
        # The image is kept while web-2 may still be fetching it, then removed from the page.
        image.locator("button").click()
        expect(page.locator("#images-error")).to_contain_text("is still being fetched by host web-2 for rollout")
        run(sims.agents["web-2"].report("staged"))
        expect(rollout.locator('[data-host="web-2"] .badge')).to_have_text("staged")
        image.locator("button").click()
        expect(page.locator("#images tbody tr")).to_have_count(0)
        expect(page.locator("#images-error")).to_have_text("")
        assert page.evaluate("window.notReloaded") is True, "nothing above needed a reload"
        assert errors == [], errors
        assert_fits(page)
        page.set_viewport_size(PHONE)
        assert_fits(page)
        page.close()
    finally:
        run(sims.__aexit__(None, None, None))
        run.close()


def test_the_ui_offers_each_role_only_what_it_may_do(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    """The page shows the forms and buttons of what the role allows (/api/v1/me), follows a role
    changed while it is open, and the hub refuses what a page sends anyway."""
    tokens = {"admin": hub.admin_token}
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        added = hub.call("admin", "add", name, "--role", role)
        assert added.returncode == 0, added.stderr
        tokens[role] = added.stdout.strip().splitlines()[-1]
    generate_key(tmp_path / "key")
    hub.api("POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})
    hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "steps": [{"op": "motd", "params": {"text": "x"}}]})
    status, image = upload(hub, make_bundle(tmp_path, tmp_path / "key", "2.0").read_bytes())
    assert status == 201, image
    hub.api("POST", "/api/v1/rollouts", {"image": image["id"], "target": {"all": True}})
    run_form, upload_form, rollout_form = (
        f'[data-needs="{operation}"]'
        for operation in ("POST /api/v1/runs", "POST /api/v1/images", "POST /api/v1/rollouts")
    )

    def logged_in(role: str) -> Page:
        page = browser.new_page(viewport=DESKTOP)
        page.goto(hub.url)
        page.fill("#token", tokens[role])
        page.click("#login button")
        expect(page.locator("#who")).to_contain_text(f"({role})")
        # Everything is there to read, whatever the role.
        expect(page.locator('#hosts tr[data-host="web-1"]')).to_be_visible()
        expect(page.locator("#runs .run")).to_have_count(1)
        expect(page.locator(f'#images tr[data-image="{image["id"]}"]')).to_be_visible()
        expect(page.locator("#rollouts .rollout .badge").first).to_have_text("running")
        return page

    def offers(page: Page, runs: bool, rollouts: bool, images: bool) -> None:
        for selector, shown in ((run_form, runs), (rollout_form, rollouts), (upload_form, images)):
            if shown:
                expect(page.locator(selector)).to_be_visible()
            else:
                expect(page.locator(selector)).to_be_hidden()
        expect(page.locator("#runs button")).to_have_count(1 if runs else 0)  # Cancel
        expect(page.locator("#rollouts button")).to_have_count(2 if rollouts else 0)  # Pause, Abort
        expect(page.locator("#images button")).to_have_count(1 if images else 0)  # Remove
        # A host's page: taking a snapshot (and the rest of its actions) is an operator's.
        page.locator('#hosts tr[data-host="web-1"]').click()
        expect(page.locator("#detail-name")).to_have_text("web-1")
        if runs:
            expect(page.locator("#snapshot-form")).to_be_visible()
        else:
            expect(page.locator("#snapshot-form")).to_be_hidden()

    for role, allowed in (("admin", (True, True, True)), ("operator", (True, True, False))):
        page = logged_in(role)
        offers(page, *allowed)
        page.close()

    page = logged_in("viewer")
    expect(page.locator("#who")).to_have_text("vera (viewer)")
    offers(page, False, False, False)
    page.evaluate("window.notReloaded = true")
    # What the page does not offer, the hub refuses all the same.
    refused = page.evaluate("""async () => {
        const answer = await fetch("/api/v1/runs", {method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({target: {all: true}, steps: [{op: "motd", params: {text: "y"}}]})});
        return [answer.status, await answer.json()];
    }""")
    assert refused == [403, {"error": "role: POST /api/v1/runs needs the role operator; vera has the role viewer",
                             "needed_role": "operator", "role": "viewer"}], refused  # fmt: skip
    # Made an operator while the page is open: it reconnects and offers runs and rollouts, unreloaded.
    changed = hub.call("admin", "set-role", "vera", "operator")
    assert changed.returncode == 0, changed.stderr
    expect(page.locator("#who")).to_have_text("vera (operator)", timeout=10_000)
    offers(page, True, True, False)
    assert page.evaluate("window.notReloaded") is True
    page.close()
