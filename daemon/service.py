"""rastosd: the objects on the bus, wired to the job manager, the snapshots and the state store.

Read-only methods answer from memory or the database. Mutating methods first establish the caller
(`Callers.require_admin`), validate every argument, then act; long work becomes a job.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import btrfsutil
from sdbus import (
    DbusObjectManagerInterfaceAsync,
    SdBus,
    dbus_method_async_override,
    dbus_property_async_override,
    sd_bus_open_system,
)

from daemon.boot import (
    BootEntries,
    BootState,
    Fallback,
    booted_entry_blessed,
    current_boot_id,
    find_fallback,
    overlay_boot,
    read_loader_variable,
    snapshot_of_root,
)
from daemon.bus.callers import Callers
from daemon.bus.errors import guarded
from daemon.bus.interfaces import (
    BUS_NAME,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    ROOT_PATH,
    JobInterface,
    ManagerInterface,
    SnapshotsInterface,
    job_path,
)
from daemon.config import DaemonConfig
from daemon.errors import (
    BootConfigError,
    InvalidParams,
    NoSuchJob,
    NotPermitted,
    SnapshotProtected,
    SnapshotsUnavailable,
)
from daemon.failpoints import failpoint
from daemon.followups import run_owed
from daemon.hub_link import HubLink, load_settings
from daemon.jobs import Job, JobManager, check_flags, parse_params
from daemon.snapshots import SnapshotLayout, Snapshots, subvolume_path
from daemon.store import StateStore
from ops import OPS
from ops.base import Target
from ops.params import INT_MAX, json_schema
from ops.steps import parse_steps, step_from
from rastos import __version__
from rastos.errors import CommandError, RastosError
from rastos.process import run

log = logging.getLogger("rastosd")

KEEP_FINISHED_JOB_OBJECTS = 32  # finished jobs stay on the bus this long so late clients read Result
MAX_EVENTS = 10000
MAX_LISTED_JOBS = 100
STOP_TIMEOUT = 100.0  # a running step may finish; below the unit's TimeoutStopSec=120s


def emit_changed(obj: Any, interface: str, name: str, signature: str, value: Any) -> None:
    obj.properties_changed.emit((interface, {name: (signature, value)}, []))


class JobObject(JobInterface):
    def __init__(self, daemon: Daemon, job: Job) -> None:
        super().__init__()
        self._daemon = daemon
        self.job = job

    @dbus_property_async_override()
    def id(self) -> int:
        return self.job.id

    @dbus_property_async_override()
    def kind(self) -> str:
        return self.job.kind

    @dbus_property_async_override()
    def description(self) -> str:
        return self.job.description

    @dbus_property_async_override()
    def state(self) -> str:
        return self.job.state

    @dbus_property_async_override()
    def progress(self) -> tuple[int, str]:
        return self.job.progress

    @dbus_property_async_override()
    def result(self) -> str:
        return json.dumps(self.job.result) if self.job.result else ""

    @dbus_method_async_override()
    @guarded
    async def cancel(self) -> None:
        caller = await self._daemon.callers.require_admin("Cancel")
        self._daemon.jobs.cancel(self.job.id, caller.uid)


class RootObject(DbusObjectManagerInterfaceAsync, ManagerInterface, SnapshotsInterface):
    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self._daemon = daemon

    # Manager: properties

    @dbus_property_async_override()
    def version(self) -> str:
        return __version__

    @dbus_property_async_override()
    def hostname(self) -> str:
        return self._daemon.hostname()

    @dbus_property_async_override()
    def boot_state(self) -> dict[str, str]:
        return self._daemon.boot_state().as_dbus()

    # Manager: read-only methods

    @dbus_method_async_override()
    @guarded
    async def list_ops(self) -> list[tuple[str, str, str]]:
        return published_ops()

    @dbus_method_async_override()
    @guarded
    async def plan(self, op: str, params_json: str) -> str:
        caller = await self._daemon.callers.current()
        if self._daemon.callers.is_admin(caller):
            return await asyncio.to_thread(self._daemon.plan, op, params_json)
        # Anyone may plan, and a plan may read many files or run a program: other users' plans,
        # parsing included, take turns on a thread of their own, so they cannot crowd out root's.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._daemon.open_plans, self._daemon.plan, op, params_json)

    @dbus_method_async_override()
    @guarded
    async def list_jobs(self) -> list[tuple[int, str, str, float, str]]:
        exported = self._daemon.job_objects
        return [
            (job_id, kind, state, created, job_path(job_id) if job_id in exported else "/")
            for job_id, kind, state, created in self._daemon.store.job_list(MAX_LISTED_JOBS)
        ]

    @dbus_method_async_override()
    @guarded
    async def get_job(self, job_id: int) -> str:
        row = self._daemon.store.job(job_id)
        if row is None:
            raise NoSuchJob(f"id: no job {job_id}")
        document = {
            "id": row.id, "kind": row.kind, "state": row.state, "flags": row.flags, "uid": row.uid,
            "created": row.created, "started": row.started, "finished": row.finished,
            "steps": self._daemon.store.steps(job_id), "result": row.result,
            "confirmation": confirmation_summary(self._daemon.store.confirmation(job_id)),
        }  # fmt: skip
        return json.dumps(document)

    @dbus_method_async_override()
    @guarded
    async def get_event_log(self, since: int, limit: int) -> list[tuple[int, float, int, str, int, str]]:
        if not 1 <= limit <= MAX_EVENTS:
            raise InvalidParams("limit", f"must be between 1 and {MAX_EVENTS}, got {limit}")
        if since > INT_MAX:  # event ids are SQLite's 64-bit integers: none is above this
            raise InvalidParams("since", f"must be at most {INT_MAX}, got {since}")
        return self._daemon.store.event_log(since, limit)

    @dbus_method_async_override()
    @guarded
    async def check_health(self) -> list[str]:
        return await asyncio.to_thread(self._daemon.health_problems)

    @dbus_method_async_override()
    @guarded
    async def compliance_scan(self) -> str:
        try:
            await self._daemon.callers.require_admin("ComplianceScan")
        except NotPermitted:
            group = self._daemon.config.admin_group
            raise NotPermitted(
                f"ComplianceScan reads /etc/shadow and users' keys: only root or members of group {group!r} may call it"
            ) from None
        from daemon.compliance import scan  # 65 checks, imported when first asked for, not at every start
        from daemon.compliance.report import to_json

        report = await asyncio.to_thread(scan, self._daemon.target)  # sshd -T, many files: off the loop
        return json.dumps(to_json(report))

    # Manager: mutating methods

    @dbus_method_async_override()
    @guarded
    async def apply(self, op: str, params_json: str, flags: int) -> str:
        caller = await self._daemon.callers.require_admin("Apply")
        check_flags(flags)
        step = step_from(self._daemon.target, op, parse_params(params_json), "")
        job = self._daemon.jobs.submit("apply", [step], flags, caller.uid, "Apply")
        return job_path(job.id)

    @dbus_method_async_override()
    @guarded
    async def run_pipeline(self, steps_json: str, flags: int) -> str:
        caller = await self._daemon.callers.require_admin("RunPipeline")
        check_flags(flags)
        steps = parse_steps(self._daemon.target, steps_json)
        job = self._daemon.jobs.submit("pipeline", steps, flags, caller.uid, "RunPipeline")
        return job_path(job.id)

    @dbus_method_async_override()
    @guarded
    async def confirm(self, job_id: int) -> None:
        caller = await self._daemon.callers.require_admin("Confirm")
        self._daemon.jobs.confirmations.confirm(job_id, caller.uid)

    # Snapshots

    @dbus_method_async_override()
    @guarded
    async def list_snapshots(self) -> list[tuple[int, float, str, str, int, int, bool]]:
        rows = await asyncio.to_thread(self._daemon.require_snapshots().existing)
        return [(r.id, r.created, r.description, r.kind, r.job_id or 0, r.pre_id or 0, r.known_good) for r in rows]

    @dbus_method_async_override()
    @guarded
    async def create_snapshot(self, description: str) -> int:
        caller = await self._daemon.callers.require_admin("Create")
        check_description(description)
        snapshots = self._daemon.require_snapshots()
        return await asyncio.to_thread(snapshots.create, description, "manual", uid=caller.uid, method="Create")

    @dbus_method_async_override()
    @guarded
    async def delete_snapshot(self, snapshot_id: int) -> None:
        caller = await self._daemon.callers.require_admin("Delete")
        snapshots = self._daemon.require_snapshots()
        booted = self._daemon.booted_snapshot
        await asyncio.to_thread(snapshots.delete, snapshot_id, uid=caller.uid, method="Delete", booted_snapshot=booted)

    @dbus_method_async_override()
    @guarded
    async def rollback(self, snapshot_id: int) -> str:
        caller = await self._daemon.callers.require_admin("Rollback")
        entry = await asyncio.to_thread(self._daemon.prepare_rollback, snapshot_id)
        self._daemon.store.record(caller.uid, "Rollback", None, snapshot=snapshot_id, entry=entry)
        return entry

    @dbus_method_async_override()
    @guarded
    async def boot_once(self, snapshot_id: int) -> str:
        caller = await self._daemon.callers.require_admin("BootOnce")
        entry = await asyncio.to_thread(self._daemon.boot_once, snapshot_id)
        self._daemon.store.record(caller.uid, "BootOnce", None, snapshot=snapshot_id, entry=entry)
        return entry

    @dbus_method_async_override()
    @guarded
    async def mark_good(self) -> None:
        caller = await self._daemon.callers.require_admin("MarkGood")
        self._daemon.mark_good(caller.uid)


def confirmation_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: row[key] for key in ("state", "deadline", "settled", "detail")} | {"paths": sorted(row["files"])}


@functools.cache
def published_ops() -> list[tuple[str, str, str]]:
    """The registry does not change while the daemon runs: its JSON Schemas are made once."""
    return [(op.name, op.description, json.dumps(json_schema(op.schema))) for op in OPS.values()]


def check_description(description: str) -> None:
    if not 1 <= len(description) <= 200:
        raise InvalidParams("description", f"must be 1 to 200 characters, got {len(description)}")
    if not description.isprintable():
        raise InvalidParams("description", "must be one line of printable characters")


class Daemon:
    """Everything one rastosd process holds; also the job manager's listener."""

    def __init__(self, config: DaemonConfig, bus: SdBus) -> None:
        self.config = config
        self.bus = bus
        self.target = Target(config.root, runtime=config.root_runtime)
        self.store = StateStore(config.database)
        self.entries = BootEntries(config.esp, config.boot_tries)
        self.boot_id = current_boot_id()
        self._booted_entry = config.booted_entry or read_loader_variable("LoaderEntrySelected") or ""
        self.fallback = self._find_fallback()
        # A read-only snapshot boot runs on an overlay: its root is named by the kernel command line.
        self.overlay_root = overlay_boot(config.boot_cmdline())
        layout = SnapshotLayout(config.root, config.snapshot_directory)
        self.snapshots: Snapshots | None = Snapshots(layout, self.store, config.keep_pairs, self.entries)
        try:
            self.snapshots.check_available(root=self.overlay_root is None)
        except SnapshotsUnavailable as error:
            log.warning("snapshots are off: %s", error)
            self.snapshots = None
        self.root_subvolume = self._read_root_subvolume()
        if self.snapshots is not None:
            self.snapshots.running_root = self.root_subvolume
            if self.overlay_root is not None:
                self.snapshots.refusal = (
                    f"this boot runs the read-only snapshot {self.overlay_root} under an overlay in memory, so "
                    "nothing here is kept to snapshot: boot a deployment, or roll back to this snapshot first"
                )
        # What the root was made from is fixed for this boot: derived once, not per call.
        self.booted_snapshot = snapshot_of_root(self.root_subvolume)
        self.callers = Callers(bus, config.admin_group)
        self.root = RootObject(self)
        self.jobs = JobManager(self.target, self.store, self.snapshots, self, self.booted_snapshot)
        self.job_objects: dict[int, JobObject] = {}
        self._finished: deque[int] = deque()
        self._hostname = self.hostname()
        self.hub: HubLink | None = None
        self.open_plans = ThreadPoolExecutor(1, thread_name_prefix="open-plan")  # Plan() for non-admins

    def _read_root_subvolume(self) -> str:
        if self.overlay_root is not None:
            return self.overlay_root
        if self.snapshots is None:
            return ""
        return subvolume_path(self.config.root)

    # State the properties show

    def hostname(self) -> str:
        name = (self.target.read_text("/etc/hostname") or "").strip()
        return name or socket.gethostname()

    def boot_state(self) -> BootState:
        entry = self._booted_entry
        if self.store.boot_marked_good(self.boot_id) or booted_entry_blessed(self.config.esp, entry):
            health = "good"
        else:
            health = "pending" if entry else "unknown"
        return BootState(self.root_subvolume, self.booted_snapshot, entry, health, self.fallback)

    def _find_fallback(self) -> Fallback | None:
        try:
            return find_fallback(self.entries, self._booted_entry)
        except (BootConfigError, OSError) as error:
            log.warning("cannot tell whether this boot fell back: %s", error)
            return None

    def report_fallback(self) -> None:
        """Once per boot: the event log, the journal and a signal say what failed and what booted."""
        if self.fallback is None:
            return
        failed, root = self.fallback.failed_entry, self.fallback.failed_root
        if self.store.record_fallback(self.boot_id, failed, root):
            log.warning("boot fell back: %s (root %s) used up its tries; booted %s", failed, root, self._booted_entry)
        self.root.boot_fallback.emit((failed, root, self._booted_entry))

    def reconcile(self) -> None:
        """Once per start: repair what a crash or power cut between two steps left (snapshots.py)."""
        if self.snapshots is None:
            return
        try:
            done = self.snapshots.reconcile(self.booted_snapshot)
        except (OSError, btrfsutil.BtrfsUtilError) as error:
            log.error("cannot reconcile snapshots and boot entries: %s", error)
            return
        for action in done:
            log.warning("reconciled: %s", action)
        if done:
            self.store.record(0, "Reconcile", None, actions=done)

    def health_problems(self) -> list[str]:
        """What makes this boot not good: a critical unit that failed. (That the daemon answers is
        the first check, made by calling this at all.)"""
        problems = []
        for unit in self.config.critical_units:
            state = run(["systemctl", "is-failed", unit], check=False, capture=True).stdout.strip()
            if state == "failed":
                problems.append(f"critical unit {unit} failed")
        return problems

    def plan(self, op: str, params_json: str) -> str:
        step = step_from(self.target, op, parse_params(params_json), "")
        return json.dumps(step.op.plan(self.target, step.params).as_json())

    def require_snapshots(self) -> Snapshots:
        if self.snapshots is None:
            raise SnapshotsUnavailable(f"snapshots are off: {self.config.root} is not a btrfs subvolume")
        return self.snapshots

    def prepare_rollback(self, snapshot_id: int) -> str:
        snapshots = self.require_snapshots()
        row = snapshots.get(snapshot_id)
        if self.booted_snapshot == snapshot_id and self.overlay_root is None:
            raise SnapshotProtected(f"snapshot {snapshot_id}: the running system was booted from it already")
        deployment = snapshots.make_deployment(snapshot_id)
        failpoint("deployment-made")
        try:
            entry = self.entries.add_for_snapshot(
                snapshot_id, row.description, subvolume_path(deployment), self.root_subvolume, row.created
            )
        except BaseException:
            snapshots.remove_deployment(snapshot_id)  # no deployment without its entry
            raise
        failpoint("entry-written")
        return entry

    def boot_once(self, snapshot_id: int) -> str:
        """Boot the snapshot's read-only entry on the next boot only (systemd-boot's one-shot entry):
        the boot after that is the default one again, whatever happened."""
        entry = self.require_snapshots().ensure_menu_entry(snapshot_id)
        try:
            run(["bootctl", "set-oneshot", entry], capture=True)
        except CommandError as error:
            raise BootConfigError(f"cannot make {entry} the next boot's entry: {error.output_tail or error}") from None
        except RastosError as error:  # bootctl is missing
            raise BootConfigError(f"cannot make {entry} the next boot's entry: {error}") from None
        log.info("the next boot (only) starts %s", entry, extra={"SNAPSHOT": snapshot_id})
        return entry

    def mark_good(self, uid: int) -> None:
        newest = None
        if self.snapshots is not None and (rows := self.snapshots.existing()):
            newest = rows[-1].id
        self.store.mark_known_good(newest, uid, self.boot_id)
        emit_changed(self.root, MANAGER_INTERFACE, "BootState", "a{ss}", self.boot_state().as_dbus())

    # JobListener

    def job_added(self, job: Job) -> None:
        job_object = JobObject(self, job)
        self.root.export_with_manager(job_path(job.id), job_object, self.bus)
        self.job_objects[job.id] = job_object
        self.root.job_new.emit((job.id, job_path(job.id), job.kind))

    def job_changed(self, job: Job, what: str) -> None:
        if what == "State" and self.hub is not None:
            self.hub.job_changed(job)
        job_object = self.job_objects.get(job.id)
        if job_object is None:
            return
        value: Any = {"State": job.state, "Progress": job.progress, "Result": json.dumps(job.result)}[what]
        emit_changed(job_object, JOB_INTERFACE, what, {"State": "s", "Progress": "(us)", "Result": "s"}[what], value)

    def job_output(self, job: Job, line: str) -> None:
        if (job_object := self.job_objects.get(job.id)) is not None:
            job_object.output.emit(line)

    def job_finished(self, job: Job) -> None:
        job_object = self.job_objects[job.id]
        job_object.completed.emit((job.state, json.dumps(job.result)))
        self.root.job_removed.emit((job.id, job_path(job.id), job.kind, job.state))
        hostname = self.hostname()
        if hostname != self._hostname:
            self._hostname = hostname
            emit_changed(self.root, MANAGER_INTERFACE, "Hostname", "s", hostname)
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED_JOB_OBJECTS:
            old = self._finished.popleft()
            self.root.remove_managed_object(self.job_objects.pop(old))
            self.jobs.jobs.pop(old, None)


