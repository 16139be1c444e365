"""Image updates through the hub: its image store (bundles checked whole as they come in, served with
ranges to agents with their own token) and rollouts in waves.

The hub is the real `rastos-hub serve` (on SQLite and, where the store matters, PostgreSQL). Agents
are simulated: each speaks the real protocol over a real WebSocket, answers `update` with
`update_status` and "reboots" by reconnecting with the new version in its facts, or with a boot that
fell back. The last tests run the real agent (daemon/hub_link.py) against the hub, with a daemon core
whose updates API downloads the bundle the way a host does. Bundles are real ones, tiny, made with
rastos/bundle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemon.boot import BootState
from daemon.hub_link import HubLink, UpdateCompleted
from daemon.hub_link_settings import HubSettings
from daemon.store import StateStore
from daemon.updates import StageAnswer
from rastos.bundle import SigningKey, generate_key, part_offsets
from tests.hub_fixtures import Hub, UiClient, _serving, free_port, make_bundle, upload
from tests.hub_fixtures import any_hub as any_hub
from tests.hub_fixtures import hub as hub

# Bundles


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with two signing keys, `one` and `other`, and their public halves."""
    directory = tmp_path_factory.mktemp("keys")
    for name in ("one", "other"):
        generate_key(directory / name)
    return directory


