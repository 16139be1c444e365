"""Jobs: Apply and RunPipeline return at once with a job; one worker runs jobs in order.

Pipeline semantics (docs/daemon.md says the same for users):
- Every step's params are validated before the job exists; one bad step refuses the whole pipeline.
- Steps run in order with `&&` semantics: the first step that fails stops the pipeline; later steps
  are `skipped`. A step whose plan is empty is `unchanged` and changes nothing.
- Before the first step that would change something, a read-only `pre` snapshot of the root is taken
  (unless FLAG_NO_SNAPSHOT); after the last step that ran, a `post` snapshot paired with it.
- With FLAG_RESTORE_ON_FAILURE, a failure puts every file that the steps so far changed back as it was
  in the pre snapshot (files the snapshot lacks are removed). Runtime state (the kernel's host name,
  /proc/sys) is not rolled back by this; it returns to the files' values at the next boot.
- FLAG_DRY_RUN changes nothing and takes no snapshot. Each step is planned against the state the
  earlier steps would leave: the steps are applied to a throwaway shadow of the root (ops/shadow.py),
  runtime actions (reloads, /proc/sys) planned but not carried out. Should the shadow be impossible
  (not root, no overlayfs), every step is planned against the system as it is and the result says so.
- A step's follow-ups (a service reload after its config changed) are recorded in the state store
  before its writes and run after them; a crash in between leaves them owed and the next start runs
  them (followups.py).
- Cancel() stops a queued job before it starts and a running one between steps; a step that has
  begun runs to its end (ops write files atomically), so nothing is left half-changed.
Jobs run one at a time: two concurrent Apply calls queue, they never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.confirm import Confirmations, capture
from daemon.errors import DaemonError, InvalidParams, JobNotCancellable, NoSuchJob
from daemon.followups import JobFollowUps
from daemon.snapshots import Snapshots
from daemon.store import DAEMON_UID, StateStore
from ops.base import Plan, execute
from ops.params import parse_json
from ops.shadow import shadow
from ops.steps import Step, run_step
from ops.target import Target
from rastos.errors import RastosError

log = logging.getLogger("rastosd.jobs")

FLAG_DRY_RUN = 1 << 0
FLAG_NO_SNAPSHOT = 1 << 1
FLAG_RESTORE_ON_FAILURE = 1 << 2
KNOWN_FLAGS = FLAG_DRY_RUN | FLAG_NO_SNAPSHOT | FLAG_RESTORE_ON_FAILURE
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
DESCRIPTION_LENGTH = 120  # with "before job N: " or "after job N: ... (cancelled)", at most 200
MAX_OUTPUT_LINES = 2000  # kept per step in the result; every line is also sent as a signal
MAX_LINE = 1000  # characters of one kept line
MAX_JOB_OUTPUT = 512 * 1024  # characters of output kept for a whole job: GetJob stays cheap for anyone


def check_flags(flags: int) -> None:
    if flags < 0:  # from a hub's JSON: D-Bus carries them unsigned
        raise InvalidParams("flags", f"must not be negative, got {flags}")
    if flags & ~KNOWN_FLAGS:
        raise InvalidParams(
            "flags", f"unknown bits {flags & ~KNOWN_FLAGS:#x}; known: dry-run 1, no-snapshot 2, restore 4"
        )


def parse_params(params_json: str, where: str = "params") -> object:
    return parse_json(params_json, where)


class JobListener(Protocol):
    """What the bus layer hears about jobs; always called on the event loop's thread."""

    def job_added(self, job: Job) -> None: ...
    def job_changed(self, job: Job, what: str) -> None: ...
    def job_output(self, job: Job, step: int, line: str) -> None: ...  # step: its index in the job
    def job_finished(self, job: Job) -> None: ...


@dataclass
class Job:
    id: int
    kind: str
    steps: list[Step]
    flags: int
    uid: int
    state: str = "queued"
    progress: tuple[int, str] = (0, "queued")
    result: dict[str, Any] = field(default_factory=dict)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    hub_command: str | None = None  # the hub's command this job carries out

    @property
    def description(self) -> str:
        """`pipeline user && ssh`: the ops in order, cut short after DESCRIPTION_LENGTH characters,
        since it names the job's snapshots (200 characters at most, as Create() allows) too."""
        text = f"{self.kind} {' && '.join(step.op.name for step in self.steps)}"
        if len(text) <= DESCRIPTION_LENGTH:
            return text
        more = f" && ... ({len(self.steps)} steps)"
        return text[: DESCRIPTION_LENGTH - len(more)].rsplit(" && ", 1)[0] + more


