"""The hub's live view of the fleet, the source of every UI's state, and the dispatcher.

One `Fleet` holds what the UIs show (hosts, runs with their commands, the newest events), changes
it only through its methods, persists each change before it is published, and publishes each
change as a versioned delta to every subscribed UI. Its methods run under one lock: dispatch
decisions (how many commands are in flight) are never made on a stale count.

Runs: a run sends the same steps to each of its hosts as one daemon pipeline, so `&&` holds per host
(the daemon stops a host's pipeline at its first failed step) while the other hosts go on. At most
`parallelism` commands of a run are in flight at once. A command's id is its idempotency key: the
agent runs a command id once however often it is sent, which is what makes a hub restart safe.

Host actions (a snapshot taken, a rollback or a one-shot boot prepared on one host): sent only to an
agent online, at once and once, never queued; the request is in the event log (HostActionRequested,
naming the admin) before it is sent, and its outcome comes back twice, live (action_status) and
through the agent's event log (HubAction), whichever is first; a host's recent actions are rebuilt
from the log when the hub starts.

Step output (agents' `output` frames) is not state: it is kept apart, in memory and bounded
(hub/live_output.py), and goes only to the followers of its run, never into the UIs' deltas.

Image rollouts (hub/rollouts.py) run under the same lock: the fleet passes on what concerns them (an
agent's welcome, its facts while an update is under way there, its update_status, the clock).

Several hub processes on one PostgreSQL database (hub/bus.py): the lock is then theirs together, and
each one, taking it, first applies what the others changed; what it changes goes to the others when it
lets go. `agents` holds every agent connected to any of them: one connected to another hub is a
RemoteLink, whose frames go over the bus to that hub, which sends them on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, overload

from hub.bus import Bus
from hub.errors import Conflict, NotFound
from hub.images import ImageFiles
from hub.live_output import OUTPUT_LINGER, LiveOutput
from hub.protocol import (
    ActionStatus,
    AgentEvent,
    CommandStatus,
    ComplianceReport,
    OutputLines,
    ProtocolError,
    UpdateStatus,
    action_frame,
    command_frame,
)
from hub.rollout_store import RolloutStore
from hub.rollouts import Rollouts, host_change
from hub.store import FINAL_COMMAND_STATES, Store

log = logging.getLogger("rastos-hub.fleet")

IN_FLIGHT = frozenset({"sent", "queued", "running"})
KEPT_EVENTS = 100  # the event log a UI gets with init; older ones through the REST API, a page at a time
KEPT_RUNS = 50
KEPT_JOBS = 20  # per host
KEPT_ACTIONS = 10  # per host
KEPT_BOOTS = 20  # per host: its boot history, newest last
BOOT_TEXT = 255  # characters kept of each field of a boot the agent reported (a root, an entry, a version)
BOOT_METHODS = ("Booted", "MarkGood", "BootFallback")  # the events a host's boot history is made of
CHANGING_ACTIONS = frozenset({"rollback", "boot_once"})  # a snapshot taken changes nothing that runs
DRY_RUN = 1  # a run's flags: dry-run 1 (hub/api.py)
ACTION_FINAL = frozenset({"done", "failed"})  # and "lost": the connection ended before an answer came
ROLLBACK_METHODS = frozenset({"Rollback", "BootFallback"})
SUBSCRIBER_QUEUE = 1000  # deltas a slow UI may lag behind before it is sent a fresh init instead
INIT_NEEDED: dict[str, Any] = {"type": "init_needed"}  # queued for a UI that must get the whole state
PRUNE_ODDS = 60  # ticks (about a second each) between prunings of the bus, on average, per hub

Send = Callable[[dict[str, Any]], Awaitable[None]]


class AgentLink:
    """A connected agent: how to send it a message, and how to drop it."""

    def __init__(self, host: str, send: Send, close: Callable[[], Awaitable[Any]]) -> None:
        self.host = host
        self.send = send
        self.close = close
        self.connected = time.time()  # a rollout takes only facts of a connection newer than its update


class RemoteLink:
    """An agent connected to another hub process: what is sent to it goes over the bus to that hub."""

    def __init__(self, fleet: Fleet, host: str, hub: str, connected: float) -> None:
        self.host = host
        self.hub = hub
        self.connected = connected
        self._fleet = fleet

    async def send(self, message: dict[str, Any]) -> None:
        self._fleet.share({"kind": "send", "hub": self.hub, "host": self.host, "message": message})

    async def close(self) -> None:
        self._fleet.share({"kind": "close", "hub": self.hub, "host": self.host})


class FleetLock:
    """The fleet's lock: an asyncio lock, and with a bus, the hubs' shared one too. Taken, the fleet has
    applied what the other hubs changed; let go, what this hub changed has gone to them."""

    def __init__(self, fleet: Fleet) -> None:
        self.local = asyncio.Lock()
        self.held = False  # the shared lock, by this process
        self._fleet = fleet

    def locked(self) -> bool:
        return self.local.locked()

    async def __aenter__(self) -> None:
        await self.local.acquire()
        bus = self._fleet.bus
        if bus is None:
            return
        try:
            await bus.lock()
        except BaseException:
            self.local.release()
            raise
        self.held = True
        try:
            await self._fleet.catch_up()
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        try:
            if self.held:
                self.held = False
                assert self._fleet.bus is not None
                try:
                    await self._fleet.flush()
                finally:
                    await self._fleet.bus.unlock()
        finally:
            self.local.release()


class Fleet:
    def __init__(self, store: Store, images: ImageFiles, bus: Bus | None = None) -> None:
        self.store = store
        self.bus = bus
        self.seen = 0  # the newest bus row applied
        self._outbox: list[dict[str, Any]] = []  # for the other hubs, written when the lock is let go
        self.epoch = secrets.token_hex(8)  # a restarted hub starts a new epoch: UIs take a fresh init
        self.version = 0
        self.hosts: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)
        self.agents: dict[str, AgentLink | RemoteLink] = {}
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        # Dispatch and membership; agents' reports do not take it, but for their publishing on a bus.
        self.lock = FleetLock(self)
        # The newest event of each host stored: kept here so a report needs no read before its write.
        self.cursors: dict[str, int] = {}
        self._report_locks: dict[str, asyncio.Lock] = {}  # one host's reports in order, even over two links
        self._closing: set[asyncio.Future[Any]] = set()
        self._sharing: asyncio.Future[None] | None = None  # the turn of the lock that will share the outbox
        self.rollouts = Rollouts(self, RolloutStore(store), images)
        self.live = LiveOutput()
        self._output_commands: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # in flight, with output

    async def load(self) -> None:
        if self.bus is None:
            await self._load()
            return
        await self.bus.lock()  # no hub changes anything while this one reads the fleet
        try:
            await self._load()
            # Which agents are connected to which hub is in the hubs' memory only: they say again.
            await self.bus.write([{"kind": "hello"}])
            self.seen = await self.bus.last()
        finally:
            await self.bus.unlock()

    async def _load(self) -> None:
        reports = await self.store.compliance_reports()
        rows = await self.store.hosts()
        names = [row["name"] for row in rows]
        # The boot history reaches further back than the newest events: each event once, in order.
        boots = await self.store.host_events_of_each(names, BOOT_METHODS, 3 * KEPT_BOOTS)
        recent = await self.store.newest_events_per_host(names, KEPT_EVENTS)
        finished = await self.store.finished_commands(names, KEPT_JOBS)
        for row in rows:
            name = row["name"]
            self.cursors[name] = row["last_event"]
            host = self._host_view(row)
            host["compliance"] = _compliance_view(reports.get(name))
            both = {item["id"]: item for item in [*boots[name], *recent[name]]}
            for item in sorted(both.values(), key=lambda e: e["id"]):
                _note_host_event(host, item)
            _lose_actions(host)  # sent by a hub before this one, over a connection gone with it
            for command in finished[name]:
                _note_change(host, _run_change(command, command["run"]))
            host["health"], host["boot_status"] = _health(host), _boot_status(host)
            self.hosts[row["name"]] = host
        run_rows = await self.store.runs(KEPT_RUNS)
        commands = await self.store.commands([run["id"] for run in run_rows])
        for run in run_rows:
            self.runs[run["id"]] = {**run, "commands": [c for c in commands if c["run_id"] == run["id"]]}
        self.events.extend(await self.store.events(KEPT_EVENTS))
        await self.rollouts.load()
        for rollout in self.rollouts.rollouts.values():  # the active ones and the newest 50 finished
            for item in rollout["hosts"]:
                if item["state"] == "done" and item["host"] in self.hosts:
                    _note_change(self.hosts[item["host"]], host_change(rollout, item))

    # What UIs see

    def state(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "runs": self.runs, "events": list(self.events),
                "images": self.rollouts.images, "rollouts": self.rollouts.rollouts}  # fmt: skip

    def init_message(self) -> dict[str, Any]:
        return {"type": "init", "epoch": self.epoch, "version": self.version, "state": self.state()}

    def sync_message(self) -> dict[str, Any]:
        return {"type": "sync", "epoch": self.epoch, "version": self.version}

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)

    def publish(self, change: dict[str, Any]) -> None:
        self._publish_here(change)
        if self.bus is not None:
            self.share({"kind": "change", "change": change})

    def _publish_here(self, change: dict[str, Any]) -> None:
        self.version += 1
        message = {"type": "delta", "epoch": self.epoch, "version": self.version, "change": change}
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                # Too far behind to catch up by deltas: drop them and let it start over from an init.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(INIT_NEEDED)

    def beacon(self) -> None:
        """The `sync` beacon, through the same queues as the deltas: a UI that gets it has had every
        delta up to its version, so a lower version of its own means it missed one."""
        message = self.sync_message()
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(message)

    def _publish_host(self, name: str) -> None:
        """Every change of a host goes out through here, so its derived health is refreshed here."""
        host = self.hosts[name]
        host["health"] = _health(host)
        host["boot_status"] = _boot_status(host)
        self.publish({"kind": "host", "host": host})

    def _publish_run(self, run: dict[str, Any]) -> None:
        self.publish({"kind": "run", "run": run})

    def publish_event(self, item: dict[str, Any]) -> None:
        self.events.append(item)
        self.publish({"kind": "event", "event": item})

    def _host_view(self, row: dict[str, Any]) -> dict[str, Any]:
        view = {"name": row["name"], "groups": row["groups"], "online": row["name"] in self.agents,
                "last_seen": row["last_seen"], "facts": row["facts"], "last_rollback": None, "jobs": [],
                "actions": [], "compliance": None, "boots": [], "last_change": None}  # fmt: skip
        view["health"], view["boot_status"] = _health(view), _boot_status(view)
        return view

    # The other hub processes on the database (hub/bus.py)

    def share(self, body: dict[str, Any]) -> None:
        """Tell the other hubs, when the lock is let go: at once if this hub does not hold it. One turn
        of the lock at a time carries all that was shared meanwhile (step output comes as often as
        four frames a second from each agent)."""
        self._outbox.append(body)
        if not self.lock.held and (self._sharing is None or self._sharing.done()):
            self._sharing = asyncio.ensure_future(self._share_soon())
            self._closing.add(self._sharing)
            self._sharing.add_done_callback(self._closing.discard)

    async def _share_soon(self) -> None:
        try:
            while self._outbox:  # what came while the lock was let go goes at the next turn
                async with self.lock:
                    pass
        except Exception:  # the database away: the next lock taken writes them
            log.exception("could not take the hubs' lock to tell the others of a change")

    async def flush(self) -> None:
        """Write what this hub changed for the others (called with the shared lock held)."""
        if not self._outbox or self.bus is None:
            return
        bodies, self._outbox = self._outbox, []
        try:
            await self.bus.write(bodies)
        except Exception:
            self._outbox[:0] = bodies
            log.exception("could not tell the other hubs of %d changes: the next lock taken tries again", len(bodies))
            return
        self.seen = await self.bus.last()  # this hub's own rows are not read again

    async def catch_up(self) -> None:
        """Apply what the other hubs changed since this one last looked."""
        assert self.bus is not None
        for row_id, origin, body in await self.bus.read(self.seen):
            self.seen = row_id
            if origin != self.bus.id:
                await self._apply(body)

    async def follow(self) -> None:
        """Woken by the others' NOTIFYs: their changes reach this hub's UIs and agents at once, not at
        its next turn of the lock."""
        assert self.bus is not None
        while True:
            await self.bus.woken.wait()
            self.bus.woken.clear()
            try:
                async with self.lock.local:
                    await self.catch_up()
            except Exception:  # the database away, say: the next wake or tick reads again
                log.exception("could not read the other hubs' changes")
                await asyncio.sleep(1)

    async def _apply(self, body: dict[str, Any]) -> None:
        kind, host = body["kind"], body.get("host", "")
        if kind == "change":
            self._apply_change(body["change"])
            self._publish_here(body["change"])
        elif kind == "link":
            self._apply_link(host, body["hub"], body.get("connected", 0.0))
        elif kind == "output":  # kept as this hub keeps its own agents' lines, bounded the same way
            run = body["run"]
            if self.live.add(run, host, body["command"], body["step"], body["first"], body["lines"], body["sent"]):
                self.live.wake(run)
        elif kind == "hello":  # a hub started: it learns this one's agents, and their hosts as shown here
            for name, local in self.agents.items():
                if isinstance(local, AgentLink) and name in self.hosts:
                    self.share({"kind": "link", "host": name, "hub": self.bus_id, "connected": local.connected})
                    self._publish_host(name)
        elif body["hub"] == self.bus_id and isinstance(link := self.agents.get(host), AgentLink):
            if kind == "send":
                await _send_quietly(link, body["message"])
            elif kind == "close":
                self._close_later(link)

    def _apply_change(self, change: dict[str, Any]) -> None:
        kind = change["kind"]
        if kind == "host":
            self.hosts[change["host"]["name"]] = change["host"]
            self.cursors.setdefault(change["host"]["name"], 0)
        elif kind == "host_removed":
            self.hosts.pop(change["name"], None)
            self.cursors.pop(change["name"], None)
            if (link := self.agents.pop(change["name"], None)) is not None and isinstance(link, AgentLink):
                self._close_later(link)
        elif kind == "run":
            run = change["run"]
            if run["state"] != "running" and self.runs.get(run["id"], {}).get("state") == "running":
                # Ended on another hub: its lines here go as that hub's go, once followers had them.
                asyncio.get_running_loop().call_later(OUTPUT_LINGER, self.live.forget, run["id"])
            self.runs[run["id"]] = run
        elif kind == "run_removed":
            self.runs.pop(change["id"], None)
        elif kind == "event":
            self.events.append(change["event"])
        else:
            self.rollouts.apply(change)

    def _apply_link(self, host: str, hub: str | None, connected: float) -> None:
        old = self.agents.get(host)
        if hub is None:
            if isinstance(old, RemoteLink):
                del self.agents[host]
            return
        self.agents[host] = RemoteLink(self, host, hub, connected)
        if isinstance(old, AgentLink):  # it connected to another hub: this one's link is stale
            self._close_later(old)

    @property
    def bus_id(self) -> str:
        return "" if self.bus is None else self.bus.id

    def _shared(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """The lock, for what only needs it when the fleet's state is shared by several hubs."""
        return self.lock if self.bus is not None else contextlib.nullcontext()

    async def _sweep(self) -> None:
        """Agents of a hub process that died (its bus session gone) are offline until they connect again."""
        assert self.bus is not None
        hubs = {link.hub for link in self.agents.values() if isinstance(link, RemoteLink)}
        if not hubs or not (dead := hubs - await self.bus.alive()):
            return
        for name, link in list(self.agents.items()):
            if isinstance(link, RemoteLink) and link.hub in dead:
                log.info("%s was connected to a hub that is gone", name)
                del self.agents[name]
                self.share({"kind": "link", "host": name, "hub": None})
                if (host := self.hosts.get(name)) is not None:
                    host["online"] = False
                    _lose_actions(host)
                    self._publish_host(name)

    # Hosts

    async def add_host(self, name: str, groups: list[str], admin: str) -> str:
        async with self.lock:
            token, logged = await self.store.add_host(name, groups, admin)
            row = await self.store.host(name)
            assert row is not None
            self.cursors[name] = 0
            self.hosts[name] = self._host_view(row)
            self._publish_host(name)
            self.publish_event(logged)
        return token

    async def remove_host(self, name: str, admin: str) -> None:
        async with self.lock:
            logged = await self.store.remove_host(name, admin)
            self.hosts.pop(name, None)
            self.cursors.pop(name, None)
            if (link := self.agents.pop(name, None)) is not None:
                self._close_later(link)
            self.publish({"kind": "host_removed", "name": name})
            self.publish_event(logged)
            # Its commands went with it (the store deletes them): the runs that had them must not
            # wait for them, and a run left with none was, in effect, cancelled.
            for run in list(self.runs.values()):
                kept = [command for command in run["commands"] if command["host"] != name]
                if len(kept) == len(run["commands"]):
                    continue
                for command in run["commands"]:
                    if command["host"] == name:
                        self._output_commands.pop(command["id"], None)
                run["commands"] = kept
                if not kept and run["state"] == "running":
                    run["cancel_requested"] = True
                await self._maybe_finish(run)
                await self._pump(run)  # its slot may be free now
                self._publish_run(run)
            await self.rollouts.host_removed(name)

    def _close_later(self, link: AgentLink | RemoteLink) -> None:
        """Close a link without waiting under the lock for its peer to answer the close (a stale
        peer would hold every dispatch up for the close's whole timeout)."""
        task = asyncio.ensure_future(link.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def agent_connected(self, link: AgentLink) -> dict[str, Any]:
        """Register the agent and return its welcome: its event cursor and its in-flight commands."""
        async with self.lock:
            old = self.agents.get(link.host)
            self.agents[link.host] = link
            if old is not None:  # the same host connected again (a stale connection): keep the new one
                self._close_later(old)
            if link.host not in self.hosts or self.bus is not None:
                # Added by `rastos-hub host add` while the hub ran; or its events went to another hub.
                row = await self.store.host(link.host)
                assert row is not None
                self.cursors[link.host] = row["last_event"]
                self.hosts.setdefault(link.host, self._host_view(row))
            if self.bus is not None:
                self.share({"kind": "link", "host": link.host, "hub": self.bus.id, "connected": link.connected})
            host = self.hosts[link.host]
            host["online"] = True
            host["last_seen"] = time.time()
            self._publish_host(link.host)
            in_flight = [self._command_message(c) for c in self._commands_of(link.host) if c["state"] in IN_FLIGHT]
            return {"type": "welcome", "host": link.host, "last_event": self.cursors[link.host],
                    "commands": in_flight}  # fmt: skip

    async def agent_ready(self, link: AgentLink) -> None:
        """After the welcome is out: pending commands may now go to the agent, and in-flight ones of
        runs cancelled while it was away are cancelled there too."""
        async with self.lock:
            for run in self.runs.values():
                if not run.get("cancel_requested"):
                    continue
                for command in run["commands"]:
                    if command["host"] == link.host and command["state"] in IN_FLIGHT:
                        await _send_quietly(link, {"type": "cancel", "command": command["id"]})
            await self._pump_all()
            await self.rollouts.agent_ready(link)

    async def agent_disconnected(self, link: AgentLink) -> None:
        async with self.lock:
            if self.agents.get(link.host) is not link:
                return  # replaced by a newer connection already
            del self.agents[link.host]
            if self.bus is not None:
                self.share({"kind": "link", "host": link.host, "hub": None})
            if (host := self.hosts.get(link.host)) is not None:
                host["online"] = False
                _lose_actions(host)
                self._publish_host(link.host)

    async def facts(self, name: str, facts: dict[str, Any]) -> None:
        """Facts are the agent's state now, sent again on every connect: shown at once, stored with
        the next group commit, and not waited for."""
        async with self._shared():
            host = self.hosts[name]
            host["facts"] = facts
            host["last_seen"] = time.time()
            self._publish_host(name)
        self.store.save_facts(name, facts)
        if self.rollouts.watching(name):  # an update under way there: its facts may end it
            async with self.lock:
                await self.rollouts.facts(name)

    async def agent_events(self, name: str, batch: list[AgentEvent]) -> int:
        """Store the new ones, then publish them; returns the host's cursor for the acknowledgement."""
        lock = self._report_locks.setdefault(name, asyncio.Lock())
        async with lock:
            fresh = [item.as_json() for item in batch if item.id > self.cursors[name]]
            if not fresh:
                return self.cursors[name]
            stored = await self.store.add_agent_events(name, fresh)
            self.cursors[name] = fresh[-1]["id"]
            async with self._shared():
                if (host := self.hosts.get(name)) is not None:
                    for item in stored:
                        _note_host_event(host, item)
                        self.publish_event(item)
                    host["last_seen"] = time.time()
                    self._publish_host(name)
            return self.cursors[name]

    async def compliance(self, name: str, report: ComplianceReport) -> None:
        """A host's newest compliance scan: stored (replacing the one before), then shown."""
        lock = self._report_locks.setdefault(name, asyncio.Lock())
        async with lock:  # two reports of one host stored in the order they came
            view = _compliance_view(report.as_json(time.time()))
            logged = await self.store.save_compliance(name, view)
            if (host := self.hosts.get(name)) is not None:
                host["compliance"] = view
                self._publish_host(name)
            self.publish_event(logged)

    def note_change(self, name: str, change: dict[str, Any]) -> None:
        """A change the hub made there, as the host's last change unless a later one is known."""
        if (host := self.hosts.get(name)) is not None and _note_change(host, change):
            self._publish_host(name)

    # Host actions

    async def host_action(
        self, name: str, admin: str, action: str, snapshot: int | None, description: str | None
    ) -> dict[str, Any]:
        async with self.lock:
            host = self.hosts.get(name)
            if host is None:
                raise NotFound(f"name: no host named {name!r}")
            link = self.agents.get(name)
            if link is None:
                raise Conflict(f"name: host {name} is offline; an action goes only to a host online, and is never "
                               "queued: try again once it is")  # fmt: skip
            action_id = secrets.token_hex(16)
            frame = action_frame(action_id, action, snapshot, description)
            detail = {"id": action_id, "action": action, "snapshot": snapshot, "description": description}
            logged = await self._log(admin, "HostActionRequested", detail, host=name)
            _note_host_event(host, logged)
            self.publish_event(logged)
            try:
                await link.send(frame)
            except (ConnectionError, RuntimeError) as error:
                log.info("could not send action %s to %s: %s", action_id, name, error)
                _lose_actions(host)
            self._publish_host(name)
            return next(item for item in host["actions"] if item["id"] == action_id)

    async def action_status(self, name: str, status: ActionStatus) -> None:
        """An agent's live answer; its HubAction event may have come first, and then this changes nothing."""
        async with self._shared():
            host = self.hosts.get(name)
            if host is not None and _finish_action(host, status.action, status.state, status.result()):
                self._publish_host(name)
                return
        log.info("%s answered action %s, which is not one of its own waiting for an answer", name, status.action)

    # Runs

    async def start_run(
        self, admin: str, target: dict[str, Any], steps: list[dict[str, Any]], flags: int, parallelism: int,
        compliance: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """A run of steps, or (`compliance`, with no steps) a compliance scan or remediation."""
        async with self.lock:
            names = self.resolve(target)
            run: dict[str, Any] = {
                "id": secrets.token_hex(16), "created": time.time(), "admin": admin, "target": target,
                "steps": steps, "compliance": compliance, "flags": flags, "parallelism": parallelism,
                "state": "running", "finished": None,
            }  # fmt: skip
            commands, logged = await self.store.add_run(run, names)
            run["commands"] = commands
            self.runs[run["id"]] = run
            self._forget_old_runs()
            self._publish_run(run)
            self.publish_event(logged)
            await self._pump(run)
            return run

    def resolve(self, target: dict[str, Any]) -> list[str]:
        if "hosts" in target:
            missing = [name for name in target["hosts"] if name not in self.hosts]
            if missing:
                raise NotFound(f"target.hosts: no host named {missing[0]!r}")
            return list(dict.fromkeys(target["hosts"]))
        if "group" in target:
            names = [name for name, host in self.hosts.items() if target["group"] in host["groups"]]
            if not names:
                raise NotFound(f"target.group: no host is in group {target['group']!r}")
            return sorted(names)
        if not self.hosts:
            raise NotFound("target.all: the hub has no hosts")
        return sorted(self.hosts)

    async def cancel_run(self, run_id: str, admin: str) -> dict[str, Any]:
        async with self.lock:
            run = self.runs.get(run_id)
            if run is None:
                raise NotFound(f"run: no run {run_id!r}")
            if run["state"] != "running":
                raise Conflict(f"run: {run_id} is {run['state']} already")
            run["cancel_requested"] = True
            for command in run["commands"]:
                if command["state"] == "pending":
                    await self._set_command(command, state="cancelled", finished=time.time())
                elif command["state"] in IN_FLIGHT and (link := self.agents.get(command["host"])) is not None:
                    await _send_quietly(link, {"type": "cancel", "command": command["id"]})
            self.publish_event(await self._log(admin, "RunCancelRequested", {"run": run_id}))
            await self._maybe_finish(run)
            self._publish_run(run)
            return run

    async def command_status(self, name: str, status: CommandStatus) -> None:
        async with self.lock:
            found = self._find_command(status.command)
            if found is None or found[1]["host"] != name:
                log.warning("%s reported command %s, which is not one of its own in flight", name, status.command)
                return
            run, command = found
            if command["state"] in FINAL_COMMAND_STATES:
                return  # a late or repeated report: the first final one stands
            state = "failed" if status.state == "rejected" else status.state
            values: dict[str, Any] = {"state": state, "job_id": status.job}
            if status.result is not None:
                values["result"] = status.result
            if state in FINAL_COMMAND_STATES:
                values["finished"] = time.time()
            await self._set_command(command, **values)
            if state in FINAL_COMMAND_STATES and _pending_confirmation(status.result):
                # The report crossed from the host to here after the change: the connection works.
                # The confirm crossing back completes the check; lost on the way, the host reverts.
                link = self.agents.get(name)
                if link is not None and status.job is not None:
                    await _send_quietly(link, {"type": "confirm", "job": status.job})
                    self.publish_event(await self._log("hub", "ConfirmSent", {"host": name, "job": status.job}))
            if state in FINAL_COMMAND_STATES:
                if (change := _run_change(command, run)) is not None:
                    self.note_change(name, change)
                await self._maybe_finish(run)
                await self._pump_all()
            self._publish_run(run)

    def output(self, name: str, frame: OutputLines, allowed: int) -> bool:
        """Lines a step of one of the host's commands in flight printed: kept (the first `allowed` of
        them) for the run's followers, who are told to pull them; False when the command is not one of
        the host's own in flight. No lock and no store: nothing waits."""
        found = self._output_commands.get(frame.command) or self._find_command(frame.command)
        if found is None or found[1]["host"] != name or found[1]["state"] not in IN_FLIGHT:
            self._output_commands.pop(frame.command, None)
            return False
        # Found once, not by a walk through every run's commands for each of a fleet's frames.
        self._output_commands[frame.command] = found
        run, command = found
        if frame.step >= len(run["steps"]):
            raise ProtocolError(f"output.step: {frame.step} is not a step of the run (it has {len(run['steps'])})")
        lines = frame.lines[:allowed]
        if self.live.add(run["id"], name, command["id"], frame.step, frame.first, lines, len(frame.lines)):
            self.live.wake(run["id"])
            if self.bus is not None:  # the run's followers on the other hubs see it live too
                where = {"run": run["id"], "host": name, "command": command["id"], "step": frame.step}
                self.share({"kind": "output", **where, "first": frame.first, "lines": lines, "sent": len(frame.lines)})
        return True

    # Rollouts (hub/rollouts.py): every step under the lock, as dispatch is

    async def update_status(self, name: str, status: UpdateStatus) -> None:
        async with self.lock:
            await self.rollouts.update_status(name, status)

    async def tick(self) -> None:
        async with self.lock:
            await self.rollouts.tick()
            if self.bus is not None:
                await self.bus.listen()
                await self._sweep()
                if secrets.randbelow(PRUNE_ODDS) == 0:
                    await self.bus.prune()

    # Dispatch internals (called with the lock held)

    async def _pump_all(self) -> None:
        for run in list(self.runs.values()):
            if run["state"] == "running":
                await self._pump(run)

    async def _pump(self, run: dict[str, Any]) -> None:
        if run["state"] != "running" or run.get("cancel_requested"):
            return
        in_flight = sum(1 for command in run["commands"] if command["state"] in IN_FLIGHT)
        changed = False
        for command in run["commands"]:
            if in_flight >= run["parallelism"]:
                break
            link = self.agents.get(command["host"])
            if command["state"] != "pending" or link is None:
                continue
            # Recorded as sent before it is sent: after a crash here the agent's idempotency key
            # turns a second send into a status report, never a second run.
            await self._set_command(command, state="sent", sent=time.time())
            await _send_quietly(link, {"type": "command", "command": self._command_message(command)})
            in_flight += 1
            changed = True
        if changed:
            self._publish_run(run)

    async def _maybe_finish(self, run: dict[str, Any]) -> None:
        states = [command["state"] for command in run["commands"]]
        if run["state"] != "running" or any(state not in FINAL_COMMAND_STATES for state in states):
            return
        if run.get("cancel_requested"):
            outcome = "cancelled"
        elif all(state == "done" for state in states):
            outcome = "complete"
        elif any(state == "done" for state in states):
            outcome = "partial"
        else:
            outcome = "failed"
        run["state"] = outcome
        run["finished"] = time.time()
        for command in run["commands"]:
            self._output_commands.pop(command["id"], None)
        # Its followers pull what is left before they send its end; later ones read the stored run.
        asyncio.get_running_loop().call_later(OUTPUT_LINGER, self.live.forget, run["id"])
        self.publish_event(await self.store.finish_run(run["id"], outcome, "hub"))

    async def _set_command(self, command: dict[str, Any], **values: Any) -> None:
        await self.store.update_command(command["id"], **values)
        command.update(values)

    async def _log(self, actor: str, method: str, detail: dict[str, Any], host: str | None = None) -> dict[str, Any]:
        async with self.store.transaction() as db:
            return await self.store.log(db, actor, method, detail, host=host)

    def _command_message(self, command: dict[str, Any]) -> dict[str, Any]:
        run = self.runs[command["run_id"]]
        return command_frame(command["id"], run["steps"], run["flags"], run.get("compliance"))

    def _commands_of(self, host: str) -> list[dict[str, Any]]:
        return [command for run in self.runs.values() for command in run["commands"] if command["host"] == host]

    def _find_command(self, command_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for run in self.runs.values():
            for command in run["commands"]:
                if command["id"] == command_id:
                    return run, command
        return None

    def _forget_old_runs(self) -> None:
        finished = [run_id for run_id, run in self.runs.items() if run["state"] != "running"]
        for run_id in finished[: max(0, len(self.runs) - KEPT_RUNS)]:
            del self.runs[run_id]
            self.live.forget(run_id)
            self.publish({"kind": "run_removed", "id": run_id})


def _note_host_event(host: dict[str, Any], item: dict[str, Any]) -> None:
    """What a host's row in the UI shows of its events: its last rollback, its recent jobs and actions."""
    detail = item["detail"]
    if item["method"] == "HostActionRequested" and item["actor"] != "agent":
        action = {"id": detail.get("id"), "time": item["time"], "admin": item["actor"], "action": detail.get("action"),
                  "snapshot": detail.get("snapshot"), "description": detail.get("description"), "state": "sent",
                  "result": None, "finished": None}  # fmt: skip
        host["actions"] = [*host["actions"], action][-KEPT_ACTIONS:]
    elif item["method"] == "HubAction" and item["actor"] == "agent":
        result = {key: detail.get(key) for key in ("snapshot", "entry", "reboot_needed", "error")}
        _finish_action(host, detail.get("action"), str(detail.get("state")), result, item["time"])
        if detail.get("kind") == "rollback" and detail.get("state") == "done":
            # Named as the daemon's own Rollback is: the host's row shows what happened, not how it was asked.
            host["last_rollback"] = {"time": item["time"], "method": "Rollback", "detail": detail}
    elif item["method"] in ROLLBACK_METHODS:
        host["last_rollback"] = {"time": item["time"], "method": item["method"], "detail": item["detail"]}
        if item["method"] in BOOT_METHODS and item["actor"] == "agent":  # a fallback: a boot as well
            _note_boot(host, item)
    elif item["method"] in BOOT_METHODS and item["actor"] == "agent":
        _note_boot(host, item)
    elif item["method"] == "JobFinished" and item["actor"] == "agent":
        summary = {"id": detail.get("job"), "time": item["time"], "state": detail.get("state"),
                   "kind": detail.get("kind"), "ops": detail.get("ops"), "result": detail.get("result"),
                   "uid": detail.get("uid"), "hub_command": detail.get("hub_command"),
                   "result_omitted": detail.get("result_omitted")}  # fmt: skip
        host["jobs"] = [*host["jobs"], summary][-KEPT_JOBS:]


def _finish_action(
    host: dict[str, Any], action_id: object, state: str, result: dict[str, Any], when: float | None = None
) -> bool:
    """Record how an action ended, unless an answer came before (one lost may still get its outcome)."""
    for action in host["actions"]:
        if action["id"] == action_id and action["state"] not in ACTION_FINAL:
            final = state if state in ACTION_FINAL else "failed"
            action.update(state=final, result=result, finished=when or time.time())
            if final == "done" and action["action"] in CHANGING_ACTIONS:
                words = "roll back to" if action["action"] == "rollback" else "boot once"
                _note_change(host, {"time": action["finished"], "by": action["admin"], "kind": "action",
                                    "id": action["id"], "what": f"{words} snapshot {action['snapshot']}"})  # fmt: skip
            return True
    return False


# The last change: the newest run or action from the hub that changed the host, by whom and when.


def _run_change(command: dict[str, Any], run: dict[str, Any]) -> dict[str, Any] | None:
    """What a host's finished command changed, as its last change; None when it changed nothing (a
    dry run, every step unchanged, or its changes restored after a failure)."""
    result = command.get("result")
    if not isinstance(result, dict) or int(run.get("flags") or 0) & DRY_RUN or "restored" in result:
        return None
    steps = result.get("steps")
    if not isinstance(steps, list) or not any(isinstance(s, dict) and s.get("state") == "changed" for s in steps):
        return None
    ops = [str(step.get("op")) for step in run.get("steps") or [] if isinstance(step, dict)]
    return {"time": command.get("finished") or time.time(), "by": run.get("admin"), "kind": "run",
            "id": run.get("id"), "what": " && ".join(ops)}  # fmt: skip


def _note_change(host: dict[str, Any], change: dict[str, Any] | None) -> bool:
    last = host.get("last_change")
    if change is None or (last is not None and last["time"] > change["time"]):
        return False
    host["last_change"] = change
    return True


# A host's boot history, from its agent's events: `Booted` once per boot (what booted), `MarkGood`
# (the boot was confirmed good), `BootFallback` (from a daemon older than `Booted`: a boot that fell back).


def _note_boot(host: dict[str, Any], item: dict[str, Any]) -> None:
    detail, boots = item["detail"], host["boots"]
    if item["method"] == "Booted":
        boot = _boot_record(item["time"], detail)
        if not any(boot["boot"] and other["boot"] == boot["boot"] for other in boots):
            host["boots"] = [*boots, boot][-KEPT_BOOTS:]
    elif item["method"] == "MarkGood":
        for boot in boots:
            if boot["boot"] and boot["boot"] == detail.get("boot"):
                boot["health"] = "good"
    elif (failed := _text(detail.get("failed_entry"))) and not any(b["failed_entry"] == failed for b in boots[-1:]):
        # A fallback the boot before did not report (its daemon sent no `Booted`): a boot of its own.
        boot = _boot_record(item["time"], {**detail, "kind": "fallback"})
        host["boots"] = [*boots, boot][-KEPT_BOOTS:]


def _boot_record(when: float, detail: dict[str, Any]) -> dict[str, Any]:
    """A boot as the hub keeps it: only the fields it knows, each of its type and cut to BOOT_TEXT; an
    agent's malformed report leaves a field empty, never a view broken."""
    snapshot = detail.get("snapshot")
    if isinstance(snapshot, str) and snapshot.isdigit() and len(snapshot) < 19:
        snapshot = int(snapshot)
    if not isinstance(snapshot, int) or isinstance(snapshot, bool) or not 0 <= snapshot < 2**62:
        snapshot = None
    fields = ("boot", "root", "kind", "entry", "image_version", "failed_entry", "failed_root")
    return {"time": when, "snapshot": snapshot, "health": "pending", **{key: _text(detail.get(key)) for key in fields}}


def _text(value: object) -> str:
    return value[:BOOT_TEXT] if isinstance(value, str) else ""


def _lose_actions(host: dict[str, Any]) -> None:
    """The connection is gone: actions sent over it and not answered will not be answered live."""
    for action in host["actions"]:
        if action["state"] == "sent":
            action["state"] = "lost"


@overload
def _compliance_view(report: dict[str, Any]) -> dict[str, Any]: ...
@overload
def _compliance_view(report: None) -> None: ...
def _compliance_view(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored report as hosts show it: with its score, passed over the checks that apply (the
    not-applicable ones count neither way), None when none applies."""
    if report is None:
        return None
    applied = report["passed"] + report["failed"]
    return {**report, "score": None if applied == 0 else report["passed"] / applied}


def _health(host: dict[str, Any]) -> str:
    if not host["online"]:
        return "offline"
    boot = (host.get("facts") or {}).get("boot_state") or {}
    if boot.get("kind") == "fallback":
        return "fell back"
    return str(boot.get("health") or "unknown")


def _boot_status(host: dict[str, Any]) -> str:
    """How the host's last boot reported stands: healthy, on trial (its boot counter not yet blessed),
    fell back (a new deployment did not boot, and the one before booted again), or unknown. The
    newest boot of its history takes the same word's health."""
    facts = host.get("facts")
    boot = facts.get("boot_state") if isinstance(facts, dict) else None
    if not isinstance(boot, dict) or not boot:
        return "unknown"
    status = "fell back" if boot.get("kind") == "fallback" else BOOT_WORDS.get(str(boot.get("health")), "unknown")
    boots = host.get("boots") or []
    if status in ("healthy", "fell back") and boot.get("health") == "good" and boots:
        newest = boots[-1]
        if newest["root"] == boot.get("root") and newest["entry"] == boot.get("entry"):
            newest["health"] = "good"  # blessed by systemd-boot's counter, with or without MarkGood
    return status


BOOT_WORDS = {"good": "healthy", "pending": "on trial"}


def _pending_confirmation(result: dict[str, Any] | None) -> bool:
    confirmation = (result or {}).get("confirmation")
    return isinstance(confirmation, dict) and "deadline" in confirmation


async def _send_quietly(link: AgentLink | RemoteLink, message: dict[str, Any]) -> None:
    """A send to an agent that has just gone is not an error: its reconnect's welcome resends."""
    try:
        await link.send(message)
    except (ConnectionError, RuntimeError) as error:
        log.info("could not send %s to %s: %s", message["type"], link.host, error)