async def serve(config: DaemonConfig) -> None:
    if config.bus_address is not None:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = config.bus_address  # sd-bus reads it when it connects
    bus = sd_bus_open_system()
    daemon = Daemon(config, bus)
    interrupted = daemon.store.interrupt_unfinished_jobs()
    if interrupted:
        log.warning("jobs interrupted when rastosd last stopped: %s", ", ".join(map(str, interrupted)))
    daemon.store.record_boot(daemon.boot_id, daemon.root_subvolume)
    daemon.reconcile()
    await asyncio.to_thread(run_owed, daemon.store, daemon.target)
    daemon.jobs.confirmations.resume()
    daemon.root.export_to_dbus(ROOT_PATH, bus)
    await bus.request_name_async(BUS_NAME, 0)
    daemon.report_fallback()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker = asyncio.create_task(daemon.jobs.run_forever())
    watchdog = asyncio.create_task(_watchdog())
    link = None
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    settings = load_settings(config.hub_url, config.hub_token_file, Path(credentials) if credentials else None)
    if settings is not None:
        daemon.hub = HubLink(daemon, settings)
        link = asyncio.create_task(daemon.hub.run_forever())
    _notify(f"READY=1\nSTATUS=serving {BUS_NAME}; {len(OPS)} ops; snapshots {'on' if daemon.snapshots else 'off'}")
    log.info("rastosd %s serving %s (root %s)", __version__, BUS_NAME, config.root)
    await stop.wait()
    _notify("STOPPING=1")
    log.info("stopping")
    await daemon.jobs.shutdown(STOP_TIMEOUT)
    watchdog.cancel()
    worker.cancel()
    if link is not None:
        link.cancel()
    daemon.store.close()


async def _watchdog() -> None:
    """Ping systemd's watchdog from the event loop: a loop that hangs stops the pings."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0 or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    while True:
        _notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2 / 1_000_000)


def _notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as systemd_daemon

    try:
        systemd_daemon.notify(message)
    except OSError as error:  # the manager went away; serving matters more than telling it
        log.debug("sd_notify %r failed: %s", message.split("=")[0], error)
