"""rastosd's link to the hub: it connects out over WebSocket and keeps the hub current.

What it sends (messages in hub/protocol.py):
- the daemon's own event log, from the hub's cursor on, in order. The log is the outbox: it is
  durable in state.db, so events made while the hub was unreachable (or the daemon restarted) are
  delivered after the next connect, and the hub's cursor, moved in the same transaction that stores
  them, keeps each one single however often it is resent;
- facts (host name, boot state, snapshots, ops) whenever they changed;
- the state of each job run for a hub command, and its steps' output while it runs (`output`
  frames, in batches: daemon/hub_output.py);
- the state of each image update the hub asked for (`update_status`);
- the outcome of each action the hub asked for (`action_status`: a snapshot taken, a rollback or a
  one-shot boot prepared; daemon/hub_actions.py), which the event log carries too.
Commands from the hub carry an id that the job records (a unique column): a command that arrives
again, after a reconnect or a hub restart, is answered with its job's state and never run twice.

Several hubs: `hub.url` may name several processes of one hub (one database, docs/hub.md). The link
connects to one at a time, starting with the first; a connection refused, unreachable or dropped
moves it to the next, round the list, after the backoff it would have waited for the same hub, and the
one that answered stays in use until it fails. All are ws:// or all wss://: one CA verifies each.

TLS: a wss:// hub is verified against the CA file of `hub.ca` (daemon.toml, or the image profile's
`[hub] ca`), or the system's store without one, TLS 1.2 at least; a bundle's download from the hub is
verified the same way. A hub that fails the check (another CA, an expired certificate, another name)
is logged as such, naming what it was checked against, and tried again after the longest backoff.

Tokens: a token file is read again before each connect, so a token rotated on the hub
(`rastos-hub host rotate NAME --grace S`) is taken up by writing the new one there, without a restart.

Image updates: the hub's `update` frame names a path on the hub (its /api/v1/images/ID/bundle); the
link joins it to the hub's base as this host reaches the hub (the agent URL without /api/v1/agent,
with http(s) for ws(s)),
and asks the daemon to stage the bundle from there, sending this host's token with the download as
`Authorization: Bearer` (never logged). An update id is staged once: a repeat (the hub sends it again
after each welcome until it hears that it is staged or ended) is answered with its state; an update to the version this
host runs already is answered by the facts alone, which show it, sent again after it. The ids
handled are kept in memory only; what outlasts a restart of rastosd is the daemon's own state, which
it reads by the update's version (Updates.stage_version): a version staged already, its entry booting
next, is answered `staged` without a second download (and rebooted into, if the update asks), and a
staging of it under way is followed, not started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from daemon.boot import BootState
from daemon.errors import DaemonError
from daemon.hub_actions import ActionCore, action_id, carry_out, parse_action, refused
from daemon.hub_link_settings import HUB_UID, HubSettings, TlsSetupError
from daemon.hub_output import OutputForwarder
from daemon.jobs import FINAL_STATES, Job, JobManager, check_flags
from daemon.snapshots import Snapshots
from daemon.store import StateStore
from ops import OPS
from ops.params import json_type
from ops.steps import parse_steps
from ops.target import Target
from rastos import __version__

if TYPE_CHECKING:
    import aiohttp

    from daemon.compliance.model import Report
    from daemon.hub_compliance import ComplianceRequest
    from daemon.updates import StageAnswer

log = logging.getLogger("rastosd.hub")

MAX_BATCH_BYTES = 256 * 1024  # events per message, well under the hub's 1 MiB frame limit
MAX_BATCH_EVENTS = 200
MAX_EVENT_BYTES = 192 * 1024  # one event, at most; the rest of its job stays in the daemon (GetJob)
KEPT_OUTPUT_LINES = 100  # per step, in what the hub is sent of a finished job
POLL_INTERVAL = 2.0  # events the daemon logs from its worker thread are picked up at least this often
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
# No route to the hub is this host's own state (early in a boot, before DHCP has answered: rastosd
# starts before the network), not a hub that needs sparing: the next try comes after the first delay.
NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL})


def no_route_yet(error: BaseException) -> bool:
    """Whether a failed connection found no route (aiohttp keeps the socket's error as os_error)."""
    cause = getattr(error, "os_error", error)
    return isinstance(cause, OSError) and cause.errno in NO_ROUTE


MAX_UPDATE_DETAIL = 4000  # of a failure's message in update_status (the hub takes up to 4096 characters)
AGENT_PATH = "/api/v1/agent"  # the hub's agent socket, below the hub's base
UPDATE_PATH = re.compile(r"^/api/v1/images/[A-Za-z0-9._-]{1,64}/bundle$")  # what an update's url may be
UpdateCompleted = Callable[[int, bool, dict[str, Any]], None]


class HubRefused(Exception):
    """The hub answered, but not as a WebSocket: a wrong token or URL, worth a longer wait."""


class DaemonCore(ActionCore, Protocol):
    """What the link needs of the daemon (core.py's Daemon, which holds the link): its state, its
    jobs, its facts, and what the hub's actions call (daemon/hub_actions.py)."""

    target: Target
    store: StateStore
    snapshots: Snapshots | None
    jobs: JobManager

    def hostname(self) -> str: ...
    def boot_state(self) -> BootState: ...

    # Image updates (docs/updates.md: the daemon's `Updates` API, which these pass on to as the hub's
    # uid with method "HubUpdate"). `stage_update` stages `version` from the bundle at `source`, an
    # http(s) URL fetched with `headers` and verified with `tls` (None: the system's store), and answers
    # at once: `staging` with the staging's id (a new one, or the one of that version under way), or
    # `staged` (that version's entry boots next already; rebooted into when `reboot` asks); a refusal
    # (one staging at a time, a bad source) raises DaemonError. `on_update_completed` sets the link's
    # callback for the end of any staging (a link made anew, Hub.Join, replaces the one before's),
    # called with (id, ok, result) from any thread; `result` may say "state" (staged, failed,
    # cancelled) and "error".
    def stage_update(
        self, source: str, *, version: str, reboot: bool, headers: Mapping[str, str],
        tls: ssl.SSLContext | None = None,
    ) -> StageAnswer: ...  # fmt: skip
    def on_update_completed(self, callback: UpdateCompleted) -> None: ...


class HubLink:
    def __init__(self, daemon: DaemonCore, settings: HubSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.token = settings.token
        self.tls: ssl.SSLContext | None = None  # what the hub was verified with at the last connect
        # The hub URL tried next, or connected to: the one that last worked stays until it fails.
        self._at = 0
        self.connected = False
        self._closed_with = ""  # the hub's reason for its last close
        self._wake = asyncio.Event()
        self._outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._last_facts: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._updates: dict[str, dict[str, Any]] = {}  # hub update id -> its last update_status
        self._stagings: dict[int, list[str]] = {}  # the daemon's staging id -> the hub's update ids it answers
        # hub action id -> its action_status (None while under way): an id sent again is never done twice
        self._actions: dict[str, dict[str, Any] | None] = {}
        self._action_tasks: set[asyncio.Task[None]] = set()
        # hub command id -> its command_status, for a compliance scan (no job records it); a repeat is
        # answered with it, or (after a restart of rastosd) scanned again: a scan changes nothing
        self._scans: dict[str, dict[str, Any] | None] = {}
        self._remediations: set[str] = set()  # hub commands whose job is a remediation: scanned again at its end
        self.output = OutputForwarder(self._send, lambda: self._outgoing.qsize())
        self.state = "connecting"  # then connected, or why not: refused, unreachable, disconnected, failed
        self.error: str | None = None  # what the last failure was, as logged
        self.since = time.time()  # when the state last changed
        daemon.on_update_completed(self._update_completed)

    @property
    def url(self) -> str:
        """The hub URL in use: connected to, or tried next."""
        return self.settings.urls[self._at]

    def status(self) -> dict[str, Any]:
        """What Hub.GetStatus tells: the state, the URL in use and every one known, the last failure
        and since when."""
        return {"state": self.state, "url": self.url, "urls": list(self.settings.urls), "error": self.error,
                "since": self.since}  # fmt: skip

    def _set_state(self, state: str, error: str | None = None) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error, self.since = state, error, time.time()

    def wake(self) -> None:
        """Something worth telling happened (an event, a job's state): send it now, not at the next poll."""
        self._wake.set()

    def job_output(self, job: Job, step: int, line: str) -> None:
        if job.hub_command is not None:
            self.output.line(job.hub_command, step, line, live=self.connected)

    def job_changed(self, job: Job) -> None:
        if job.hub_command is not None and job.state in FINAL_STATES:
            self.output.finished(job.hub_command)  # its last lines go before its end
        if job.hub_command in self._remediations and job.state in FINAL_STATES:
            # Its end is reported with the scan after it, which shows what the remediation fixed.
            self._remediations.discard(job.hub_command)
            self._start(self._rescan(job.hub_command, job.state, job.id, job.result or None))
            return
        if self.connected and job.hub_command is not None:
            self._report(job.hub_command, job.state, job.id, job.result or None)
        else:
            self.wake()

    async def run_forever(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            grow = True
            try:
                self.tls = self.settings.tls()
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(
                        self.url, headers={"Authorization": f"Bearer {self._current_token()}"},
                        heartbeat=20.0, max_msg_size=1 << 20, ssl=self.tls or True,
                    ) as socket,
                ):  # fmt: skip
                    log.info("connected to the hub at %s", self.url)
                    delay = BACKOFF_FIRST
                    self._closed_with = ""
                    await self._serve(socket)
                    closed = self._closed_with or str(socket.close_code)
                    self._set_state("disconnected", f"the hub closed the connection ({closed})")
                    log.warning("%s", self.error)
            except aiohttp.WSServerHandshakeError as error:
                self._set_state("refused", f"the hub refused this host ({error.status} {error.message}): "
                                "check hub.url and the token")  # fmt: skip
                log.error("%s", self.error)
                delay = BACKOFF_MAX
            except TlsSetupError as error:
                self._set_state("untrusted", f"{error}: not connecting to the hub until it can be read")
                log.error("%s", self.error)
                delay = BACKOFF_MAX
            except aiohttp.ClientConnectorCertificateError as error:
                # A hub this host cannot trust: another CA, an expired certificate, another name.
                problem = error.certificate_error
                reason = getattr(problem, "verify_message", None) or str(problem)
                self._set_state("untrusted", f"the hub at {self.url} failed TLS verification against "
                                f"{self.settings.verified_against}: {reason}")  # fmt: skip
                log.error("%s", self.error)
                delay = BACKOFF_MAX
            except aiohttp.ClientSSLError as error:  # no verification to speak of: a hub not speaking TLS, say
                self._set_state("unreachable", f"TLS with the hub at {self.url} failed: {error}")
                log.error("%s", self.error)
                delay = BACKOFF_MAX
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
                self._set_state("unreachable", f"hub at {self.url} unreachable: "
                                f"{error or type(error).__name__}")  # fmt: skip
                log.warning("%s", self.error)
                if no_route_yet(error):
                    delay = BACKOFF_FIRST
                    grow = False
            except Exception:  # anything else ends this connection, never the link: try again later
                self._set_state("failed", "the link to the hub failed: the journal has details")
                log.exception("the link to the hub failed")
            finally:
                self.connected = False
            self._next_hub()
            # Jitter keeps a fleet that lost its hub from coming back all in the same second.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX) if grow else delay

    def _next_hub(self) -> None:
        """After a failed or dropped connection, the next hub of the list (the same one if it is the
        only one): the backoff's delay goes on growing across them until one answers."""
        if len(self.settings.urls) > 1:
            self._at = (self._at + 1) % len(self.settings.urls)
            log.info("trying the next hub: %s", self.url)

    def _current_token(self) -> str:
        """The token file's token now (rotated on the hub, it may have been replaced); the one before
        if it cannot be read."""
        path = self.settings.token_file
        if path is None:
            return self.token
        try:
            token = path.read_text().strip()
        except OSError as error:
            log.warning("hub.token_file: cannot read %s (%s): connecting with the token read before", path,
                        error.strerror)  # fmt: skip
            return self.token
        if token and token != self.token:
            log.info("hub.token_file: %s holds a new token: connecting with it", path)
            self.token = token
        return self.token

    async def _serve(self, socket: aiohttp.ClientWebSocketResponse) -> None:

        welcome = await socket.receive_json(timeout=30)
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            raise ValueError(f"the hub's first message was not a welcome: {str(welcome)[:200]}")
        self._outgoing = asyncio.Queue()
        self._last_facts = None
        self.connected = True
        self._set_state("connected")  # the hub took the token: its welcome comes only after
        cursor = int(welcome.get("last_event", 0))
        for command in welcome.get("commands", []):
            await self._take_command(command)
        writer = asyncio.create_task(self._write(socket, cursor))
        reader = asyncio.create_task(self._read(socket))
        try:
            # Whichever ends first ends the connection: a writer that failed must not leave a link
            # that looks connected (heartbeats still flow) but sends nothing.
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        import aiohttp

        while True:
            message = await socket.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                self._closed_with = f"{message.data}: {message.extra}" if message.extra else str(message.data)
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            await self._on_message(json.loads(message.data))

    async def _on_message(self, message: object) -> None:
        if not isinstance(message, dict):
            log.warning("the hub sent a message that is not an object: %.200r", message)
            return
        kind = message.get("type")
        if kind == "command":
            await self._take_command(message.get("command"))
        elif kind == "cancel":
            self._cancel(str(message.get("command")))
        elif kind == "confirm":
            self._confirm(message.get("job"))
        elif kind == "update":
            self._take_update(message.get("update"))
        elif kind == "action":
            self._take_action(message)
        elif kind == "error":
            log.error("the hub refused a message: %s", message.get("message"))
        elif kind != "ack":
            log.warning("unknown message from the hub: %r", kind)

    async def _write(self, socket: aiohttp.ClientWebSocketResponse, cursor: int) -> None:
        """The one writer: queued messages first, then events after the cursor, then facts if changed."""
        while True:
            while not self._outgoing.empty():
                await socket.send_json(self._outgoing.get_nowait())
            batch = await asyncio.to_thread(self._event_batch, cursor)
            if batch:
                await socket.send_json({"type": "events", "events": batch})
                cursor = batch[-1]["id"]
                continue  # there may be more; facts after the log has caught up
            facts = await asyncio.to_thread(self.facts)
            if facts != self._last_facts:
                self._last_facts = facts  # before the send: a reset meanwhile (_take_update) must hold
                await socket.send_json({"type": "facts", "facts": facts})
            self._wake.clear()
            if self._outgoing.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)

    def _event_batch(self, cursor: int) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        size = 0
        for event in self.daemon.store.events(cursor, MAX_BATCH_EVENTS):
            detail = dict(event.detail)
            if event.method == "JobFinished" and event.job_id is not None:
                detail.update(self._job_summary(event.job_id))
            item = {"id": event.id, "time": event.time, "uid": event.uid, "method": event.method,
                    "job": event.job_id, "detail": detail}  # fmt: skip
            item_size = len(json.dumps(item))
            if item_size > MAX_EVENT_BYTES:  # a job with huge diffs: its state and ops go, its details do not
                detail.pop("result", None)
                detail["result_omitted"] = f"{item_size} bytes, over the {MAX_EVENT_BYTES} a message may carry"
                item_size = len(json.dumps(item))
            size += item_size
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(item)
        return batch

    def _job_summary(self, job_id: int) -> dict[str, Any]:
        """What the hub keeps of a finished job: its ops and result, with each step's output cut short."""
        row = self.daemon.store.job(job_id)
        if row is None:
            return {}
        result = json.loads(json.dumps(row.result or {}))
        for step in result.get("steps", []):
            if isinstance(step.get("output"), list) and len(step["output"]) > KEPT_OUTPUT_LINES:
                step["output"] = ["...", *step["output"][-KEPT_OUTPUT_LINES:]]
        return {"kind": row.kind, "ops": [step["op"] for step in row.request], "result": result,
                "hub_command": row.hub_command}  # fmt: skip

    def facts(self) -> dict[str, Any]:
        snapshots = self.daemon.snapshots
        rows = snapshots.existing() if snapshots is not None else []
        return {
            "hostname": self.daemon.hostname(),
            "version": __version__,
            "boot_state": self.daemon.boot_state().as_dbus(),
            "snapshots": [
                {
                    "id": r.id,
                    "created": r.created,
                    "description": r.description,
                    "kind": r.kind,
                    "known_good": r.known_good,
                }
                for r in rows
            ],
            "ops": sorted(OPS),
        }

    async def _take_command(self, command: object) -> None:
        if not isinstance(command, dict) or not isinstance(command.get("id"), str):
            log.warning("the hub sent a command without an id: %.200r", command)
            return
        command_id = command["id"]
        if "compliance" in command:
            self._take_compliance(command_id, command)
            return
        row = self.daemon.store.job_for_command(command_id)
        if row is not None:  # sent again: report, never run twice
            self._report(command_id, row.state, row.id, row.result)
            return
        try:
            steps = parse_steps(self.daemon.target, json.dumps(command.get("steps")))
            flags = command_flags(command)
        except (DaemonError, TypeError) as error:
            log.warning("refused hub command %s: %s", command_id, error)
            self._report(command_id, "rejected", None, {"error": str(error)})
            return
        kind = "apply" if len(steps) == 1 else "pipeline"
        job = self.daemon.jobs.submit(kind, steps, flags, HUB_UID, "HubCommand", hub_command=command_id)
        log.info("hub command %s is job %d", command_id, job.id)
        self._report(command_id, job.state, job.id, None)

    # Compliance scans and remediations (daemon/hub_compliance.py)

    def _take_compliance(self, command_id: str, command: dict[str, Any]) -> None:
        if command_id in self._scans:  # sent again: answered with its end, if it has one
            if (status := self._scans[command_id]) is not None:
                self._send(status)
            return
        row = self.daemon.store.job_for_command(command_id)
        if row is not None:  # a remediation sent again: its job stands for it, never made twice
            if row.state in FINAL_STATES:
                self._start(self._rescan(command_id, row.state, row.id, row.result))
            else:
                self._remediations.add(command_id)
                self._report(command_id, row.state, row.id, None)
            return
        # The compliance checks load the op modules: imported when a hub first asks, not at every start.
        from daemon.hub_compliance import parse_request

        try:
            request = parse_request(command)
            flags = command_flags(command)
        except (DaemonError, TypeError) as error:
            log.warning("refused hub compliance command %s: %s", command_id, error)
            self._report(command_id, "rejected", None, {"error": str(error)})
            return
        self._scans[command_id] = None
        self._start(self._compliance(command_id, request, flags))

    async def _compliance(self, command_id: str, request: ComplianceRequest, flags: int) -> None:
        from daemon.hub_compliance import remediation_steps, summary

        report = await self._scan(command_id)
        if report is None:
            self._end_scan(command_id, "failed", {"error": "the compliance scan failed: rastosd's journal has why"})
            return
        if request.action == "scan":
            self._end_scan(command_id, "done", {"compliance": summary(report)})
            return
        try:
            wanted = remediation_steps(report, request.checks)
            steps = parse_steps(self.daemon.target, json.dumps(wanted)) if wanted else []
        except DaemonError as error:
            self._end_scan(command_id, "rejected", {"error": str(error), "compliance": summary(report)})
            return
        if not steps:
            note = "nothing an op can remediate among the checks that fail"
            self._end_scan(command_id, "done", {"compliance": summary(report), "steps": [], "note": note})
            return
        del self._scans[command_id]  # from here its job answers for it
        self._remediations.add(command_id)
        job = self.daemon.jobs.submit("pipeline", steps, flags, HUB_UID, "HubCommand", hub_command=command_id)
        log.info("hub compliance remediation %s is job %d", command_id, job.id)
        self._report(command_id, job.state, job.id, None)

    async def _scan(self, command_id: str) -> Report | None:
        """Scan the host and send the hub its report; None (logged) if the scan itself failed."""
        from daemon.compliance import scan  # 65 checks: imported when first asked for, as ComplianceScan does
        from daemon.hub_compliance import report_frame

        try:
            report = await asyncio.to_thread(scan, self.daemon.target)  # sshd -T, many files: off the loop
        except Exception:
            log.exception("hub compliance scan %s failed", command_id)
            return None
        self._send(report_frame(report, command_id))
        return report

    async def _rescan(self, command_id: str, state: str, job_id: int, result: dict[str, Any] | None) -> None:
        from daemon.hub_compliance import summary

        report = await self._scan(command_id)
        extra = {} if report is None else {"compliance": summary(report)}
        self._report(command_id, state, job_id, {**(result or {}), **extra})

    def _end_scan(self, command_id: str, state: str, result: dict[str, Any]) -> None:
        status = {"type": "command_status", "command": command_id, "state": state, "job": None, "result": result}
        self._scans[command_id] = status
        self._send(status)

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Work of the link's own (an action, a scan), on a task kept until it ends."""
        task = asyncio.create_task(work)
        self._action_tasks.add(task)
        task.add_done_callback(self._action_tasks.discard)

    def _take_action(self, message: dict[str, Any]) -> None:
        found = action_id(message)
        if found is not None and found in self._actions:  # sent again: answered with how it went, if it has
            if (status := self._actions[found]) is not None:
                self._send(status)
            return
        try:
            action = parse_action(message)
        except DaemonError as error:
            log.warning("refused hub action %s: %s", found, error)
            if found is not None:
                self._actions[found] = status = refused(self.daemon.store, found, error, HUB_UID)
                self._send(status)
            return
        self._actions[action.id] = None
        # On a task of its own: a rollback's btrfs and ESP writes must not hold up this link's reading.
        self._start(self._carry_out(action.id, lambda: carry_out(self.daemon, action, HUB_UID)))

    async def _carry_out(self, found: str, work: Callable[[], dict[str, Any]]) -> None:
        self._actions[found] = status = await asyncio.to_thread(work)
        self._send(status)

    def _send(self, message: dict[str, Any]) -> None:
        self._outgoing.put_nowait(message)
        self.wake()

    def _cancel(self, command_id: str) -> None:
        row = self.daemon.store.job_for_command(command_id)
        if row is None or row.state in FINAL_STATES:
            return
        try:
            self.daemon.jobs.cancel(row.id, HUB_UID)
        except DaemonError as error:
            log.info("cannot cancel job %d for the hub: %s", row.id, error)

    def _confirm(self, job_id: object) -> None:
        """The hub heard the job's final status and says so: the host is reachable, the change stands."""
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
            log.warning("the hub sent a confirm without a job id: %.100r", job_id)
            return
        try:
            self.daemon.jobs.confirmations.confirm(job_id, HUB_UID, "HubConfirm")
        except DaemonError as error:
            log.info("hub confirm of job %d: %s", job_id, error)

    def _report(self, command_id: str, state: str, job_id: int | None, result: dict[str, Any] | None) -> None:
        """Queue a command's state for the hub and wake the writer to send it."""
        status = {"type": "command_status", "command": command_id, "state": state, "job": job_id, "result": result}
        self._outgoing.put_nowait(status)
        self.wake()

    # Image updates

    def _take_update(self, update: object) -> None:
        if not isinstance(update, dict) or not isinstance(update.get("id"), str) or not update["id"]:
            log.warning("the hub sent an update without an id: %.200r", update)
            return
        update_id, version = update["id"][:64], update.get("version")
        if update_id in self._updates:  # sent again: the hub has not heard how it went
            self._outgoing.put_nowait(self._updates[update_id])
            self.wake()
            return
        if not isinstance(version, str) or not version or len(version) > 64:
            self._update_status(update_id, "failed", "?", "version: must be a version string")
            return
        if version == self.daemon.boot_state().image_version:
            log.info("hub update %s: this host runs %s already", update_id, version)
            # The facts again, after the update: ones sent before may have reached the hub while it was
            # still deciding to send it, and a hub follows a host's facts for an update only once sent.
            self._last_facts = None
            self.wake()
            return
        url, reboot = update.get("url"), update.get("reboot", True)
        if not isinstance(url, str) or not UPDATE_PATH.match(url) or not isinstance(reboot, bool):
            # Only a path on the hub: a whole URL could send this host's token anywhere.
            self._update_status(update_id, "failed", version, "url: must be a bundle's path on the hub")
            return
        source = self.hub_base() + url
        try:
            answer = self.daemon.stage_update(
                source,
                version=version,
                reboot=reboot,
                headers={"Authorization": f"Bearer {self.token}"},
                tls=self.tls,
            )
        except DaemonError as error:
            log.warning("hub update %s to %s refused: %s", update_id, version, error)
            self._update_status(update_id, "failed", version, str(error))
            return
        except Exception:  # reported, not raised: the hub would send it again on every connect
            log.exception("hub update %s to %s could not start", update_id, version)
            self._update_status(update_id, "failed", version, "the daemon could not start staging: see its log")
            return
        if answer.state == "staged":  # before rastosd restarted (and forgot the id), or by the host's admin
            log.info("hub update %s: %s is staged already (update %d), not staged again", update_id, version, answer.id)
            self._update_status(update_id, "staged", version, None)
            return
        log.info("hub update %s: staging %d of %s from %s", update_id, answer.id, version, source)
        self._stagings.setdefault(answer.id, []).append(update_id)
        self._update_status(update_id, "staging", version, None)

    def hub_base(self) -> str:
        """The hub's http(s) base as this host reaches it: the agent URL without its /api/v1/agent
        (a hub behind a proxy under a path keeps that path), with http(s) for ws(s)."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/").removesuffix(AGENT_PATH)
        return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, path, "", ""))

    def _update_completed(self, staging: int, ok: bool, result: dict[str, Any]) -> None:
        """The daemon's completion callback, from whichever thread ends a staging."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._staging_ended, staging, ok, result)

    def _staging_ended(self, staging: int, ok: bool, result: dict[str, Any]) -> None:
        state = result.get("state") if result.get("state") in ("staged", "failed", "cancelled") else None
        detail = None if ok else str(result.get("error") or result.get("message") or "the daemon gave no reason")
        # none for a staging of the host's own admin that no update of the hub's joined
        for update_id in self._stagings.pop(staging, []):
            last = self._updates[update_id]
            self._update_status(update_id, state or ("staged" if ok else "failed"), last["version"], detail)

    def _update_status(self, update_id: str, state: str, version: str, detail: str | None) -> None:
        """Queue an update's state for the hub (kept, to answer a repeat of the update with it)."""
        if detail is not None and len(detail) > MAX_UPDATE_DETAIL:
            detail = detail[: MAX_UPDATE_DETAIL - 3] + "..."
        status = {"type": "update_status", "update": update_id, "state": state, "version": version, "detail": detail}
        self._updates[update_id] = status
        self._outgoing.put_nowait(status)
        self.wake()


def command_flags(command: dict[str, Any]) -> int:
    """A hub command's job flags (dry run, no snapshot, restore), as Apply's: an integer of known bits.
    JSON's true is an int to Python, and would be taken as dry run: refused like any other non-integer."""
    flags = command.get("flags", 0)
    if not isinstance(flags, int) or isinstance(flags, bool):
        raise TypeError(f"flags: must be an integer, got {json_type(flags)}")
    check_flags(flags)
    return flags