def download(hub: Hub, path: str, token: str | None, first: int | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{hub.url}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if first is not None:
        request.add_header("Range", f"bytes={first}-")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def added(hub: Hub, bundle: Path) -> dict[str, Any]:
    status, image = upload(hub, bundle.read_bytes())
    assert status in (200, 201), image
    return dict(image)


def kept_files(hub: Hub) -> list[str]:
    directory = hub.directory / "images"
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# The image store


def test_a_complete_bundle_is_kept_and_anything_else_is_refused_naming_the_problem(
    any_hub: Hub, keys: Path, tmp_path: Path
) -> None:
    hub = any_hub
    good = make_bundle(tmp_path, keys / "one", "2.0")
    data = good.read_bytes()
    status, image = upload(hub, data)
    assert status == 201, image
    sha256 = hashlib.sha256(data).hexdigest()
    assert image == {
        "id": sha256[:16], "profile": "minimal", "version": "2.0", "parent": None, "delta": False, "size": len(data),
        "sha256": sha256, "uploaded_at": image["uploaded_at"], "uploaded_by": "alice",
        "key_id": SigningKey.load(keys / "one").id, "signature_checked": False,
    }  # fmt: skip
    assert upload(hub, data) == (200, image), "the same bundle again is the same image"
    assert hub.api("GET", "/api/v1/images") == [image]
    detail = hub.api("GET", f"/api/v1/images/{image['id']}")
    assert detail["manifest"]["version"] == "2.0" and detail["manifest"]["packages"][0]["name"] == "bash"
    assert kept_files(hub) == [f"{sha256}.rbundle"]

    corrupt = bytearray(data)
    corrupt[part_offsets(good)["root.btrfs.zst"][0] + 10] ^= 1
    other = make_bundle(tmp_path, keys / "one", "2.1")
    cases = [
        (data[: len(data) // 2], "bundle: "),  # cut short in the middle of a part
        (data[:700], "bundle: not a rastOS bundle, or cut short"),
        (b"\x7fELF" + bytes(5000), "bundle: not a rastOS bundle"),
        (bytes(corrupt), "bundle: part root.btrfs.zst does not match its sha256 in the manifest"),
    ]
    for body, expected in cases:
        status, answer = upload(hub, body)
        assert status == 422 and answer["error"].startswith(expected), answer
    status, answer = upload(hub, other.read_bytes(), content_type="application/json")
    assert status == 415 and answer["error"].startswith("content-type:"), answer
    # Another bundle that calls itself 2.0 is refused: a version names one tree for ever.
    (tmp_path / "again").mkdir()
    status, answer = upload(hub, make_bundle(tmp_path / "again", keys / "other", "2.0").read_bytes())
    assert status == 409 and "minimal 2.0 (full) already" in answer["error"], answer
    assert hub.api("GET", "/api/v1/images") == [image], "nothing refused was kept"
    assert kept_files(hub) == [f"{sha256}.rbundle"], "nor left on disk"
    methods = [event["method"] for event in hub.api("GET", "/api/v1/events")]
    assert methods.count("ImageAdded") == 1


def test_with_trusted_keys_the_hub_refuses_a_bundle_signed_by_another(keys: Path, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "one.pub").write_bytes((keys / "one.pub").read_bytes())
    server = Hub(tmp_path / "hub", global_options=["--trusted-keys", str(trusted)],
                 serve_options=["--max-image-bytes", "40000"])  # fmt: skip
    for served in _serving(server):
        status, answer = upload(served, make_bundle(tmp_path, keys / "other", "2.0").read_bytes())
        other_id = SigningKey.load(keys / "other").id
        assert status == 422, answer
        assert answer["error"] == (
            f"bundle: signed by key {other_id}, which the hub does not trust (its 1 trusted keys are the *.pub "
            f"files in {trusted})"
        )
        status, image = upload(served, make_bundle(tmp_path, keys / "one", "2.1").read_bytes())
        assert status == 201 and image["signature_checked"] is True, image
        status, answer = upload(served, bytes(40001))
        assert status == 413 and "larger than the 40000 bytes" in answer["error"], answer
        # The command line checks the same way, against the same keys.
        refused = served.call("image", "add", str(make_bundle(tmp_path, keys / "other", "2.2")))
        assert refused.returncode == 1 and f"signed by key {other_id}" in refused.stderr, refused.stderr
        assert [i["version"] for i in served.api("GET", "/api/v1/images")] == ["2.1"]
        assert kept_files(served) == [f"{image['sha256']}.rbundle"]


def test_the_command_line_adds_lists_and_removes_images(hub: Hub, keys: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, keys / "one", "3.0")
    done = hub.call("image", "add", str(bundle))
    assert done.returncode == 0, done.stderr
    image_id = hashlib.sha256(bundle.read_bytes()).hexdigest()[:16]
    assert done.stdout.startswith(f"image {image_id}: minimal 3.0 (full), ")
    assert "(there already)" in hub.call("image", "add", str(bundle)).stdout
    assert [image["id"] for image in hub.api("GET", "/api/v1/images")] == [image_id], "the running hub sees it"
    cut = tmp_path / "cut.rbundle"
    cut.write_bytes(bundle.read_bytes()[:5000])
    refused = hub.call("image", "add", str(cut))
    assert refused.returncode == 1 and refused.stderr.startswith("rastos-hub: bundle: "), refused.stderr
    assert hub.call("image", "list").stdout.startswith(f"{image_id}\tminimal 3.0")
    hub.wait_state(lambda state: image_id in state["images"], "the image in the UIs' state", timeout=30)
    assert hub.call("image", "remove", image_id).returncode == 0
    assert kept_files(hub) == [] and hub.api("GET", "/api/v1/images") == []


def test_a_host_downloads_only_a_bundle_it_was_sent_with_its_own_token_and_ranges(
    hub: Hub, keys: Path, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, keys / "one", "2.0")
    image, data = added(hub, bundle), bundle.read_bytes()
    other = added(hub, make_bundle(tmp_path, keys / "one", "3.0"))
    path = f"/api/v1/images/{image['id']}/bundle"
    missing = download(hub, "/api/v1/images/0123456789abcdef/bundle", hub.admin_token)
    assert missing[0] == 404 and json.loads(missing[2]) == {"error": "id: no image '0123456789abcdef'"}

    def refused(token: str, image_id: str) -> bool:
        """Answered as an image the hub does not hold: a host's token tells it nothing of the others."""
        status, _, body = download(hub, f"/api/v1/images/{image_id}/bundle", token)
        return status == 404 and json.loads(body) == {"error": f"id: no image {image_id!r}"}

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            sent = await fleet.add("web-1", "1.0")
            later = await fleet.add("web-2", "1.0")  # in the rollout's second wave: not sent anything yet
            outside = await fleet.add("db-1", "1.0", groups=("db",))
            assert await asyncio.to_thread(refused, sent.token, image["id"]), "before any rollout"
            body = {"image": image["id"], "target": {"group": "web"}, "canary": 1}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            await eventually(lambda: sent.updates, "the canary's update")
            assert sent.updates[0]["url"] == path
            for token in (later.token, outside.token):
                assert await asyncio.to_thread(refused, token, image["id"])
            assert await asyncio.to_thread(refused, sent.token, other["id"]), "another image than it was sent"

            status, headers, fetched = await asyncio.to_thread(download, hub, path, sent.token)
            assert status == 200 and fetched == data and headers["Content-Type"] == "application/octet-stream"
            assert headers["Content-Disposition"] == 'attachment; filename="rastos-minimal-2.0.rbundle"'
            # A download cut at 1000 bytes goes on from there.
            status, headers, fetched = await asyncio.to_thread(download, hub, path, sent.token, 1000)
            assert status == 206 and fetched == data[1000:], (status, len(fetched))
            assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
            # Aborted before web-2's turn: it never was sent the update, web-1 was and may still fetch it.
            await api(hub, "POST", f"/api/v1/rollouts/{rollout['id']}/abort")
            assert await asyncio.to_thread(refused, later.token, image["id"])
            status, _, fetched = await asyncio.to_thread(download, hub, path, sent.token, len(data) - 10)
            assert status == 206 and fetched == data[-10:]

    run(scenario)
    # Admins fetch any bundle; no token, or a wrong one, none.
    assert download(hub, f"/api/v1/images/{other['id']}/bundle", hub.admin_token)[0] == 200
    assert download(hub, path, hub.admin_token, first=len(data) - 10)[2] == data[-10:]
    for wrong in (None, "not-a-token"):
        status, _, body = download(hub, path, wrong)
        assert status == 401 and json.loads(body)["error"].startswith("authorization:"), body
    # A host's token reads bundles only: the rest of the API stays the admins'.
    token = hub.api("POST", "/api/v1/hosts", {"name": "web-9"})["token"]
    assert hub.request("GET", "/api/v1/images", token=token)[0] == 401


# Simulated agents


class SimAgent:
    """One host's agent: the real protocol over a real WebSocket, its boot state as the test sets it."""

    def __init__(self, hub: Hub, name: str, token: str, version: str, session: aiohttp.ClientSession) -> None:
        self.hub, self.name, self.token, self.session = hub, name, token, session
        self.boot = {"root": "@", "kind": "deployment", "entry": "rastos.conf", "health": "good",
                     "failed_entry": "", "image_version": version}  # fmt: skip
        self.updates: list[dict[str, Any]] = []  # every update frame received, repeats included
        self.errors: list[dict[str, Any]] = []
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        self.socket = await self.session.ws_connect(self.hub.agent_url, headers=headers)
        assert (await self.socket.receive_json(timeout=10))["type"] == "welcome"
        self._reader = asyncio.create_task(self._read(self.socket))
        await self.socket.send_json({"type": "facts", "facts": {"hostname": self.name, "boot_state": self.boot}})

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(message.data)
            if frame["type"] == "update":
                self.updates.append(frame["update"])
            elif frame["type"] == "error":
                self.errors.append(frame)

    async def disconnect(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self.socket = self._reader = None

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.socket is not None
        await self.socket.send_json(frame)

    async def report(self, state: str, detail: str | None = None) -> None:
        update = self.updates[-1]
        await self.send({"type": "update_status", "update": update["id"], "state": state,
                         "version": update["version"], "detail": detail})  # fmt: skip

    async def reboot(self, **boot: str) -> None:
        """A reboot: the link drops, and comes back with the new boot's facts."""
        await self.disconnect()
        self.boot.update(boot)
        await self.connect()

    async def update(self) -> None:
        """Stage the update it was sent, reboot into it, come back healthy on its version."""
        await self.report("staging")
        await self.report("staged")
        await self.reboot(image_version=self.updates[-1]["version"], health="good", kind="deployment")


class SimFleet:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.agents: dict[str, SimAgent] = {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SimFleet:
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for agent in self.agents.values():
            await agent.disconnect()
        assert self.session is not None
        await self.session.close()

    async def add(self, name: str, version: str, groups: tuple[str, ...] = ("web",), online: bool = True) -> SimAgent:
        token = (await api(self.hub, "POST", "/api/v1/hosts", {"name": name, "groups": list(groups)}))["token"]
        assert self.session is not None
        agent = self.agents[name] = SimAgent(self.hub, name, token, version, self.session)
        if online:
            await agent.connect()
        return agent

    def sent(self) -> dict[str, int]:
        return {name: len(agent.updates) for name, agent in self.agents.items() if agent.updates}

    def sent_to(self, names: list[str]) -> Callable[[], bool]:
        return lambda: all(self.agents[name].updates for name in names)


async def api(hub: Hub, method: str, path: str, body: object = None) -> Any:
    return await asyncio.to_thread(hub.api, method, path, body)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)
    return result


async def rollout_where(hub: Hub, rollout_id: str, check: Callable[[dict[str, Any]], bool], what: str,
                        timeout: float = 30) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        rollout: dict[str, Any] = await api(hub, "GET", f"/api/v1/rollouts/{rollout_id}")
        if check(rollout):
            return rollout
        assert time.monotonic() < deadline, f"the rollout never showed {what}:\n{json.dumps(rollout, indent=1)}"
        await asyncio.sleep(0.1)


def states(rollout: dict[str, Any]) -> dict[str, str]:
    return {host["host"]: host["state"] for host in rollout["hosts"]}


def all_in(names: list[str], state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda rollout: all(states(rollout)[name] == state for name in names)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


# Rollouts


def test_a_rollout_goes_wave_by_wave_and_skips_hosts_on_the_version(any_hub: Hub, keys: Path, tmp_path: Path) -> None:
    hub = any_hub
    bundle = make_bundle(tmp_path, keys / "one", "2.0")
    image, data = added(hub, bundle), bundle.read_bytes()

    async def scenario() -> None:
        async with SimFleet(hub) as fleet, UiClient(hub) as ui:
            for number in range(1, 6):
                await fleet.add(f"web-{number}", "1.0")
            await fleet.add("web-6", "2.0")  # runs the version already
            await fleet.add("db-1", "1.0", groups=("db",))  # not in the target
            await eventually(lambda: len(hub.state()["hosts"]["web-6"]["facts"] or {}), "web-6's facts")
            body = {"image": image["id"], "target": {"group": "web"}, "canary": 1, "wave_percent": 50}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            assert rollout["state"] == "running" and rollout["waves"] == 3 and rollout["wave"] == 1
            waves = {host["host"]: host["wave"] for host in rollout["hosts"]}
            assert waves == {"web-6": 0, "web-1": 1, "web-2": 2, "web-3": 2, "web-4": 3, "web-5": 3}
            assert states(rollout)["web-6"] == "skipped"
            for wave, names in ((1, ["web-1"]), (2, ["web-2", "web-3"]), (3, ["web-4", "web-5"])):
                await eventually(fleet.sent_to(names), f"wave {wave} sent")
                assert sorted(fleet.sent()) == sorted(n for n in waves if 0 < waves[n] <= wave), "no later wave"
                for name in names:
                    update = fleet.agents[name].updates[-1]
                    assert update == {"id": update["id"], "url": f"/api/v1/images/{image['id']}/bundle",
                                      "version": "2.0", "reboot": True}  # fmt: skip
                    await fleet.agents[name].report("staging")
                current = await rollout_where(hub, rollout["id"], all_in(names, "staging"), f"wave {wave} staging")
                assert current["wave"] == wave and current["state"] == "running"
                # Each host downloads the bundle from the path it was sent, with its own token.
                agent = fleet.agents[names[0]]
                fetched = await asyncio.to_thread(download, hub, agent.updates[-1]["url"], agent.token)
                assert fetched[0] == 200 and fetched[2] == data
                for name in names:
                    await fleet.agents[name].update()
            done = await rollout_where(hub, rollout["id"], lambda r: r["state"] == "complete", "complete")
            assert states(done) == {**{f"web-{n}": "done" for n in range(1, 6)}, "web-6": "skipped"}
            assert all(h["from_version"] == "1.0" for h in done["hosts"] if h["state"] == "done")
            assert fleet.sent() == {f"web-{n}": 1 for n in range(1, 6)}, "one update each, none to db-1 or web-6"
            await ui.until(lambda s: s["rollouts"].get(rollout["id"], {}).get("state") == "complete", "complete")
            await ui.assert_converged()

    run(scenario)
    methods = [event["method"] for event in hub.api("GET", "/api/v1/events?limit=1000")]
    assert methods.count("UpdateSent") == 5 and methods.count("RolloutWave") == 3
    assert methods.index("RolloutStarted") < methods.index("RolloutFinished")


def test_a_host_that_falls_back_halts_the_rollout_with_the_reason(hub: Hub, keys: Path, tmp_path: Path) -> None:
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            for name in ("web-1", "web-2", "web-3"):
                await fleet.add(name, "1.0")
            body = {"image": image["id"], "target": {"all": True}, "canary": 1, "wave_percent": 100}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            canary = fleet.agents["web-1"]
            await eventually(lambda: canary.updates, "canary sent")
            await canary.report("staging")
            await canary.report("staged")
            # The new deployment used up its tries: the one before booted again, and says so.
            await canary.reboot(kind="fallback", failed_entry="rastos-update-2.0.conf", health="good")
            halted = await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted")
            assert halted["reason"] == (
                "web-1: fell back: the new deployment did not boot (rastos-update-2.0.conf); 1.0 runs again"
            )
            assert states(halted) == {"web-1": "failed", "web-2": "pending", "web-3": "pending"}
            await asyncio.sleep(1.5)  # a few of the engine's ticks: nothing more goes out
            assert fleet.sent() == {"web-1": 1}
            status, answer = await asyncio.to_thread(hub.request, "POST", f"/api/v1/rollouts/{rollout['id']}/pause")
            assert status == 409 and answer["error"].endswith("only a running one can be paused")
            # An admin who looked resumes: the failed host stays failed, the next wave goes.
            resumed = await api(hub, "POST", f"/api/v1/rollouts/{rollout['id']}/resume")
            assert resumed["state"] == "running" and resumed["reason"] is None
            await eventually(lambda: fleet.sent() == {"web-1": 1, "web-2": 1, "web-3": 1}, "the second wave")
            aborted = await api(hub, "POST", f"/api/v1/rollouts/{rollout['id']}/abort")
            assert aborted["state"] == "aborted" and aborted["reason"] is None

    run(scenario)
    events = hub.api("GET", "/api/v1/events?limit=1000")
    halted = [event for event in events if event["method"] == "RolloutHalted"]
    assert len(halted) == 1 and halted[0]["detail"]["reason"].startswith("web-1: fell back")
    # Resumed, then aborted: why it halted, and who steered it, stay in its history, restarts included.
    expected = [
        ("running", "alice", None),
        ("halted", "hub", "web-1: fell back: the new deployment did not boot (rastos-update-2.0.conf); 1.0 runs again"),
        ("running", "alice", None),
        ("aborted", "alice", None),
    ]
    for _restart in range(2):
        history = hub.api("GET", "/api/v1/rollouts")[0]["history"]
        assert [(change["state"], change["by"], change["reason"]) for change in history] == expected
        assert sorted(change["time"] for change in history) == [change["time"] for change in history]
        hub.stop()
        hub.start()


def test_pause_resume_abort_and_a_failed_staging(hub: Hub, keys: Path, tmp_path: Path) -> None:
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            for name in ("web-1", "web-2", "web-3", "web-4"):
                await fleet.add(name, "1.0")
            body = {"image": image["id"], "target": {"hosts": ["web-1", "web-2", "web-3", "web-4"]},
                    "wave_percent": 34}  # fmt: skip
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            assert [h["wave"] for h in rollout["hosts"]] == [1, 2, 2, 3], "canary 1, then ceil(34% of 3) = 2"
            assert rollout["health_timeout_s"] == 900 and rollout["canary"] == 1
            path = f"/api/v1/rollouts/{rollout['id']}"
            await eventually(lambda: fleet.agents["web-1"].updates, "the canary's update")
            assert (await api(hub, "POST", f"{path}/pause"))["state"] == "paused"
            await fleet.agents["web-1"].update()  # an update under way goes on while paused
            paused = await rollout_where(hub, rollout["id"], lambda r: states(r)["web-1"] == "done", "canary done")
            assert paused["state"] == "paused" and paused["wave"] == 1
            await asyncio.sleep(1.5)
            assert fleet.sent() == {"web-1": 1}, "paused: no new wave"
            assert (await api(hub, "POST", f"{path}/resume"))["state"] == "running"
            await eventually(lambda: fleet.sent() == {"web-1": 1, "web-2": 1, "web-3": 1}, "wave 2 after resume")
            await fleet.agents["web-2"].report("failed", "receive: no space left on device")
            halted = await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted")
            assert halted["reason"] == "web-2: staging failed: receive: no space left on device"
            aborted = await api(hub, "POST", f"{path}/abort")
            assert aborted["state"] == "aborted" and aborted["finished"] is not None
            assert states(aborted) == {"web-1": "done", "web-2": "failed", "web-3": "sent", "web-4": "cancelled"}
            # An update under way when the rollout ended is still followed to its end.
            await fleet.agents["web-3"].update()
            ended = await rollout_where(hub, rollout["id"], lambda r: states(r)["web-3"] == "done", "web-3 done")
            assert ended["state"] == "aborted" and fleet.sent() == {"web-1": 1, "web-2": 1, "web-3": 1}
            for action in ("pause", "resume", "abort"):
                status, answer = await asyncio.to_thread(hub.request, "POST", f"{path}/{action}")
                assert status == 409 and answer["error"].startswith("state: "), answer

    run(scenario)


def test_an_agent_offline_when_its_wave_starts_gets_its_update_when_it_returns(
    hub: Hub, keys: Path, tmp_path: Path
) -> None:
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            away = await fleet.add("web-1", "1.0", online=False)
            await fleet.add("web-2", "1.0")
            body = {"image": image["id"], "target": {"group": "web"}, "canary": 1}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            assert states(rollout) == {"web-1": "pending", "web-2": "pending"}, "web-1 is away: nothing sent"
            await away.connect()
            first = (await eventually(lambda: away.updates, "the update right after the welcome"))[0]
            # The link drops before the agent said anything: the update comes again, the same id.
            await away.disconnect()
            await away.connect()
            await eventually(lambda: len(away.updates) == 2, "the update again")
            assert away.updates[1] == first
            await away.update()
            await eventually(lambda: fleet.sent().get("web-2") == 1, "the next wave")
            assert len(away.updates) == 2, "reported on: not sent again"

    run(scenario)


def test_an_update_under_way_comes_again_after_a_welcome_while_its_rollout_is_paused_or_halted(
    hub: Hub, keys: Path, tmp_path: Path
) -> None:
    """A frame lost with a dying link is sent again after the next welcome, and an update under way goes
    on while its rollout is paused or halted: the rollout's state stops new hosts, not those."""
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            for name in ("web-1", "web-2", "web-3"):
                await fleet.add(name, "1.0")
            body = {"image": image["id"], "target": {"all": True}, "canary": 1, "wave_percent": 100}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            path = f"/api/v1/rollouts/{rollout['id']}"
            canary = fleet.agents["web-1"]
            await eventually(lambda: canary.updates, "the canary's update")
            await api(hub, "POST", f"{path}/pause")
            # Its link dropped before it said anything: the update was lost with it, and comes again.
            await canary.reboot()
            await eventually(lambda: len(canary.updates) == 2, "the update again while paused")
            assert canary.updates[1] == canary.updates[0]
            await canary.update()
            await rollout_where(hub, rollout["id"], lambda r: states(r)["web-1"] == "done", "the canary done")
            await api(hub, "POST", f"{path}/resume")
            await eventually(fleet.sent_to(["web-2", "web-3"]), "the second wave")
            await fleet.agents["web-2"].report("failed", "receive: no space left on device")
            await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted")
            late = fleet.agents["web-3"]
            await late.reboot()
            await eventually(lambda: len(late.updates) == 2, "the update again while halted")
            await late.update()
            ended = await rollout_where(hub, rollout["id"], lambda r: states(r)["web-3"] == "done", "web-3 done")
            assert ended["state"] == "halted" and fleet.sent() == {"web-1": 2, "web-2": 1, "web-3": 2}

    run(scenario)


def test_a_host_not_back_healthy_in_time_halts_the_rollout(hub: Hub, keys: Path, tmp_path: Path) -> None:
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            agent = await fleet.add("web-1", "1.0")
            await fleet.add("web-2", "1.0")
            body = {"image": image["id"], "target": {"all": True}, "health_timeout_s": 2}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            await eventually(lambda: agent.updates, "the canary's update")
            await agent.report("staging")
            await agent.report("staged")
            await agent.reboot(health="pending")  # it came back, on the old version, and stays there
            halted = await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted", timeout=15)
            assert halted["reason"] == "web-1: not back healthy on 2.0 within 2 s of the update (last: staged)"

    run(scenario)


def test_images_in_use_stay_and_a_host_is_in_one_rollout_at_a_time(hub: Hub, keys: Path, tmp_path: Path) -> None:
    full = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))
    delta = added(hub, make_bundle(tmp_path, keys / "one", "2.0", parent="1.0"))
    assert delta["delta"] is True and delta["parent"] == "1.0" and delta["id"] != full["id"]

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            await fleet.add("web-1", "1.0")
            await fleet.add("old-1", "0.9", groups=("old",))
            status, answer = await asyncio.to_thread(
                hub.request, "POST", "/api/v1/rollouts", {"image": delta["id"], "target": {"all": True}}
            )
            assert status == 422 and answer["error"].startswith("target: host old-1 runs 0.9, and image "), answer
            rollout = await api(hub, "POST", "/api/v1/rollouts", {"image": delta["id"], "target": {"group": "web"}})
            for body, expected in (
                ({"image": full["id"], "target": {"hosts": ["web-1"]}}, (409, "target: host web-1 is in rollout ")),
                ({"image": "nosuchimage", "target": {"all": True}}, (404, "image: no image 'nosuchimage'")),
                ({"image": full["id"], "target": {"group": "none"}}, (404, "target.group: no host is in group")),
                ({"image": full["id"], "target": {"all": True}, "canary": -1}, (400, "canary: -1 is less than")),
                ({"image": full["id"], "target": {"all": True}, "wave_percent": 0}, (400, "wave_percent: 0 is")),
                ({"target": {"all": True}}, (400, "body: 'image' is a required property")),
            ):
                status, answer = await asyncio.to_thread(hub.request, "POST", "/api/v1/rollouts", body)
                assert (status, answer["error"][: len(expected[1])]) == expected, answer
            status, answer = await asyncio.to_thread(hub.request, "DELETE", f"/api/v1/images/{delta['id']}")
            assert status == 409 and answer["error"].endswith("abort it or let it finish"), answer
            await api(hub, "POST", f"/api/v1/rollouts/{rollout['id']}/abort")
            await eventually(lambda: fleet.agents["web-1"].updates, "web-1's update")
            await fleet.agents["web-1"].report("failed", "receive: no space left on device")
            await rollout_where(hub, rollout["id"], lambda r: states(r)["web-1"] == "failed", "web-1 failed")
            assert await asyncio.to_thread(hub.request, "DELETE", f"/api/v1/images/{delta['id']}") == (204, None)

    run(scenario)
    assert [image["id"] for image in hub.api("GET", "/api/v1/images")] == [full["id"]]
    assert kept_files(hub) == [f"{full['sha256']}.rbundle"]
    assert hub.request("GET", f"/api/v1/images/{delta['id']}")[0] == 404
    assert hub.api("GET", "/api/v1/rollouts")[0]["image"] == delta["id"], "a finished rollout outlives its image"


def test_an_image_is_removed_only_when_no_rollout_needs_it(any_hub: Hub, keys: Path, tmp_path: Path) -> None:
    hub = any_hub
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))
    delta = added(hub, make_bundle(tmp_path, keys / "one", "2.0", parent="1.0"))
    parent = added(hub, make_bundle(tmp_path, keys / "one", "1.0"))
    path = f"/api/v1/images/{image['id']}"

    def refused(status: int, error: str) -> Callable[[], None]:
        """Refused by the REST API and the command line alike, the file and the row kept."""

        def check() -> None:
            answer = hub.request("DELETE", path)
            assert answer[0] == status and answer[1]["error"] == f"id: {error}", answer
            cli = hub.call("image", "remove", image["id"])
            assert cli.returncode == 1 and cli.stderr == f"rastos-hub: image: {error}\n", cli.stderr
            assert hub.api("GET", path)["id"] == image["id"] and f"{image['sha256']}.rbundle" in kept_files(hub)

        return check

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            await fleet.add("web-1", "1.0")
            second = await fleet.add("web-2", "1.0")
            rollout = await api(hub, "POST", "/api/v1/rollouts", {"image": image["id"], "target": {"all": True}})
            steer = f"/api/v1/rollouts/{rollout['id']}"
            in_use = f"image {image['id']} is in use by rollout {rollout['id']}, which is"
            await eventually(lambda: fleet.agents["web-1"].updates, "the canary's update")
            await asyncio.to_thread(refused(409, f"{in_use} running; abort it or let it finish"))
            await api(hub, "POST", f"{steer}/pause")
            await asyncio.to_thread(refused(409, f"{in_use} paused; abort it or let it finish"))
            await api(hub, "POST", f"{steer}/resume")
            await fleet.agents["web-1"].report("failed", "receive: no space left on device")
            await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted")
            await asyncio.to_thread(refused(409, f"{in_use} halted; abort it or let it finish"))
            # Resumed, web-2 is sent the update, and the rollout aborted: web-2's download goes on.
            await api(hub, "POST", f"{steer}/resume")
            await eventually(lambda: second.updates, "the second wave")
            await api(hub, "POST", f"{steer}/abort")
            await asyncio.to_thread(refused(409, (
                f"image {image['id']} is still being fetched by host web-2 for rollout {rollout['id']}, which is "
                "aborted; try again once the host has staged it or failed (at the latest 900 s after it was sent "
                "the update)"
            )))  # fmt: skip
            await second.report("staging")
            await second.report("staged")
            await rollout_where(hub, rollout["id"], lambda r: states(r)["web-2"] == "staged", "web-2 staged")

    run(scenario)
    assert hub.request("DELETE", path) == (204, None)
    assert hub.request("GET", path)[0] == 404 and hub.request("DELETE", path)[0] == 404
    assert download(hub, f"{path}/bundle", hub.admin_token)[0] == 404
    assert f"{image['sha256']}.rbundle" not in kept_files(hub)
    removed = [event for event in hub.api("GET", "/api/v1/events") if event["method"] == "ImageRemoved"]
    assert [(event["actor"], event["detail"]) for event in removed] == [
        ("alice", {"image": image["id"], "sha256": image["sha256"]})
    ]
    hub.wait_state(lambda state: image["id"] not in state["images"], "the image gone from the UIs' state")
    assert hub.api("GET", "/api/v1/rollouts")[0]["image"] == image["id"], "a finished rollout outlives its image"

    # The command line takes a version too, if only one image has it.
    for name, expected in (
        ("2.1", "rastos-hub: image: no image with the id or version '2.1'\n"),
        ("", "rastos-hub: image: no image with the id or version ''\n"),
    ):
        cli = hub.call("image", "remove", name)
        assert cli.returncode == 1 and cli.stderr == expected, cli.stderr
    assert added(hub, make_bundle(tmp_path, keys / "one", "2.0"))["id"] == image["id"], "the same bundle again"
    cli = hub.call("image", "remove", "2.0")
    assert cli.returncode == 1 and cli.stderr == (
        f"rastos-hub: image: version '2.0' names 2 images: {delta['id']} (minimal 2.0, delta from 1.0); "
        f"{image['id']} (minimal 2.0, full); give the id of the one meant\n"
    ), cli.stderr
    # A delta's parent version may go: a host applies the delta to the deployment it runs.
    cli = hub.call("image", "remove", "1.0")
    assert cli.returncode == 0 and cli.stdout == f"image {parent['id']} removed, and its bundle\n", cli.stderr
    assert {left["id"] for left in hub.api("GET", "/api/v1/images")} == {delta["id"], image["id"]}
    assert kept_files(hub) == sorted(f"{left['sha256']}.rbundle" for left in (delta, image))


def test_a_bundle_whose_row_was_removed_is_swept_at_the_next_start(hub: Hub, keys: Path, tmp_path: Path) -> None:
    """A removal commits the row's deletion, then removes the file: a crash between leaves a file no
    row names, never a row naming a missing file. The next start removes such a file, unless it is
    young enough to be an `image add` at work (which keeps its file before its row)."""
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))
    directory = hub.directory / "images"
    hub.stop()
    kept, orphan, young = (directory / f"{sha256}.rbundle" for sha256 in (image["sha256"], "a" * 64, "b" * 64))
    orphan.write_bytes(kept.read_bytes())
    young.write_bytes(kept.read_bytes())
    hour_ago = time.time() - 3700
    for old in (kept, orphan):
        os.utime(old, (hour_ago, hour_ago))
    hub.start()
    assert kept_files(hub) == sorted([f"{image['sha256']}.rbundle", young.name])
    assert download(hub, f"/api/v1/images/{image['id']}/bundle", hub.admin_token)[0] == 200


