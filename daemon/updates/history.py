"""Which of rastosd's jobs the running root holds: the steps an update re-applies to a new tree.

The state store (on @rastos, shared by every deployment) keeps every job of the host, but a root holds
only some of them. The rule, read from the store as rastosd records it:

- A job ran on the root of its boot: the `boots` row with the latest start before the job started
  (rastosd records a boot, with its root subvolume, before it runs any job of that boot).
- A root holds the steps of the jobs that ran on it and ended `done`, dry runs aside, plus its base:
  - a rollback deployment (`@snapshots/N/deployment`, or `deployment@G`) or a read-only snapshot boot (`N/snapshot`)
    starts from snapshot N, which holds what the root it was taken from held at that moment: a `pre`
    snapshot of job J the jobs before J, a `post` snapshot the jobs up to J, a manual one the jobs
    finished before it was taken. Of a rollback deployment only the jobs since the `Rollback(N)`
    that made it count: a second rollback to N makes another anew from the snapshot, and a later
    one may take an earlier one's name again.
  - an image deployment (`@`, or `@deployments/VERSION`) starts from what was re-applied when it was
    made, recorded in its own tree (`RECORD`, carried into every snapshot of it); nothing for the
    first deployment a host was installed with.
- So a rollback to a snapshot taken before a job undoes that job once the host runs the rolled-back
  deployment; a rollback prepared but never booted, or one that fell back, undoes nothing. Jobs on
  another deployment (one left by a rollback, a read-only snapshot boot's memory) are not held.
- A job whose risky change was not confirmed in time and put back (`reverted`, or `revert-failed`,
  and a change folded into such a one: `superseded`) holds its other steps only. A change still
  waiting for its confirmation refuses the update: confirm it or let it revert first.

A store without any boot recorded (a database older than the boots table) cannot tell roots apart:
every job that succeeded counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from daemon.boot import rollback_generation, snapshot_of_root
from daemon.jobs import FLAG_DRY_RUN
from daemon.store import BootRow, JobRow, SnapshotRow, StateStore
from ops import OPS
from ops.errors import UnsafePath
from ops.rootfs import Root
from rastos.errors import RastosError

RECORD = "/usr/lib/rastos/carried.json"  # beside image.json: what this deployment was made of
RECORD_VERSION = 1
FOLDED = re.compile(r"^folded into job (\d+)$")  # store.add_confirmation's detail for a superseded change
UNDONE_CONFIRMATIONS = ("reverted", "revert-failed")
MAX_DEPTH = 1000  # snapshot ids fall along a chain; this only stops a store that lies from looping
MAX_REPORTED = 100  # jobs named as not held; the rest are counted


@dataclass(frozen=True, order=True)
class StepRef:
    job: int
    position: int  # 0-based, as the store keeps it


@dataclass(frozen=True)
class Cut:
    """The part of a root's jobs a snapshot of it holds."""

    time: float
    last_job: int | None  # pre of J: J - 1, post of J: J; a manual snapshot: by finish time

    @classmethod
    def of(cls, row: SnapshotRow) -> Cut:
        if row.job_id is None:
            return cls(row.created, None)
        return cls(row.created, row.job_id if row.kind == "post" else row.job_id - 1)

    def holds(self, job: JobRow) -> bool:
        if self.last_job is not None:
            return job.id <= self.last_job
        return job.finished is not None and job.finished <= self.time


@dataclass
class Held:
    steps: list[StepRef] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)  # the running root, then the roots it came from
    skipped: list[dict[str, Any]] = field(default_factory=list)  # steps and jobs not held, and why


def read_record(running: Root) -> list[StepRef]:
    """The steps re-applied when the running root's image deployment was made; [] for none."""
    try:
        text = running.read_text(RECORD)
    except UnsafePath as error:
        raise RastosError(f"cannot read what the running deployment was made of: {error}") from None
    if text is None:
        return []
    try:
        document = json.loads(text)
        if document.get("version") != RECORD_VERSION:
            raise ValueError(f"version {document.get('version')!r}, this rastosd reads {RECORD_VERSION}")
        return [StepRef(int(job), int(position)) for job, position in document["steps"]]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise RastosError(f"{RECORD} on the running root is not a record of carried steps: {error}") from None


def record_text(held: Held, running_subvolume: str) -> str:
    steps = [[ref.job, ref.position] for ref in held.steps]
    return json.dumps({"version": RECORD_VERSION, "made_from": running_subvolume, "steps": steps}, indent=1) + "\n"


class History:
    """The store's jobs, boots, snapshots and rollbacks, read once."""

    def __init__(self, store: StateStore, running_subvolume: str) -> None:
        self.store = store
        self.running = running_subvolume
        self.jobs = {job.id: job for job in store.all_jobs()}
        self.boots: list[BootRow] = store.boots()
        self.snapshots = {row.id: row for row in store.snapshot_history()}
        self.rollbacks: dict[int, list[float]] = {}
        for event in store.events_of("Rollback"):
            snapshot = event.detail.get("snapshot")
            if isinstance(snapshot, int):
                self.rollbacks.setdefault(snapshot, []).append(event.time)

    def root_at(self, when: float) -> str:
        if not self.boots:
            return self.running
        started = [boot for boot in self.boots if boot.started <= when]
        return (started[-1] if started else self.boots[0]).root

    def root_of(self, job: JobRow) -> str:
        return self.root_at(job.started if job.started is not None else job.created)

    def made_at(self, root: str, until: float) -> float:
        """When the incarnation of `root` that existed at `until` was made: a rollback deployment is
        made anew by each Rollback() to its snapshot; any other root is made once."""
        snapshot = snapshot_of_root(root)
        if snapshot is None or rollback_generation(root) is None:
            return float("-inf")
        times = [when for when in self.rollbacks.get(snapshot, []) if when <= until]
        return max(times, default=float("-inf"))


