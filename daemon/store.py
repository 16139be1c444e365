"""The daemon's state: SQLite in WAL mode, schema versioned by `PRAGMA user_version` with migrations.

Every mutation the daemon makes is recorded in `events` with time, the caller's uid, the method and the
job, in the same transaction as the change it describes. Writes are synchronous=FULL: a SIGKILL or a
power cut loses nothing that a caller was told had happened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import UpdateFailed
from daemon.store_schema import MIGRATIONS

ACTIVE_STATES = ("queued", "running")
DAEMON_UID = 0  # events the daemon records on its own behalf (start-up recovery, retention)


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    request: list[dict[str, Any]]
    flags: int
    uid: int
    state: str
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None
    hub_command: str | None = None


@dataclass(frozen=True)
class SnapshotRow:
    id: int
    created: float
    description: str
    kind: str
    job_id: int | None
    pre_id: int | None
    known_good: bool


@dataclass(frozen=True)
class BootRow:
    boot_id: str
    started: float  # when rastosd first started in this boot: before any job of the boot ran
    root: str  # the root subvolume it ran on


@dataclass(frozen=True)
class UpdateRow:
    id: int
    uid: int
    source: str
    reboot: bool
    state: str
    version: str | None
    created: float
    finished: float | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class EventRow:
    id: int
    time: float
    uid: int
    method: str
    job_id: int | None
    detail: dict[str, Any]


class StateStore:
    """One connection shared by the event loop and the job worker thread, guarded by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            for version in range(self.schema_version, len(MIGRATIONS)):
                # executescript commits on its own, so the version bump goes inside the same script.
                self._db.executescript(f"BEGIN; {MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _event(self, db: sqlite3.Connection, uid: int, method: str, job_id: int | None, **detail: Any) -> None:
        db.execute(
            "INSERT INTO events (time, uid, method, job_id, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), uid, method, job_id, json.dumps(detail, sort_keys=True)),
        )

    def record(self, uid: int, method: str, job_id: int | None = None, **detail: Any) -> None:
        with self.transaction() as db:
            self._event(db, uid, method, job_id, **detail)

    # Jobs

    def add_job(
        self, kind: str, steps: list[dict[str, Any]], flags: int, uid: int, method: str, hub_command: str | None = None
    ) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (kind, request, flags, uid, state, created, hub_command) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (kind, json.dumps(steps), flags, uid, time.time(), hub_command),
            )
            job_id = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT INTO steps (job_id, position, op, params, state) VALUES (?, ?, ?, ?, 'pending')",
                [(job_id, i, step["op"], json.dumps(step["params"])) for i, step in enumerate(steps)],
            )
            self._event(db, uid, method, job_id, kind=kind, ops=[step["op"] for step in steps], flags=flags)
        return job_id

    def set_job_state(self, job_id: int, state: str, result: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            if state == "running":
                db.execute("UPDATE jobs SET state = ?, started = ? WHERE id = ?", (state, now, job_id))
                return
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ? WHERE id = ?",
                (state, now, None if result is None else json.dumps(result), job_id),
            )
            self._event(db, DAEMON_UID, "JobFinished", job_id, state=state)

    def set_step(self, job_id: int, position: int, state: str, result: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE steps SET state = ?, result = ? WHERE job_id = ? AND position = ?",
                (state, None if result is None else json.dumps(result), job_id, position),
            )

    def job(self, job_id: int) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_row(row)

    def job_for_command(self, hub_command: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE hub_command = ?", (hub_command,)).fetchone()
        return None if row is None else _job_row(row)

    def jobs(self, limit: int = 100) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_job_row(row) for row in reversed(rows)]

    def all_jobs(self) -> list[JobRow]:
        """Every job in order: what an update re-applies is read from the whole history."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [_job_row(row) for row in rows]

    def job_list(self, limit: int = 100) -> list[tuple[int, str, str, float]]:
        """The latest jobs' id, kind, state and creation time: ListJobs() reads only these columns,
        so its cost does not grow with what the jobs asked for or what they returned."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, state, created FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in reversed(rows)]

    def steps(self, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM steps WHERE job_id = ? ORDER BY position", (job_id,)).fetchall()
        return [
            {
                "op": row["op"],
                "params": json.loads(row["params"]),
                "state": row["state"],
                "result": None if row["result"] is None else json.loads(row["result"]),
            }
            for row in rows
        ]

    def interrupt_unfinished_jobs(self) -> list[int]:
        """Jobs left queued or running by a daemon that died: they did not finish, say so."""
        with self.transaction() as db:
            ids = [int(row[0]) for row in db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
            for job_id in ids:
                db.execute("UPDATE jobs SET state = 'interrupted', finished = ? WHERE id = ?", (time.time(), job_id))
                db.execute(
                    "UPDATE steps SET state = 'interrupted' WHERE job_id = ? AND state IN ('pending', 'running')",
                    (job_id,),
                )
                self._event(db, DAEMON_UID, "JobInterrupted", job_id, reason="daemon stopped during the job")
        return ids

    # Follow-ups

    def add_follow_ups(self, job_id: int | None, follow_ups: list[tuple[str, str]]) -> list[int]:
        with self.transaction() as db:
            ids = [
                int(db.execute(
                    "INSERT INTO follow_ups (job_id, verb, unit, created) VALUES (?, ?, ?, ?)",
                    (job_id, verb, unit, time.time()),
                ).lastrowid or 0)
                for verb, unit in follow_ups
            ]  # fmt: skip
        return ids

    def finish_follow_up(self, follow_up_id: int, outcome: str, uid: int = DAEMON_UID) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT job_id, verb, unit FROM follow_ups WHERE id = ?", (follow_up_id,)).fetchone()
            db.execute(
                "UPDATE follow_ups SET finished = ?, outcome = ? WHERE id = ?", (time.time(), outcome, follow_up_id)
            )
            self._event(db, uid, "FollowUp", row[0], verb=row[1], unit=row[2], outcome=outcome, id=follow_up_id)

    def owed_follow_ups(self) -> list[tuple[int, int | None, str, str]]:
        """Follow-ups recorded and never finished: a crash came between a step's writes and them."""
        with self._lock:
            rows = self._db.execute("SELECT id, job_id, verb, unit FROM follow_ups WHERE outcome IS NULL ORDER BY id")
            return [(int(r[0]), r[1], str(r[2]), str(r[3])) for r in rows.fetchall()]

    # Confirmations

    def add_confirmation(
        self, job_id: int, deadline: float, files: dict[str, Any], ops: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        """Record a pending change. Earlier pending ones are folded in (superseded): their files keep
        the oldest content, so a revert goes back to the last confirmed state, not to one unconfirmed
        change ago. Returns the merged files and ops."""
        with self.transaction() as db:
            merged_files, merged_ops = dict(files), list(ops)
            older = db.execute("SELECT job_id, files, ops FROM confirmations WHERE state = 'pending' ORDER BY job_id")
            for row in older.fetchall():
                merged_files.update(json.loads(row["files"]))  # the older content wins
                merged_ops += [op for op in json.loads(row["ops"]) if op not in merged_ops]
                db.execute(
                    "UPDATE confirmations SET state = 'superseded', settled = ?, detail = ? WHERE job_id = ?",
                    (time.time(), f"folded into job {job_id}", row["job_id"]),
                )
            db.execute(
                "INSERT INTO confirmations (job_id, created, deadline, files, ops, state) "
                "VALUES (?, ?, ?, ?, ?, 'pending')",
                (job_id, time.time(), deadline, json.dumps(merged_files), json.dumps(merged_ops)),
            )
            self._event(db, DAEMON_UID, "ConfirmationPending", job_id, deadline=deadline, paths=sorted(merged_files))
        return merged_files, merged_ops

    def confirmation(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM confirmations WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return {
            "job_id": row["job_id"], "deadline": row["deadline"], "files": json.loads(row["files"]),
            "ops": json.loads(row["ops"]), "state": row["state"], "settled": row["settled"], "detail": row["detail"],
        }  # fmt: skip

    def pending_confirmations(self) -> list[tuple[int, float]]:
        with self._lock:
            rows = self._db.execute("SELECT job_id, deadline FROM confirmations WHERE state = 'pending'").fetchall()
        return [(int(row[0]), float(row[1])) for row in rows]

    def settle_confirmation(self, job_id: int, state: str, uid: int, method: str, detail: str = "") -> bool:
        """pending -> state; False when it was no longer pending (settled by someone else first)."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE confirmations SET state = ?, settled = ?, detail = ? WHERE job_id = ? AND state = 'pending'",
                (state, time.time(), detail, job_id),
            ).rowcount
            if changed:
                self._event(db, uid, method, job_id, state=state, detail=detail)
        return bool(changed)

    # Snapshots

    def add_snapshot(
        self, uid: int, method: str, description: str, kind: str, job_id: int | None, pre_id: int | None
    ) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO snapshots (created, description, kind, job_id, pre_id) VALUES (?, ?, ?, ?, ?)",
                (time.time(), description, kind, job_id, pre_id),
            )
            snapshot_id = int(cursor.lastrowid or 0)
            self._event(db, uid, method, job_id, snapshot=snapshot_id, kind=kind, description=description)
        return snapshot_id

    def forget_snapshot(self, snapshot_id: int, uid: int, method: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE snapshots SET deleted = ? WHERE id = ?", (time.time(), snapshot_id))
            self._event(db, uid, method, None, snapshot=snapshot_id)

    def snapshots(self) -> list[SnapshotRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM snapshots WHERE deleted IS NULL ORDER BY id").fetchall()
        return [_snapshot_row(row) for row in rows]

    def snapshot_history(self) -> list[SnapshotRow]:
        """Every snapshot ever recorded, deleted ones too: a root made from one outlives its record."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM snapshots ORDER BY id").fetchall()
        return [_snapshot_row(row) for row in rows]

    def mark_known_good(self, snapshot_id: int | None, uid: int, boot_id: str) -> None:
        with self.transaction() as db:
            if snapshot_id is not None:
                db.execute("UPDATE snapshots SET known_good = 1 WHERE id = ?", (snapshot_id,))
            db.execute("UPDATE boots SET marked_good = ? WHERE boot_id = ?", (time.time(), boot_id))
            self._event(db, uid, "MarkGood", None, snapshot=snapshot_id, boot=boot_id)

    # Boots

    def record_boot(self, boot_id: str, root: str, booted: Mapping[str, Any] | None = None) -> bool:
        """Record the boot once (a rastosd restarted within it finds it recorded: False), with the
        `Booted` event saying what booted (`booted`), which tells the hub the host's boot history."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO boots (boot_id, started, root) VALUES (?, ?, ?)", (boot_id, time.time(), root)
            )
            first = cursor.rowcount == 1
            if first and booted is not None:
                self._event(db, DAEMON_UID, "Booted", None, boot=boot_id, **booted)
        return first

    def boots(self) -> list[BootRow]:
        with self._lock:
            rows = self._db.execute("SELECT boot_id, started, root FROM boots ORDER BY started").fetchall()
        return [BootRow(str(r[0]), float(r[1]), str(r[2])) for r in rows]

    def record_fallback(self, boot_id: str, failed_entry: str, failed_root: str) -> bool:
        """Record that this boot fell back from `failed_entry`; False if it was recorded already."""
        with self.transaction() as db:
            row = db.execute("SELECT fallback_from FROM boots WHERE boot_id = ?", (boot_id,)).fetchone()
            if row is not None and row[0] is not None:
                return False
            db.execute("UPDATE boots SET fallback_from = ? WHERE boot_id = ?", (failed_entry, boot_id))
            self._event(db, DAEMON_UID, "BootFallback", None, failed_entry=failed_entry, failed_root=failed_root)
        return True

    def first_fallback_boot(self, failed_entry: str) -> str | None:
        """The first boot recorded to have fallen back from the entry, if any was."""
        with self._lock:
            row = self._db.execute(
                "SELECT boot_id FROM boots WHERE fallback_from = ? ORDER BY started LIMIT 1", (failed_entry,)
            ).fetchone()
        return None if row is None else str(row[0])

    def good_roots(self) -> list[str]:
        """The roots boots were marked good on, the latest boot's first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT root FROM boots WHERE marked_good IS NOT NULL ORDER BY started DESC"
            ).fetchall()
        return list(dict.fromkeys(str(row[0]) for row in rows))

    def boot_marked_good(self, boot_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT marked_good FROM boots WHERE boot_id = ?", (boot_id,)).fetchone()
        return row is not None and row[0] is not None

    # Image updates (daemon/updates)

    def add_update(self, uid: int, method: str, source: str, reboot: bool) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO updates (uid, source, reboot, state, created) VALUES (?, ?, ?, 'staging', ?)",
                (uid, source, int(reboot), time.time()),
            )
            update_id = int(cursor.lastrowid or 0)
            self._event(db, uid, method, None, update=update_id, source=source, reboot=reboot)
        return update_id

    def set_update_version(self, update_id: int, version: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE updates SET version = ? WHERE id = ?", (version, update_id))

    def set_update_image(self, update_id: int, image: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE updates SET image = ? WHERE id = ?", (image, update_id))

    def set_update_deployment(self, update_id: int, deployment: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE updates SET deployment = ? WHERE id = ?", (deployment, update_id))

    def finish_update(self, update_id: int, state: str, result: dict[str, Any], uid: int = DAEMON_UID) -> None:
        """The update's end, and its event: UpdateStaged, UpdateFailed or UpdateCancelled."""
        method = {"staged": "UpdateStaged", "failed": "UpdateFailed", "cancelled": "UpdateCancelled"}[state]
        error = result.get("error") or {}
        with self.transaction() as db:
            db.execute(
                "UPDATE updates SET state = ?, finished = ?, result = ? WHERE id = ?",
                (state, time.time(), json.dumps(result), update_id),
            )
            self._event(db, uid, method, None, update=update_id, version=result.get("version"),
                        reason=error.get("message"), error=error.get("name"))  # fmt: skip

    def update_versions(self) -> list[tuple[int, str]]:
        """Every staging's id and version, once its manifest was read."""
        with self._lock:
            rows = self._db.execute("SELECT id, version FROM updates WHERE version IS NOT NULL ORDER BY id").fetchall()
        return [(int(row[0]), str(row[1])) for row in rows]

    def staged_update_of(self, deployment: str) -> int | None:
        """The staging that placed the deployment and ended staged, if the store knows it."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM updates WHERE deployment = ? AND state = 'staged' ORDER BY id DESC LIMIT 1",
                (deployment,),
            ).fetchone()
        return None if row is None else int(row[0])

    def last_update(self) -> UpdateRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM updates ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else _update_row(row)

    def interrupt_unfinished_updates(
        self, entry_written: Callable[[str], bool] = lambda deployment: False
    ) -> list[tuple[int, str | None]]:
        """Updates the daemon stopped in the middle of (a crash, a power cut): failed, with their event,
        unless `entry_written` says a boot entry names the deployment they placed (it is written last,
        so the staging was over but for its record): staged. Returns each failed one's id and the
        image it had received, if any."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, version, image, deployment FROM updates WHERE state = 'staging'"
            ).fetchall()
        failed = []
        for update_id, version, image, deployment in rows:
            if version and deployment and entry_written(deployment):
                note = "rastosd stopped after its boot entry was written: it boots next"
                self.finish_update(update_id, "staged", {"id": update_id, "state": "staged", "version": version,
                                                         "note": note})  # fmt: skip
                continue
            error = {"name": UpdateFailed.dbus_name, "message": "rastosd stopped while it staged this update"}
            self.finish_update(update_id, "failed", {"id": update_id, "state": "failed", "version": version,
                                                     "error": error})  # fmt: skip
            failed.append((int(update_id), image))
        return failed

    # Event log

    def event_log(self, since: int, limit: int) -> list[tuple[int, float, int, str, int, str]]:
        """Events as GetEventLog() returns them: the detail as stored (JSON already), never decoded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, time, uid, method, job_id, detail FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (since, limit),
            ).fetchall()
        return [(int(r[0]), float(r[1]), int(r[2]), str(r[3]), int(r[4] or 0), str(r[5])) for r in rows]

    def events_of(self, method: str) -> list[EventRow]:
        """Every event of one method, oldest first (Rollback: few, and all of them matter)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE method = ? ORDER BY id", (method,)).fetchall()
        return [EventRow(r["id"], r["time"], r["uid"], r["method"], r["job_id"], json.loads(r["detail"])) for r in rows]

    def events(self, since: int, limit: int) -> list[EventRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since, limit)).fetchall()
        return [EventRow(r["id"], r["time"], r["uid"], r["method"], r["job_id"], json.loads(r["detail"])) for r in rows]


def _job_row(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"],
        kind=row["kind"],
        request=json.loads(row["request"]),
        flags=row["flags"],
        uid=row["uid"],
        state=row["state"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        result=None if row["result"] is None else json.loads(row["result"]),
        hub_command=row["hub_command"],
    )


def _update_row(row: sqlite3.Row) -> UpdateRow:
    return UpdateRow(
        row["id"], row["uid"], row["source"], bool(row["reboot"]), row["state"], row["version"], row["created"],
        row["finished"], None if row["result"] is None else json.loads(row["result"]),
    )  # fmt: skip


def _snapshot_row(row: sqlite3.Row) -> SnapshotRow:
    return SnapshotRow(
        row["id"], row["created"], row["description"], row["kind"], row["job_id"], row["pre_id"], row["known_good"] == 1
    )