def test_a_restarted_hub_goes_on_with_its_rollouts(any_hub: Hub, keys: Path, tmp_path: Path) -> None:
    hub = any_hub
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))

    async def scenario() -> None:
        async with SimFleet(hub) as fleet:
            for name in ("web-1", "web-2", "web-3"):
                await fleet.add(name, "1.0")
            body = {"image": image["id"], "target": {"all": True}, "wave_percent": 100}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            canary = fleet.agents["web-1"]
            await eventually(lambda: canary.updates, "canary sent")
            await canary.report("staging")
            await canary.report("staged")
            await rollout_where(hub, rollout["id"], lambda r: states(r)["web-1"] == "staged", "staged")
            # The hub dies while the canary reboots; it comes back, and so do the agents.
            assert await asyncio.to_thread(hub.stop, signal.SIGKILL) == -signal.SIGKILL
            for agent in fleet.agents.values():
                await agent.disconnect()
            await asyncio.to_thread(hub.start)
            restarted = await api(hub, "GET", f"/api/v1/rollouts/{rollout['id']}")
            assert restarted["state"] == "running" and restarted["wave"] == 1
            assert states(restarted) == {"web-1": "staged", "web-2": "pending", "web-3": "pending"}
            for name in ("web-2", "web-3"):
                await fleet.agents[name].connect()
            canary.boot.update(image_version="2.0")
            await canary.connect()
            await eventually(lambda: fleet.sent() == {"web-1": 1, "web-2": 1, "web-3": 1}, "wave 2 after the restart")
            for name in ("web-2", "web-3"):
                await fleet.agents[name].update()
            await rollout_where(hub, rollout["id"], lambda r: r["state"] == "complete", "complete")
            # Each host's last change is the update, by the admin who rolled it out; a restart keeps it.
            for restart in (False, True):
                if restart:
                    await asyncio.to_thread(hub.stop)
                    await asyncio.to_thread(hub.start)
                hosts = await api(hub, "GET", "/api/v1/hosts")
                changes = {host["name"]: host["last_change"] for host in hosts}
                assert all(change["kind"] == "rollout" and change["id"] == rollout["id"] and change["by"] == "alice"
                           and change["what"] == "update to 2.0" for change in changes.values()), changes  # fmt: skip

    run(scenario)


