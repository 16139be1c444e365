"""rastosd on the bus: the objects it exports (org.rastos.Daemon1's root and its jobs), wired to the
core (daemon/core.py).

Read-only methods answer from memory or the database. Mutating methods first establish that the caller
may (`Callers.authorize`: root, then polkit or the admin group), validate every argument, then act;
long work becomes a job.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sdbus import (
    DbusObjectManagerInterfaceAsync,
    SdBus,
    dbus_method_async_override,
    dbus_property_async_override,
)

from daemon.bus.callers import Callers
from daemon.bus.errors import guarded
from daemon.bus.interfaces import (
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    UPDATES_INTERFACE,
    HubInterface,
    JobInterface,
    ManagerInterface,
    SnapshotsInterface,
    UpdatesInterface,
    job_path,
)
from daemon.core import Daemon
from daemon.errors import InvalidParams, NoSuchJob
from daemon.jobs import Job, check_flags, parse_params
from daemon.snapshots import check_description
from ops import OPS
from ops.params import INT_MAX, json_schema
from ops.steps import parse_steps, step_from
from rastos import __version__

KEEP_FINISHED_JOB_OBJECTS = 32  # finished jobs stay on the bus this long so late clients read Result
MAX_EVENTS = 10000
MAX_LISTED_JOBS = 100


def emit_changed(obj: Any, interface: str, name: str, signature: str, value: Any) -> None:
    obj.properties_changed.emit((interface, {name: (signature, value)}, []))


class JobObject(JobInterface):
    def __init__(self, face: BusFace, job: Job) -> None:
        super().__init__()
        self._face = face
        self._daemon = face.daemon
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
        caller = await self._face.callers.authorize("Job.Cancel")
        self._daemon.jobs.cancel(self.job.id, caller.uid)


class RootObject(DbusObjectManagerInterfaceAsync, ManagerInterface, SnapshotsInterface, UpdatesInterface, HubInterface):
    def __init__(self, face: BusFace) -> None:
        super().__init__()
        self._face = face
        self._daemon = face.daemon

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
        caller = await self._face.callers.current()
        if self._face.callers.is_admin(caller):
            return await asyncio.to_thread(self._daemon.plan, op, params_json)
        # Anyone may plan, and a plan may read many files or run a program: other users' plans,
        # parsing included, take turns on a thread of their own, so they cannot crowd out root's.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._face.open_plans, self._daemon.plan, op, params_json)

    @dbus_method_async_override()
    @guarded
    async def list_jobs(self) -> list[tuple[int, str, str, float, str]]:
        exported = self._face.job_objects
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
        await self._face.callers.authorize("Manager.ComplianceScan", refusal="reads /etc/shadow and users' keys")
        from daemon.compliance import scan  # 65 checks, imported when first asked for, not at every start
        from daemon.compliance.report import to_json

        report = await asyncio.to_thread(scan, self._daemon.target)  # sshd -T, many files: off the loop
        return json.dumps(to_json(report))

    # Manager: mutating methods

    @dbus_method_async_override()
    @guarded
    async def apply(self, op: str, params_json: str, flags: int) -> str:
        caller = await self._face.callers.authorize("Manager.Apply")
        check_flags(flags)
        step = step_from(self._daemon.target, op, parse_params(params_json), "")
        job = self._daemon.jobs.submit("apply", [step], flags, caller.uid, "Apply")
        return job_path(job.id)

    @dbus_method_async_override()
    @guarded
    async def run_pipeline(self, steps_json: str, flags: int) -> str:
        caller = await self._face.callers.authorize("Manager.RunPipeline")
        check_flags(flags)
        steps = parse_steps(self._daemon.target, steps_json)
        job = self._daemon.jobs.submit("pipeline", steps, flags, caller.uid, "RunPipeline")
        return job_path(job.id)

    @dbus_method_async_override()
    @guarded
    async def confirm(self, job_id: int) -> None:
        caller = await self._face.callers.authorize("Manager.Confirm")
        await self._daemon.settled.wait()
        self._daemon.jobs.confirmations.confirm(job_id, caller.uid)

    # Snapshots

    @dbus_method_async_override()
    @guarded
    async def list_snapshots(self) -> list[tuple[int, float, str, str, int, int, bool]]:
        await self._daemon.settled.wait()
        rows = await asyncio.to_thread(self._daemon.require_snapshots().existing)
        return [(r.id, r.created, r.description, r.kind, r.job_id or 0, r.pre_id or 0, r.known_good) for r in rows]

    @dbus_method_async_override()
    @guarded
    async def create_snapshot(self, description: str) -> int:
        caller = await self._face.callers.authorize("Snapshots.Create")
        await self._daemon.settled.wait()
        check_description(description)
        snapshots = self._daemon.require_snapshots()
        return await asyncio.to_thread(snapshots.create, description, "manual", uid=caller.uid, method="Create")

    @dbus_method_async_override()
    @guarded
    async def delete_snapshot(self, snapshot_id: int) -> None:
        caller = await self._face.callers.authorize("Snapshots.Delete")
        await self._daemon.settled.wait()
        snapshots = self._daemon.require_snapshots()
        booted = self._daemon.booted_snapshot
        await asyncio.to_thread(snapshots.delete, snapshot_id, uid=caller.uid, method="Delete", booted_snapshot=booted)

    @dbus_method_async_override()
    @guarded
    async def rollback(self, snapshot_id: int) -> str:
        caller = await self._face.callers.authorize("Snapshots.Rollback")
        await self._daemon.settled.wait()
        entry = await asyncio.to_thread(self._daemon.prepare_rollback, snapshot_id)
        self._daemon.store.record(caller.uid, "Rollback", None, snapshot=snapshot_id, entry=entry)
        return entry

    @dbus_method_async_override()
    @guarded
    async def boot_once(self, snapshot_id: int) -> str:
        caller = await self._face.callers.authorize("Snapshots.BootOnce")
        await self._daemon.settled.wait()
        entry = await asyncio.to_thread(self._daemon.boot_once, snapshot_id)
        self._daemon.store.record(caller.uid, "BootOnce", None, snapshot=snapshot_id, entry=entry)
        return entry

    @dbus_method_async_override()
    @guarded
    async def mark_good(self) -> None:
        caller = await self._face.callers.authorize("Snapshots.MarkGood")
        await self._daemon.settled.wait()
        self._daemon.mark_good(caller.uid)
        # A boot known good is when what the updates before it left can go (retention).
        await asyncio.to_thread(self._daemon.collect_updates, "this boot was marked good")

    # Updates

    @dbus_method_async_override()
    @guarded
    async def stage_update(self, source: str, reboot: bool) -> int:
        caller = await self._face.callers.authorize("Updates.Stage")
        await self._daemon.settled.wait()
        updates = self._daemon.updates
        # Opening a path and recording the update touch the disk: off the loop.
        return await asyncio.to_thread(updates.stage, source, uid=caller.uid, method="Stage", reboot=reboot)

    @dbus_method_async_override()
    @guarded
    async def cancel_update(self) -> None:
        caller = await self._face.callers.authorize("Updates.Cancel")
        await self._daemon.settled.wait()
        self._daemon.updates.cancel(uid=caller.uid, method="Cancel")

    @dbus_method_async_override()
    @guarded
    async def get_update_status(self) -> str:
        await self._daemon.settled.wait()
        return json.dumps(self._daemon.updates.status())

    @dbus_property_async_override()
    def update_progress(self) -> tuple[str, int, int]:
        return self._daemon.updates.progress

    # Hub

    @dbus_method_async_override()
    @guarded
    async def join_hub(self, url: str, token: str, ca_pem: str) -> str:
        caller = await self._face.callers.authorize("Hub.Join")
        await self._daemon.settled.wait()
        joined = await self._daemon.join_hub(url, token, ca_pem, caller.uid)
        return json.dumps(joined.as_json())

    @dbus_method_async_override()
    @guarded
    async def get_hub_status(self) -> str:
        return json.dumps(self._daemon.hub_status())


def confirmation_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: row[key] for key in ("state", "deadline", "settled", "detail")} | {"paths": sorted(row["files"])}


@functools.cache
def published_ops() -> list[tuple[str, str, str]]:
    """The registry does not change while the daemon runs: its JSON Schemas are made once."""
    return [(op.name, op.description, json.dumps(json_schema(op.schema))) for op in OPS.values()]


class BusFace:
    """The daemon on the bus: the root object, one object per recent job, who calls; the core's
    listener. Methods come in through the objects above, changes go out as signals here."""

    def __init__(self, daemon: Daemon, bus: SdBus) -> None:
        self.daemon = daemon
        self.bus = bus
        self.callers = Callers(bus, daemon.config.admin_group)
        self.root = RootObject(self)
        self.job_objects: dict[int, JobObject] = {}
        self._finished: deque[int] = deque()
        self._hostname = daemon.hostname()
        self.open_plans = ThreadPoolExecutor(1, thread_name_prefix="open-plan")  # Plan() for non-admins
        daemon.listener = self
        daemon.updates.on_progress.append(self.update_progress_changed)
        daemon.updates.on_completed.append(self.update_completed)

    def update_progress_changed(self, progress: tuple[str, int, int]) -> None:
        emit_changed(self.root, UPDATES_INTERFACE, "Progress", "(stt)", progress)

    def update_completed(self, update_id: int, ok: bool, result: dict[str, Any]) -> None:
        self.root.update_completed.emit((update_id, ok, json.dumps(result)))

    def boot_state_changed(self) -> None:
        emit_changed(self.root, MANAGER_INTERFACE, "BootState", "a{ss}", self.daemon.boot_state().as_dbus())

    def fell_back(self, failed_entry: str, failed_root: str, booted_entry: str) -> None:
        self.root.boot_fallback.emit((failed_entry, failed_root, booted_entry))

    # What the core passes on

    def job_added(self, job: Job) -> None:
        job_object = JobObject(self, job)
        self.root.export_with_manager(job_path(job.id), job_object, self.bus)
        self.job_objects[job.id] = job_object
        self.root.job_new.emit((job.id, job_path(job.id), job.kind))

    def job_changed(self, job: Job, what: str) -> None:
        job_object = self.job_objects.get(job.id)
        if job_object is None:
            return
        value: Any = {"State": job.state, "Progress": job.progress, "Result": json.dumps(job.result)}[what]
        emit_changed(job_object, JOB_INTERFACE, what, {"State": "s", "Progress": "(us)", "Result": "s"}[what], value)

    def job_output(self, job: Job, step: int, line: str) -> None:
        if (job_object := self.job_objects.get(job.id)) is not None:
            job_object.output.emit(line)

    def job_finished(self, job: Job) -> None:
        job_object = self.job_objects[job.id]
        job_object.completed.emit((job.state, json.dumps(job.result)))
        self.root.job_removed.emit((job.id, job_path(job.id), job.kind, job.state))
        hostname = self.daemon.hostname()
        if hostname != self._hostname:
            self._hostname = hostname
            emit_changed(self.root, MANAGER_INTERFACE, "Hostname", "s", hostname)
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED_JOB_OBJECTS:
            old = self._finished.popleft()
            self.root.remove_managed_object(self.job_objects.pop(old))
            self.daemon.jobs.jobs.pop(old, None)
