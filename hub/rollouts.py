"""Rollouts: an image taken to a set of hosts wave by wave, by the hub, persisted as it goes so a
restarted hub goes on where it was.

A rollout's hosts are fixed when it starts. A host whose facts show the image's version already
(`boot_state.image_version`) is skipped. The rest go in waves: the first wave is the canary (the first
`canary` hosts, in the order given, or by name for a group or all), each later wave is `wave_percent`
of the hosts left after it (rounded up, at least one). A wave starts when every host of the one before
is done.

A host in a wave is sent `update` (hub/protocol.py) as soon as it is online; one that is offline gets
it right after its next welcome. It is then
- done when its facts show the image's version with health good. A boot's version never changes, so
  the facts of any connection tell: a host on the version already answers its update by them alone;
- failed when its agent reports the staging failed or was cancelled, when facts sent over a connection
  made after the update was sent (it rebooted) show a boot that fell back (the new deployment did not
  come up and the one before booted again), or when neither happened within `health_timeout_s` of the
  update being sent.
A failure halts the rollout: no more hosts are sent it, and the reason names the host and what happened.
`resume` goes on from there (the failed host stays failed), `pause` stops sending to more hosts until
resumed, and `abort` ends it: hosts not yet sent the update never are, and hosts updated already stay
updated. Hosts under way when a rollout halts or ends are still followed to done or failed; while it is
paused or halted, their update still goes again after each welcome until their agent reports on it.

Every method runs with the fleet's lock held (hub/fleet.py), so the engine never decides on a stale
view; every change is in the database before it is published or sent.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from hub.errors import Conflict, NotFound, Unprocessable
from hub.images import Checked, ImageFiles
from hub.protocol import UpdateStatus
from hub.rollout_store import ACTIVE_ROLLOUT_STATES, RolloutStore

log = logging.getLogger("rastos-hub.rollouts")

ACTIVE = frozenset(ACTIVE_ROLLOUT_STATES)
IN_FLIGHT = frozenset({"sent", "staging", "staged"})  # sent the update, not yet done or failed
HOST_FINAL = frozenset({"done", "failed", "skipped", "cancelled"})
KEPT_ROLLOUTS = 50  # finished ones in memory (and in a UI's state); active ones are all kept
# An update sent before the hub (re)started may have finished meanwhile: its agent gets this long to
# reconnect and say so before the health timeout can fail it.
RECONNECT_GRACE = 60.0
IMAGE_REFRESH = 10.0  # seconds: images added by `rastos-hub image add` reach the UIs this soon
MAX_DETAIL = 4096
MAX_REASON = 1024
MAX_HISTORY = 32  # a rollout's newest changes of state kept: each halt needs a failure and a resume


class Link(Protocol):
    """A connected agent, as the engine uses it (hub/fleet.py's AgentLink)."""

    host: str
    connected: float  # when this connection was made (time.time())

    def send(self, message: dict[str, Any], /) -> Awaitable[None]: ...


class FleetFace(Protocol):
    """What the engine needs of the fleet: hosts and their facts, the connected agents, the UIs."""

    hosts: dict[str, dict[str, Any]]

    @property
    def agents(self) -> Mapping[str, Link]: ...
    def publish(self, change: dict[str, Any]) -> None: ...
    def publish_event(self, item: dict[str, Any]) -> None: ...
    def resolve(self, target: dict[str, Any]) -> list[str]: ...
    def note_change(self, name: str, change: dict[str, Any]) -> None: ...


def host_change(rollout: Mapping[str, Any], host: Mapping[str, Any]) -> dict[str, Any]:
    """A host done in a rollout, as its last change (hub/fleet.py): updated to the rollout's version."""
    return {"time": host.get("finished") or time.time(), "by": rollout["admin"], "kind": "rollout",
            "id": rollout["id"], "what": f"update to {rollout['version']}"}  # fmt: skip


def image_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """An image as the API and the UIs show it."""
    return {
        "id": row["id"], "profile": row["profile"], "version": row["version"], "parent": row["parent_version"],
        "delta": row["parent_version"] is not None, "size": row["size"], "sha256": row["sha256"],
        "uploaded_at": row["uploaded"], "uploaded_by": row["uploaded_by"], "key_id": row["key_id"],
        "signature_checked": bool(row["signature_checked"]),
    }  # fmt: skip


async def keep_image(files: ImageFiles, store: RolloutStore, checked: Checked, actor: str) -> tuple[
    dict[str, Any], dict[str, Any] | None
]:  # fmt: skip
    """Keep a checked bundle and its row; returns the image and the logged event (None when the same
    bundle was there already). The file takes its place first, so no row ever names a missing file."""
    manifest = checked.manifest
    row = {
        "id": checked.id, "sha256": checked.sha256, "size": checked.size, "profile": manifest.profile,
        "version": manifest.version, "parent_version": None if manifest.parent is None else manifest.parent.version,
        "key_id": checked.key_id, "signature_checked": checked.signature_checked, "uploaded": time.time(),
        "uploaded_by": actor, "manifest": checked.manifest_json,
    }  # fmt: skip
    files.keep(checked)
    try:
        stored, logged = await store.add_image(row)
    except BaseException:
        files.remove(checked.sha256)  # no row has this content (the same content returns, not raises)
        raise
    return image_view(stored), logged


def plan_waves(names: list[str], canary: int, wave_percent: int) -> list[list[str]]:
    """The canary wave, then waves of `wave_percent` of the hosts after it."""
    first, rest = names[:canary], names[canary:]
    size = max(1, math.ceil(len(rest) * wave_percent / 100))
    return ([first] if first else []) + [rest[start : start + size] for start in range(0, len(rest), size)]


class Rollouts:
    def __init__(self, fleet: FleetFace, store: RolloutStore, files: ImageFiles) -> None:
        self.fleet = fleet
        self.store = store
        self.files = files
        self.images: dict[str, dict[str, Any]] = {}
        self.rollouts: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        self._images_read = 0.0
        self._dirty: dict[str, dict[str, Any]] = {}  # rollouts changed, published once per operation
        self._in_flight: Counter[str] = Counter()  # per host, its updates under way: whose facts matter

    async def load(self) -> None:
        for row in await self.store.images():
            self.images[row["id"]] = image_view(row)
        self._images_read = time.monotonic()
        for rollout in await self.store.rollouts(KEPT_ROLLOUTS):
            rollout["hosts"].sort(key=_order)
            self.rollouts[rollout["id"]] = rollout
            self._in_flight.update(host["host"] for host in rollout["hosts"] if host["state"] in IN_FLIGHT)

    def apply(self, change: dict[str, Any]) -> None:
        """A change another hub process published (hub/bus.py)."""
        kind = change["kind"]
        if kind == "image":
            self.images[change["image"]["id"]] = change["image"]
        elif kind == "image_removed":
            self.images.pop(change["id"], None)
        elif kind == "rollout":
            self.rollouts[change["rollout"]["id"]] = change["rollout"]
        elif kind == "rollout_removed":
            self.rollouts.pop(change["id"], None)
        self._in_flight = Counter(host["host"] for rollout in self.rollouts.values() for host in rollout["hosts"]
                                  if host["state"] in IN_FLIGHT)  # fmt: skip

    # Images

    async def add_image(self, checked: Checked, admin: str) -> tuple[dict[str, Any], bool]:
        """Keep an uploaded bundle; returns the image and whether it is new."""
        image, logged = await keep_image(self.files, self.store, checked, admin)
        if logged is not None:
            self.fleet.publish_event(logged)
        self._show_image(image)
        return image, logged is not None

    async def remove_image(self, image_id: str, admin: str) -> None:
        sha256, logged = await self.store.remove_image(image_id, admin)
        self.files.remove(sha256)  # only once the row is gone: RolloutStore.remove_image says why
        if self.images.pop(image_id, None) is not None:
            self.fleet.publish({"kind": "image_removed", "id": image_id})
        self.fleet.publish_event(logged)

    async def refresh_images(self) -> None:
        """Catch up with images added or removed by `rastos-hub image` beside the running hub."""
        rows = {row["id"]: image_view(row) for row in await self.store.images()}
        self._images_read = time.monotonic()
        for gone in set(self.images) - set(rows):
            del self.images[gone]
            self.fleet.publish({"kind": "image_removed", "id": gone})
        for image in rows.values():
            self._show_image(image)

    def _show_image(self, image: dict[str, Any]) -> None:
        if self.images.get(image["id"]) != image:
            self.images[image["id"]] = image
            self.fleet.publish({"kind": "image", "image": image})

    # Starting and steering

    async def start(self, admin: str, body: dict[str, Any]) -> dict[str, Any]:
        row = await self.store.image(body["image"])
        if row is None:
            raise NotFound(f"image: no image {body['image']!r}")
        image = image_view(row)
        names = self.fleet.resolve(body["target"])
        self._refuse_busy(names)
        version = image["version"]
        skipped = [name for name in names if self._running_version(name) == version]
        todo = [name for name in names if name not in skipped]
        if image["delta"]:
            self._refuse_wrong_parent(todo, image)
        waves = plan_waves(todo, int(body.get("canary", 1)), int(body.get("wave_percent", 25)))
        rollout: dict[str, Any] = {
            "id": secrets.token_hex(16), "created": time.time(), "admin": admin, "image": image["id"],
            "profile": image["profile"], "version": version, "target": body["target"],
            "canary": int(body.get("canary", 1)), "wave_percent": int(body.get("wave_percent", 25)),
            "health_timeout_s": int(body.get("health_timeout_s", 900)), "state": "running", "reason": None,
            "wave": 0, "waves": len(waves), "finished": None, "history": [_change("running", admin)],
        }  # fmt: skip
        hosts = [_new_host(name, 0, "skipped", f"runs {version} already") for name in skipped]
        hosts += [_new_host(name, number, "pending") for number, wave in enumerate(waves, 1) for name in wave]
        hosts.sort(key=_order)
        logged = await self.store.add_rollout(rollout, hosts)
        rollout["hosts"] = hosts
        self.rollouts[rollout["id"]] = rollout
        self._forget_old()
        self.fleet.publish_event(logged)
        self._dirty[rollout["id"]] = rollout
        await self._advance(rollout)
        self._flush()
        return rollout

    def _refuse_busy(self, names: list[str]) -> None:
        wanted = set(names)
        for rollout in self.rollouts.values():
            if rollout["state"] not in ACTIVE:
                continue
            for host in rollout["hosts"]:
                if host["host"] in wanted:
                    raise Conflict(
                        f"target: host {host['host']} is in rollout {rollout['id']}, which is {rollout['state']}; "
                        "abort it or let it finish first"
                    )

    def _refuse_wrong_parent(self, names: list[str], image: dict[str, Any]) -> None:
        """A delta applies to its parent version only: a host known to run another would fail it."""
        for name in names:
            running = self._running_version(name)
            if running and running != image["parent"]:
                raise Unprocessable(
                    f"target: host {name} runs {running}, and image {image['id']} is a delta from "
                    f"{image['parent']} only; roll out a full image of {image['version']} to it"
                )

    def get(self, rollout_id: str) -> dict[str, Any]:
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise NotFound(f"id: no rollout {rollout_id[:100]!r}")
        return rollout

    async def pause(self, rollout_id: str, admin: str) -> dict[str, Any]:
        rollout = self.get(rollout_id)
        if rollout["state"] != "running":
            raise Conflict(f"state: rollout {rollout_id} is {rollout['state']}; only a running one can be paused")
        await self._set_rollout(rollout, {"state": "paused"}, (admin, "RolloutPaused"))
        self._flush()
        return rollout

    async def resume(self, rollout_id: str, admin: str) -> dict[str, Any]:
        rollout = self.get(rollout_id)
        if rollout["state"] not in ("paused", "halted"):
            raise Conflict(f"state: rollout {rollout_id} is {rollout['state']}; only a paused or halted one resumes")
        await self._set_rollout(rollout, {"state": "running", "reason": None}, (admin, "RolloutResumed"))
        await self._advance(rollout)
        self._flush()
        return rollout

    async def abort(self, rollout_id: str, admin: str) -> dict[str, Any]:
        rollout = self.get(rollout_id)
        if rollout["state"] not in ACTIVE:
            raise Conflict(f"state: rollout {rollout_id} is {rollout['state']} already")
        for host in rollout["hosts"]:
            if host["state"] == "pending":
                await self._set_host(rollout, host, {"state": "cancelled", "finished": time.time()})
        await self._set_rollout(rollout, {"state": "aborted", "finished": time.time()}, (admin, "RolloutAborted"))
        self._flush()
        return rollout

    # What agents say and do

    async def agent_ready(self, link: Link) -> None:
        """After its welcome: an update sent that the agent has not reported on goes again (the agent
        answers a repeat with its state), then its wave's pending update if it has one. The first holds
        while the rollout is paused or halted too: the frame may have been lost with a dying link, and
        an update under way goes on."""
        for rollout in list(self.rollouts.values()):
            if rollout["state"] not in ACTIVE:
                continue
            for host in rollout["hosts"]:
                if host["host"] == link.host and host["state"] in ("sent", "staging"):
                    await _send_quietly(link, self._frame(rollout, host))
            await self._advance(rollout)
        self._flush()

    def watching(self, name: str) -> bool:
        """Whether the host's facts matter to a rollout now (an update under way there): asked for
        every facts report, so it is a look-up, not a search."""
        return self._in_flight[name] > 0

    async def facts(self, name: str) -> None:
        """The host's new facts: done if it runs the version and is healthy, failed if it fell back."""
        link = self.fleet.agents.get(name)
        boot = _boot_state(self.fleet.hosts.get(name))
        for rollout in list(self.rollouts.values()):
            for host in rollout["hosts"]:
                if host["host"] != name or host["state"] not in IN_FLIGHT:
                    continue
                rebooted = link is not None and host["sent"] is not None and link.connected > host["sent"]
                await self._judge(rollout, host, boot, rebooted)
        self._flush()

    async def _judge(self, rollout: dict[str, Any], host: dict[str, Any], boot: dict[str, Any], rebooted: bool) -> None:
        """`rebooted`: the facts came over a connection made after the update was sent. Only then can a
        fallback be this update's: the boot it was sent to may be a fallback itself, from an earlier one."""
        failed_entry = str(boot.get("failed_entry") or "")
        fell_back = boot.get("kind") == "fallback" and (
            host["state"] == "staged" or failed_entry != host["fallback_before"]
        )
        if rebooted and fell_back:
            what = failed_entry or "its entry used up its tries"
            running = boot.get("image_version") or "the deployment before"
            await self._fail(
                rollout, host, f"fell back: the new deployment did not boot ({what}); {running} runs again"
            )
        elif boot.get("image_version") == rollout["version"] and boot.get("health") == "good":
            await self._set_host(rollout, host, {"state": "done", "finished": time.time()})
            self.fleet.note_change(host["host"], host_change(rollout, host))
            await self._advance(rollout)

    async def update_status(self, name: str, status: UpdateStatus) -> None:
        found = self._find(status.update)
        if found is None or found[1]["host"] != name:
            log.warning("%s reported update %s, which is not one of its own", name, status.update)
            return
        rollout, host = found
        if host["state"] not in IN_FLIGHT:
            return  # not sent, or ended already: the first final word stands
        if status.version != rollout["version"]:
            log.warning("%s reported update %s for version %s, not %s", name, status.update, status.version,
                        rollout["version"])  # fmt: skip
            return
        if status.state in ("failed", "cancelled"):
            await self._fail(rollout, host, f"staging {status.state}: {status.detail or 'the agent gave no detail'}")
        elif status.state == "staged" or (status.state == "staging" and host["state"] == "sent"):
            await self._set_host(rollout, host, {"state": status.state, "detail": status.detail})
        self._flush()

    async def host_removed(self, name: str) -> None:
        """The host left the hub (its rows went with it): no wave waits for it."""
        self._in_flight.pop(name, None)
        for rollout in list(self.rollouts.values()):
            kept = [host for host in rollout["hosts"] if host["host"] != name]
            if len(kept) != len(rollout["hosts"]):
                rollout["hosts"] = kept
                self._dirty[rollout["id"]] = rollout
                await self._advance(rollout)
        self._flush()

    async def tick(self) -> None:
        """Every second or so: updates past their health timeout fail; the image list is read again."""
        now = time.time()
        for rollout in list(self.rollouts.values()):
            for host in rollout["hosts"]:
                if host["state"] not in IN_FLIGHT or host["sent"] is None:
                    continue
                deadline = host["sent"] + rollout["health_timeout_s"]
                if host["sent"] < self.started:
                    deadline = max(deadline, self.started + RECONNECT_GRACE)
                if now > deadline:
                    why = f"not back healthy on {rollout['version']} within {rollout['health_timeout_s']} s"
                    await self._fail(rollout, host, f"{why} of the update (last: {host['state']})")
        self._flush()
        if time.monotonic() - self._images_read > IMAGE_REFRESH:
            await self.refresh_images()

    # The engine

    async def _advance(self, rollout: dict[str, Any]) -> None:
        """Send the current wave's updates to the hosts online; start the next wave when this one is
        done; end the rollout after the last."""
        while rollout["state"] == "running":
            current = [host for host in rollout["hosts"] if host["wave"] == rollout["wave"]]
            for host in current:
                if host["state"] == "pending":
                    await self._offer(rollout, host)
            if any(host["state"] not in HOST_FINAL for host in current):
                return
            if rollout["wave"] >= rollout["waves"]:
                await self._set_rollout(rollout, {"state": "complete", "finished": time.time()},
                                        ("hub", "RolloutFinished"))  # fmt: skip
                return
            wave = rollout["wave"] + 1
            names = [host["host"] for host in rollout["hosts"] if host["wave"] == wave]
            await self._set_rollout(rollout, {"wave": wave}, ("hub", "RolloutWave"), {"wave": wave, "hosts": names})

    async def _offer(self, rollout: dict[str, Any], host: dict[str, Any]) -> None:
        name = host["host"]
        running = self._running_version(name)
        if running == rollout["version"]:  # updated meanwhile, by another way
            await self._set_host(rollout, host, {"state": "skipped", "finished": time.time(),
                                                 "detail": f"runs {running} already"})  # fmt: skip
            return
        link = self.fleet.agents.get(name)
        if link is None:
            return  # offline: it gets the update right after its next welcome
        boot = _boot_state(self.fleet.hosts.get(name))
        before = str(boot.get("failed_entry") or "") if boot.get("kind") == "fallback" else ""
        # Recorded as sent before it is sent: the agent stages an update id once however often it comes.
        values = {"state": "sent", "sent": time.time(), "from_version": running or None, "fallback_before": before}
        detail = {"rollout": rollout["id"], "update": host["update_id"], "version": rollout["version"]}
        await self._set_host(rollout, host, values, ("hub", "UpdateSent", detail, name))
        await _send_quietly(link, self._frame(rollout, host))

    async def _fail(self, rollout: dict[str, Any], host: dict[str, Any], why: str) -> None:
        detail = {"rollout": rollout["id"], "update": host["update_id"], "reason": why[:MAX_DETAIL]}
        await self._set_host(rollout, host, {"state": "failed", "finished": time.time(), "detail": why[:MAX_DETAIL]},
                             ("hub", "UpdateFailed", detail, host["host"]))  # fmt: skip
        if rollout["state"] in ("running", "paused"):
            reason = f"{host['host']}: {why}"[:MAX_REASON]
            await self._set_rollout(rollout, {"state": "halted", "reason": reason}, ("hub", "RolloutHalted"),
                                    {"reason": reason})  # fmt: skip

    def _frame(self, rollout: dict[str, Any], host: dict[str, Any]) -> dict[str, Any]:
        url = f"/api/v1/images/{rollout['image']}/bundle"
        return {"type": "update", "update": {"id": host["update_id"], "url": url, "version": rollout["version"],
                                             "reboot": True}}  # fmt: skip

    async def _set_rollout(
        self, rollout: dict[str, Any], values: dict[str, Any], logged: tuple[str, str],
        detail: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        actor, method = logged
        if "state" in values and values["state"] != rollout["state"]:
            # Kept apart from `reason`, which a resume clears: why it halted, and who steered it, stay.
            change = _change(values["state"], actor, values.get("reason"))
            values = {**values, "history": [*rollout["history"], change][-MAX_HISTORY:]}
        event = (actor, method, {"rollout": rollout["id"], **(detail or {})}, None)
        stored = await self.store.update_rollout(rollout["id"], values, event)
        rollout.update(values)
        self._dirty[rollout["id"]] = rollout
        if stored is not None:
            self.fleet.publish_event(stored)

    async def _set_host(
        self, rollout: dict[str, Any], host: dict[str, Any], values: dict[str, Any],
        logged: tuple[str, str, dict[str, Any], str | None] | None = None,
    ) -> None:  # fmt: skip
        stored = await self.store.update_host(rollout["id"], host["host"], values, logged)
        was = host["state"] in IN_FLIGHT
        host.update(values)
        if was != (host["state"] in IN_FLIGHT):
            self._in_flight[host["host"]] += -1 if was else 1
        self._dirty[rollout["id"]] = rollout
        if stored is not None:
            self.fleet.publish_event(stored)

    def _flush(self) -> None:
        """Publish each rollout changed by this operation once, however many of its hosts changed."""
        dirty, self._dirty = self._dirty, {}
        for rollout_id, rollout in dirty.items():
            if rollout_id in self.rollouts:
                self.fleet.publish({"kind": "rollout", "rollout": rollout})

    def _find(self, update_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for rollout in self.rollouts.values():
            for host in rollout["hosts"]:
                if host["update_id"] == update_id:
                    return rollout, host
        return None

    def _running_version(self, name: str) -> str:
        return str(_boot_state(self.fleet.hosts.get(name)).get("image_version") or "")

    def _forget_old(self) -> None:
        finished = [key for key, rollout in self.rollouts.items() if rollout["state"] not in ACTIVE]
        for key in finished[: max(0, len(self.rollouts) - KEPT_ROLLOUTS)]:
            if any(host["state"] in IN_FLIGHT for host in self.rollouts[key]["hosts"]):
                continue  # still following an update under way
            del self.rollouts[key]
            self.fleet.publish({"kind": "rollout_removed", "id": key})


def _new_host(name: str, wave: int, state: str, detail: str | None = None) -> dict[str, Any]:
    return {"host": name, "wave": wave, "state": state, "update_id": secrets.token_hex(16), "sent": None,
            "finished": time.time() if state in HOST_FINAL else None, "detail": detail, "from_version": None,
            "fallback_before": ""}  # fmt: skip


def _change(state: str, by: str, reason: str | None = None) -> dict[str, Any]:
    """An entry of a rollout's history: the state it went to, when, by whom (an admin, or the hub), and
    for a halt why."""
    return {"time": time.time(), "state": state, "by": by, "reason": reason}


def _order(host: dict[str, Any]) -> tuple[int, str]:
    return host["wave"], host["host"]


def _boot_state(host: dict[str, Any] | None) -> dict[str, Any]:
    facts = (host or {}).get("facts") or {}
    boot = facts.get("boot_state") if isinstance(facts, dict) else None
    return boot if isinstance(boot, dict) else {}


async def _send_quietly(link: Link, message: dict[str, Any]) -> None:
    """A send to an agent that has just gone is not an error: its next welcome sends again."""
    try:
        await link.send(message)
    except (ConnectionError, RuntimeError) as error:
        log.info("could not send %s to %s: %s", message["type"], link.host, error)