def test_bad_update_status_frames_are_refused_naming_the_field(hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "web-1"})["token"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for frame, expected in (
                ({"update": "x", "state": "exploded", "version": "2.0"}, "message.state: 'exploded' is not one of"),
                ({"update": "x", "state": "staged"}, "message: 'version' is a required property"),
                ({"update": "", "state": "staged", "version": "2.0"}, "message.update: '' should be non-empty"),
                ({"update": "x", "state": "failed", "version": "2.0", "detail": 5}, "message.detail: 5 is not"),
                ({"update": "x", "state": "failed", "version": "2.0", "detail": "d" * 4097}, "message.detail:"),
            ):
                headers = {"Authorization": f"Bearer {token}"}
                async with session.ws_connect(hub.agent_url, headers=headers) as socket:
                    await socket.receive_json(timeout=10)
                    await socket.send_json({"type": "update_status", **frame})
                    answer = await socket.receive_json(timeout=10)
                    assert answer["type"] == "error" and answer["message"].startswith(expected), answer

    run(scenario)


# The real agent (daemon/hub_link.py)


class UpdatingCore:
    """A daemon core for the hub link whose updates API stages as a host's does as far as the hub
    sees it: it downloads the bundle from the source it is given with the headers it is given,
    resuming with Range after a cut, and reports the end from its own thread."""

    def __init__(self, directory: Path, version: str) -> None:
        self.store = StateStore(directory / "state.db")
        self.snapshots = None
        self.version = version
        self.staged: list[tuple[str, bool, dict[str, str]]] = []
        self.downloaded: list[bytes] = []
        self.refuse: str | None = None
        self._callbacks: list[UpdateCompleted] = []

    def hostname(self) -> str:
        return "real-1"

    def boot_state(self) -> BootState:
        return BootState("@", None, "rastos.conf", "good", image_version=self.version)

    def stage_update(
        self, source: str, *, version: str, reboot: bool, headers: Mapping[str, str],
        tls: ssl.SSLContext | None = None,
    ) -> StageAnswer:  # fmt: skip
        from daemon.errors import DaemonError

        if self.refuse is not None:
            raise DaemonError(self.refuse)
        self.staged.append((source, reboot, dict(headers)))
        staging = len(self.staged)
        threading.Thread(target=self._stage, args=(staging, source, dict(headers), tls)).start()
        return StageAnswer(staging, "staging")

    def _stage(self, staging: int, source: str, headers: dict[str, str], tls: ssl.SSLContext | None) -> None:
        first = urllib.request.Request(source, headers={**headers, "Range": "bytes=0-999"})
        with urllib.request.urlopen(first, timeout=30, context=tls) as response:
            head = response.read()
        rest = urllib.request.Request(source, headers={**headers, "Range": f"bytes={len(head)}-"})
        with urllib.request.urlopen(rest, timeout=30, context=tls) as response:
            self.downloaded.append(head + response.read())
        for callback in self._callbacks:
            callback(staging, True, {"state": "staged", "version": "2.0"})

    def on_update_completed(self, callback: UpdateCompleted) -> None:
        self._callbacks.append(callback)


@contextlib.asynccontextmanager
async def linked(core: UpdatingCore, hub: Hub, token: str) -> AsyncIterator[HubLink]:
    """The real hub link of `core`, connected while the block runs; gone at its end (a reboot)."""
    link = HubLink(core, HubSettings(hub.agent_url, token))  # type: ignore[arg-type]
    task = asyncio.create_task(link.run_forever())
    try:
        yield link
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_real_agent_stages_its_update_with_its_token_and_reports(
    hub: Hub, keys: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bundle = make_bundle(tmp_path, keys / "one", "2.0")
    image = added(hub, bundle)
    token = hub.api("POST", "/api/v1/hosts", {"name": "real-1"})["token"]
    core = UpdatingCore(tmp_path / "daemon", "1.0")

    async def scenario() -> None:
        async with linked(core, hub, token):
            facts = await eventually(lambda: hub.state()["hosts"]["real-1"]["facts"], "the agent's facts")
            assert facts["boot_state"]["image_version"] == "1.0", "the version in the facts"
            body = {"image": image["id"], "target": {"hosts": ["real-1"]}}
            rollout = await api(hub, "POST", "/api/v1/rollouts", body)
            await rollout_where(hub, rollout["id"], lambda r: states(r)["real-1"] == "staged", "staged")
        assert core.staged == [(f"{hub.url}/api/v1/images/{image['id']}/bundle", True,
                                {"Authorization": f"Bearer {token}"})]  # fmt: skip
        assert core.downloaded == [bundle.read_bytes()], "downloaded in two ranges with the host's token"
        # The host reboots into 2.0: its next link says so, and the rollout is done.
        core.version = "2.0"
        async with linked(core, hub, token):
            await rollout_where(hub, rollout["id"], lambda r: r["state"] == "complete", "complete")
        assert len(core.staged) == 1, "staged once"

    run(scenario)
    assert token not in caplog.text, "the host's token is never logged"


def test_the_real_agent_reports_a_staging_its_daemon_refuses(hub: Hub, keys: Path, tmp_path: Path) -> None:
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))
    token = hub.api("POST", "/api/v1/hosts", {"name": "real-1"})["token"]
    core = UpdatingCore(tmp_path / "daemon", "1.0")
    core.refuse = "updates: a staging is in progress already"

    async def scenario() -> None:
        async with linked(core, hub, token):
            await eventually(lambda: hub.state()["hosts"]["real-1"]["online"], "the agent online")
            rollout = await api(hub, "POST", "/api/v1/rollouts", {"image": image["id"], "target": {"all": True}})
            halted = await rollout_where(hub, rollout["id"], lambda r: r["state"] == "halted", "halted")
            assert halted["reason"] == "real-1: staging failed: updates: a staging is in progress already"

    run(scenario)