def held_steps(store: StateStore, running: Root, running_subvolume: str) -> Held:
    """The steps the running root holds, in the order they ran (module docstring)."""
    history = History(store, running_subvolume)
    held = Held()
    if not history.boots:
        jobs = [job for job in history.jobs.values() if _succeeded(job)]
        refs = read_record(running) + [ref for job in jobs for ref in _job_steps(history, job, held)]
        held.steps = list(dict.fromkeys(refs))
        held.chain = [running_subvolume]
        return held
    held.steps = list(dict.fromkeys(_root_steps(history, running, running_subvolume, None, held, 0)))
    _note_not_held(history, held)
    return held


def _root_steps(history: History, running: Root, root: str, cut: Cut | None, held: Held, depth: int) -> list[StepRef]:
    if depth > MAX_DEPTH:
        raise RastosError(f"the state store's snapshots form no chain back to an image deployment from {root}")
    held.chain.append(root)
    snapshot = snapshot_of_root(root)
    if snapshot is None:
        base = read_record(running)
        missing = sorted({ref.job for ref in base} - set(history.jobs))
        if missing:
            raise RastosError(
                f"the running deployment was made with jobs {', '.join(map(str, missing))} re-applied, which the "
                "state store no longer has",
                hint="the state store in /var/lib/rastos was replaced; re-apply the host's state by hand",
            )
    else:
        row = history.snapshots.get(snapshot)
        if row is None:
            raise RastosError(f"{root} was made from snapshot {snapshot}, which the state store never recorded")
        job = history.jobs.get(row.job_id) if row.job_id is not None else None
        parent = history.root_of(job) if job is not None else history.root_at(row.created)
        base = _root_steps(history, running, parent, Cut.of(row), held, depth + 1)
    until = cut.time if cut is not None else float("inf")
    since = history.made_at(root, until)
    own = [
        job
        for job in history.jobs.values()
        if _succeeded(job)
        and history.root_of(job) == root
        and (job.started or job.created) >= since
        and (cut is None or cut.holds(job))
    ]
    return base + [ref for job in own for ref in _job_steps(history, job, held)]


def _succeeded(job: JobRow) -> bool:
    return job.state == "done" and not job.flags & FLAG_DRY_RUN


def _job_steps(history: History, job: JobRow, held: Held) -> list[StepRef]:
    """The job's steps, less the risky ones whose change was put back for want of a confirmation."""
    state, settled_by = _confirmation_outcome(history.store, job.id)
    if state == "pending":
        raise RastosError(
            f"job {job.id}'s change waits for its confirmation: the update would keep it whatever happens next",
            hint=f"rastosctl confirm {job.id}, or let it revert, then stage the update again",
        )
    refs = []
    for position, step in enumerate(history.store.steps(job.id)):
        if state in UNDONE_CONFIRMATIONS and _confirmable(step):
            reason = f"its change was not confirmed in time and put back ({state}, job {settled_by})"
            held.skipped.append({"job": job.id, "step": position + 1, "op": step["op"], "reason": reason})
            continue
        refs.append(StepRef(job.id, position))
    return refs


def _confirmation_outcome(store: StateStore, job_id: int) -> tuple[str | None, int]:
    """How the job's pending change ended (None: it had none), following changes folded into later ones."""
    seen = set()
    while job_id not in seen:
        seen.add(job_id)
        row = store.confirmation(job_id)
        if row is None:
            return None, job_id
        match = FOLDED.match(row["detail"] or "")
        if row["state"] != "superseded" or match is None:
            return str(row["state"]), job_id
        job_id = int(match.group(1))
    return None, job_id


def _confirmable(step: dict[str, Any]) -> bool:
    """A step whose files a confirmation kept (jobs.py captures exactly these)."""
    op = OPS.get(step["op"])
    return op is not None and op.risky and int(step["params"].get("confirm_timeout") or 0) > 0


def _note_not_held(history: History, held: Held) -> None:
    """Jobs that succeeded on this host whose changes the running root does not hold, and jobs that
    failed or were cancelled after changing something: named, so nobody wonders where they went."""
    held_jobs = {ref.job for ref in held.steps} | {entry["job"] for entry in held.skipped}
    elsewhere = "not in the running root: rolled back, or run on another deployment"
    notes = []
    for job in history.jobs.values():
        if job.id in held_jobs or job.flags & FLAG_DRY_RUN:
            continue
        if job.state == "done":
            notes.append({"job": job.id, "reason": elsewhere})
        elif _unfinished_change(history, job, held):
            restored = " (its changes were restored)" if job.result and "restored" in job.result else ""
            notes.append({"job": job.id, "reason": f"it {job.state} after changing something{restored}"})
    held.skipped += notes[:MAX_REPORTED]
    if len(notes) > MAX_REPORTED:
        held.skipped.append({"job": None, "reason": f"and {len(notes) - MAX_REPORTED} more jobs not held"})


def _unfinished_change(history: History, job: JobRow, held: Held) -> bool:
    """A job on a root the running one came from that ended early after changing something."""
    if job.state not in ("failed", "cancelled", "interrupted") or history.root_of(job) not in held.chain:
        return False
    return any(step["state"] == "changed" for step in history.store.steps(job.id))