class JobManager:
    def __init__(
        self,
        target: Target,
        store: StateStore,
        snapshots: Snapshots | None,
        listener: JobListener,
        booted_snapshot: int | None,  # never cleaned up: the running root was made from it
    ) -> None:
        self.target = target
        self.store = store
        self.snapshots = snapshots
        self.listener = listener
        self.booted_snapshot = booted_snapshot
        self.jobs: dict[int, Job] = {}
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._current: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        # Held while a job runs and while a pending change is reverted: the two never interleave.
        self.run_lock = threading.Lock()
        self.confirmations = Confirmations(target, store, self.run_lock)

    def submit(
        self, kind: str, steps: list[Step], flags: int, uid: int, method: str, hub_command: str | None = None
    ) -> Job:
        """Record the job and queue it; the caller gets it back at once."""
        check_flags(flags)
        job_id = self.store.add_job(kind, [step.as_json() for step in steps], flags, uid, method, hub_command)
        job = Job(job_id, kind, steps, flags, uid, hub_command=hub_command)
        self.jobs[job_id] = job
        self.listener.job_added(job)
        self._queue.put_nowait(job)
        return job

    def get(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NoSuchJob(f"job {job_id} is not known to this daemon run") from None

    def cancel(self, job_id: int, uid: int) -> None:
        job = self.get(job_id)
        if job.state in FINAL_STATES:
            raise JobNotCancellable(f"job {job_id} is already {job.state}")
        self.store.record(uid, "Cancel", job_id, state=job.state)
        job.cancel_requested.set()
        if job.state == "queued":  # it has not started: it ends now, and the worker skips it
            self._finish(job, "cancelled", {"steps": [], "error": "cancelled before it started"})

    async def run_forever(self) -> None:
        while True:
            job = await self._queue.get()
            self._current = asyncio.ensure_future(asyncio.to_thread(self._run, job))
            try:
                await asyncio.shield(self._current)
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any one job
                log.exception("job %d: the worker failed", job.id)

    async def shutdown(self, timeout: float) -> None:
        """On stop: queued jobs are cancelled, the running one stops after its current step.
        The store must stay open until then, so the job's end is recorded, not left `running`."""
        for job in list(self.jobs.values()):
            if job.state == "queued":
                self.cancel(job.id, DAEMON_UID)
            elif job.state == "running":
                job.cancel_requested.set()
        if self._current is not None and not self._current.done():
            await asyncio.wait({self._current}, timeout=timeout)

    # Everything below runs on the worker thread; it talks to the loop only through notify.

    def notify(self, method: Callable[..., None], *args: Any) -> None:
        self._loop.call_soon_threadsafe(method, *args)

    def set_state(self, job: Job, state: str) -> None:
        job.state = state
        self.notify(self.listener.job_changed, job, "State")

    def set_progress(self, job: Job, percent: int, message: str) -> None:
        job.progress = (percent, message)
        self.notify(self.listener.job_changed, job, "Progress")

    def _run(self, job: Job) -> None:
        with self.run_lock:
            if job.state in FINAL_STATES:  # cancelled while it waited
                return
            self.store.set_job_state(job.id, "running")
            self.set_state(job, "running")
            runner = _PipelineRun(self, job)
            state, result = runner.run()
            self._finish(job, state, result)

    def _finish(self, job: Job, state: str, result: dict[str, Any]) -> None:
        result["state"] = state
        job.result = result
        self.store.set_job_state(job.id, state, result)
        job.progress = (100, state)
        job.state = state
        self.notify(self.listener.job_changed, job, "Progress")
        self.notify(self.listener.job_changed, job, "Result")
        self.notify(self.listener.job_changed, job, "State")
        self.notify(self.listener.job_finished, job)
        log.info("job %d (%s) %s", job.id, job.description, state, extra={"JOB_ID": job.id, "JOB_STATE": state})


class _PipelineRun:
    """One execution of a job's steps, with the semantics in this module's docstring."""

    def __init__(self, manager: JobManager, job: Job) -> None:
        self.manager = manager
        self.job = job
        self.dry_run = bool(job.flags & FLAG_DRY_RUN)
        self.snapshots = None if job.flags & FLAG_NO_SNAPSHOT else manager.snapshots
        self.pre_id: int | None = None
        self.target = manager.target  # a shadow of it during a dry run
        # Risky steps' files as they were, their ops, and the longest confirm_timeout among them.
        self.risky_files: dict[str, Any] = {}
        self.risky_ops: list[str] = []
        self.confirm_timeout = 0
        self.changed_paths: list[str] = []
        self.output_kept = 0  # characters of output kept in the result so far
        self.steps: list[dict[str, Any]] = [{"op": s.op.name, "state": "pending"} for s in job.steps]

    def run(self) -> tuple[str, dict[str, Any]]:
        if not self.dry_run or len(self.job.steps) == 1:
            return self._run_steps(self.manager.target, {})
        try:
            with shadow(self.manager.target) as shadow_target:
                return self._run_steps(shadow_target, {"planned_in_sequence": True})
        except RastosError as error:  # the shadow could not be made; a step's own failure is caught inside
            log.warning("job %d: dry run without a shadow: %s", self.job.id, error)
            self.steps = [{"op": s.op.name, "state": "pending"} for s in self.job.steps]
            note = f"each step planned against the system as it is (no shadow: {error})"
            return self._run_steps(self.manager.target, {"planned_in_sequence": False, "note": note})

    def _run_steps(self, target: Target, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.target = target
        state, error = "done", None
        for index, step in enumerate(self.job.steps):
            if self.job.cancel_requested.is_set():
                state, error = "cancelled", f"cancelled before step {index + 1}"
                self._skip_from(index)
                break
            total = len(self.job.steps)
            self.manager.set_progress(self.job, 100 * index // total, f"step {index + 1}/{total}: {step.op.name}")
            try:
                self._run_step(index, step)
            except Exception as failure:
                error = self._describe_failure(index, step, failure)
                state = "failed"
                self._skip_from(index + 1)
                break
        result: dict[str, Any] = {"steps": self.steps, "dry_run": self.dry_run, **extra}
        if error is not None:
            result["error"] = error
        self._after(state, result)
        restored = state == "failed" and bool(self.job.flags & FLAG_RESTORE_ON_FAILURE) and "restored" in result
        if self.risky_files and not restored:
            deadline = self.manager.confirmations.arm(
                self.job.id, self.risky_files, self.risky_ops, self.confirm_timeout
            )
            result["confirmation"] = {"deadline": deadline, "paths": sorted(self.risky_files),
                                      "confirm": f"rastosctl confirm {self.job.id}"}  # fmt: skip
        return state, result

    def _run_step(self, index: int, step: Step) -> None:
        record = self.steps[index]
        self.manager.store.set_step(self.job.id, index, "running")
        if self.dry_run:
            plan = step.op.plan(self.target, step.params)
            record["changes"] = [change.as_json() for change in plan.changes]
            if plan.actions and self.target.simulated:  # what the next step is planned against
                execute(plan, self.target, lambda line: None)
            record["state"] = "planned"
            self.manager.store.set_step(self.job.id, index, "planned", record)
            return
        output: list[str] = []
        plan = run_step(
            step,
            self.target,
            lambda line: self._output(output, index, line),
            before_changes=lambda plan: self._before_changes(step, plan, record, output),
            follow_ups=JobFollowUps(self.manager.store, self.job.id),
        )
        record["changes"] = [change.as_json() for change in plan.changes]
        record["state"] = "changed" if plan.actions else "unchanged"
        self.manager.store.set_step(self.job.id, index, record["state"], record)

    def _before_changes(self, step: Step, plan: Plan, record: dict[str, Any], output: list[str]) -> None:
        """The pre snapshot before the job's first change, and what a risky change may need back."""
        record["changes"] = [change.as_json() for change in plan.changes]
        if self.snapshots is not None and self.pre_id is None:
            self.pre_id = self.snapshots.create(
                f"before job {self.job.id}: {self.job.description}", "pre", uid=self.job.uid, method="Snapshot",
                job_id=self.job.id,
            )  # fmt: skip
        record["output"] = output
        record["state"] = "running"
        self.changed_paths += plan.paths
        timeout = int(step.params.get("confirm_timeout") or 0)
        if step.op.risky and timeout > 0:
            capture(self.target, plan.paths, self.risky_files)
            self.risky_ops += [step.op.name] if step.op.name not in self.risky_ops else []
            self.confirm_timeout = max(self.confirm_timeout, timeout)

    def _output(self, kept: list[str], step: int, line: str) -> None:
        shown = line if len(line) <= MAX_LINE else line[:MAX_LINE] + " (line cut)"
        if len(kept) < MAX_OUTPUT_LINES and self.output_kept + len(shown) <= MAX_JOB_OUTPUT:
            kept.append(shown)
            self.output_kept += len(shown)
        self.manager.notify(self.manager.listener.job_output, self.job, step, line)

    def _describe_failure(self, index: int, step: Step, failure: Exception) -> str:
        if isinstance(failure, DaemonError):
            message = str(failure)
        else:
            # Unexpected: the whole story goes to the journal, the caller gets the message only.
            log.error(
                "job %d step %d (%s) failed:\n%s", self.job.id, index, step.op.name, traceback.format_exc(),
                extra={"JOB_ID": self.job.id, "OP": step.op.name},
            )  # fmt: skip
            message = f"{type(failure).__name__}: {failure}"
        record = self.steps[index]
        record["state"] = "failed"
        record["error"] = message
        self.manager.store.set_step(self.job.id, index, "failed", record)
        return f"step {index + 1} ({step.op.name}) failed: {message}"

    def _skip_from(self, index: int) -> None:
        for position in range(index, len(self.steps)):
            self.steps[position]["state"] = "skipped"
            self.manager.store.set_step(self.job.id, position, "skipped", self.steps[position])

    def _after(self, state: str, result: dict[str, Any]) -> None:
        if self.snapshots is None or self.pre_id is None:
            return
        if state == "failed" and self.job.flags & FLAG_RESTORE_ON_FAILURE:
            result["restored"] = self.snapshots.restore_paths(self.pre_id, sorted(set(self.changed_paths)))
        post_id = self.snapshots.create(
            f"after job {self.job.id}: {self.job.description} ({state})", "post", uid=self.job.uid, method="Snapshot",
            job_id=self.job.id, pre_id=self.pre_id,
        )  # fmt: skip
        result["snapshots"] = {"pre": self.pre_id, "post": post_id}
        result["cleaned_up"] = self.snapshots.cleanup(booted_snapshot=self.manager.booted_snapshot)