def test_a_host_back_on_the_version_when_its_update_goes_is_done_by_its_facts(
    hub: Hub, keys: Path, tmp_path: Path
) -> None:
    """A host away when its wave starts is sent its update right after its next welcome, which comes
    before that connection's facts: the hub decides on the facts of the boot before. A host that came
    back on the version already (its own admin staged it) answers the update by its facts alone, over
    that same connection, made before the update was sent; they end its update all the same."""
    image = added(hub, make_bundle(tmp_path, keys / "one", "2.0"))
    token = hub.api("POST", "/api/v1/hosts", {"name": "real-1"})["token"]
    core = UpdatingCore(tmp_path / "daemon", "1.0")

    async def scenario() -> None:
        async with linked(core, hub, token):
            await eventually(lambda: hub.state()["hosts"]["real-1"]["facts"], "the agent's facts of 1.0")
        await eventually(lambda: not hub.state()["hosts"]["real-1"]["online"], "the host away")
        rollout = await api(hub, "POST", "/api/v1/rollouts", {"image": image["id"], "target": {"all": True}})
        assert states(rollout) == {"real-1": "pending"}
        core.version = "2.0"  # staged by its own admin meanwhile, and booted
        async with linked(core, hub, token):
            ended = await rollout_where(hub, rollout["id"], lambda r: r["state"] != "running", "its end")
        assert (ended["state"], states(ended)) == ("complete", {"real-1": "done"}), ended
        assert core.staged == [], "it runs the version: nothing to stage"

    run(scenario)


def test_the_agent_fetches_bundles_from_its_own_hub_only(tmp_path: Path) -> None:
    """An update's url is a path the agent joins to the hub it reaches (under a proxy's path too):
    anything else would send the host's token elsewhere, and is refused without a download."""
    core = UpdatingCore(tmp_path, "1.0")
    core.refuse = "no staging expected here"
    link = HubLink(core, HubSettings("wss://hub.example/fleet/api/v1/agent", "secret"))  # type: ignore[arg-type]
    assert link.hub_base() == "https://hub.example/fleet"
    for url in ("https://elsewhere.example/api/v1/images/x/bundle", "//elsewhere.example/x", "/api/v1/state"):
        link._take_update({"id": f"u-{url}", "url": url, "version": "2.0", "reboot": True})
        status = link._updates[f"u-{url}"]
        assert (status["state"], status["detail"]) == ("failed", "url: must be a bundle's path on the hub"), url
    link._take_update({"id": "same", "url": "/api/v1/images/x/bundle", "version": "1.0", "reboot": True})
    assert "same" not in link._updates, "an update to the version it runs is answered by the facts alone"
    assert core.staged == []


def test_the_agent_answers_an_update_to_the_version_it_runs_with_its_facts_again(tmp_path: Path) -> None:
    """Facts sent before the update may reach the hub while it is still deciding to send it, when it
    does not follow them for the update yet: the answer is the facts again, after the update. The peer
    is a hub played over a real WebSocket, as nothing else sets that order for certain."""
    core = UpdatingCore(tmp_path, "2.0")
    update = {"id": "u-1", "url": "/api/v1/images/x/bundle", "version": "2.0", "reboot": True}
    frames: list[dict[str, Any]] = []

    def facts() -> list[dict[str, Any]]:
        return [frame for frame in frames if frame["type"] == "facts"]

    async def hub_side(request: web.Request) -> web.WebSocketResponse:
        """Welcome, then the update once the first facts are in."""
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"type": "welcome", "host": "real-1", "last_event": 0, "commands": []})
        async for message in socket:
            frames.append(json.loads(message.data))
            if frames[-1]["type"] == "facts" and len(facts()) == 1:
                await socket.send_json({"type": "update", "update": update})
        return socket

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/agent", hub_side)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        link = HubLink(core, HubSettings(f"ws://127.0.0.1:{port}/api/v1/agent", "secret"))  # type: ignore[arg-type]
        task = asyncio.create_task(link.run_forever())
        try:
            await eventually(lambda: len(facts()) == 2, "the facts again after the update")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()

    run(scenario)
    first, again = facts()
    assert again == first and first["facts"]["boot_state"]["image_version"] == "2.0"
    assert "update_status" not in [frame["type"] for frame in frames] and core.staged == []
