"""Confirm-or-revert: a risky change (firewall, network, ssh) stands only once someone confirms it.

A remote admin who applies a firewall that shuts out their own connection cannot undo it by hand. So a
job whose risky steps changed something ends with its change *pending*: the old content of every file
those steps touched is kept in the state store with a deadline (the op's `confirm_timeout`). A
confirmation (`rastosctl confirm JOB`, the Confirm method, the hub) before the deadline makes it stand;
at the deadline the daemon writes the old files back and runs the ops' revert actions (load the
ruleset again, reload sshd), by itself. The deadline is in the store, so a daemon restarted or a host
rebooted in between reverts as soon as it is up again when the time has passed.

A second risky change while one is pending folds the first in: confirming the second confirms both,
and a revert goes back to the last confirmed state. Reverts run under the job lock, never beside a job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from daemon.errors import NotPending
from daemon.store import DAEMON_UID, StateStore
from ops import get_op
from ops.base import Plan, execute
from ops.target import Target

log = logging.getLogger("rastosd.confirm")


def capture(target: Target, paths: Iterable[str], into: dict[str, Any]) -> None:
    """The files as they are before a risky step changes them (the first capture of a path wins)."""
    for path in paths:
        if path in into:
            continue
        kind = target.files.kind(path)
        if kind == "link":  # an enablement link systemctl made: recorded, never followed
            into[path] = {"content": None, "mode": 0, "symlink": target.files.readlink(path)}
        elif kind == "file":
            status = target.files.lstat(path)
            mode = status.st_mode & 0o7777 if status is not None else 0o644
            into[path] = {"content": target.read_text(path), "mode": mode}
        else:
            into[path] = {"content": None, "mode": 0}


class Confirmations:
    def __init__(self, target: Target, store: StateStore, run_lock: threading.Lock) -> None:
        self.target = target
        self.store = store
        self.run_lock = run_lock
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._reverts: set[asyncio.Future[None]] = set()  # kept until done: the loop holds tasks weakly
        self._loop = asyncio.get_running_loop()

    # Any thread

    def arm(self, job_id: int, files: dict[str, Any], ops: list[str], timeout: int) -> float:
        deadline = time.time() + timeout
        self.store.add_confirmation(job_id, deadline, files, ops)
        self._loop.call_soon_threadsafe(self._replace_timers, job_id, deadline)
        log.warning("job %d: risky change pending; reverted in %d s unless confirmed", job_id, timeout)
        return deadline

    # The event loop

    def resume(self) -> None:
        """At start: what is still pending gets its timer, or is reverted now when its time passed."""
        for job_id, deadline in self.store.pending_confirmations():
            self._schedule(job_id, deadline)

    def confirm(self, job_id: int, uid: int, method: str = "Confirm") -> None:
        row = self.store.confirmation(job_id)
        if row is None:
            raise NotPending(f"id: job {job_id} made no change that waits for a confirmation")
        if not self.store.settle_confirmation(job_id, "confirmed", uid, method):
            raise NotPending(f"id: job {job_id}'s change is already {row['state']}")
        timer = self._timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        log.info("job %d: change confirmed", job_id)

    def _replace_timers(self, job_id: int, deadline: float) -> None:
        for timer in self._timers.values():  # the earlier pending changes were folded into this one
            timer.cancel()
        self._timers.clear()
        self._schedule(job_id, deadline)

    def _schedule(self, job_id: int, deadline: float) -> None:
        delay = max(0.0, deadline - time.time())
        self._timers[job_id] = self._loop.call_later(delay, self._expire, job_id)

    def _expire(self, job_id: int) -> None:
        self._timers.pop(job_id, None)
        revert = asyncio.ensure_future(asyncio.to_thread(self.revert, job_id))
        self._reverts.add(revert)
        revert.add_done_callback(self._reverts.discard)

    # The worker side: a revert changes files, so it holds the lock jobs run under.

    def revert(self, job_id: int) -> None:
        with self.run_lock:
            row = self.store.confirmation(job_id)
            if row is None or row["state"] != "pending":
                return  # confirmed while the timer fired
            try:
                restored = self._restore(row["files"])
                for name in row["ops"]:
                    actions = get_op(name).revert_actions()
                    execute(Plan(name, actions), self.target, lambda line: log.info("%s", line))
            except Exception as error:
                log.error("job %d: revert failed: %s", job_id, error)
                self.store.settle_confirmation(job_id, "revert-failed", DAEMON_UID, "ConfirmationExpired", str(error))
                return
            detail = f"not confirmed in time; restored {', '.join(restored)}"
            self.store.settle_confirmation(job_id, "reverted", DAEMON_UID, "ConfirmationExpired", detail)
            log.warning("job %d: %s", job_id, detail)

    def _restore(self, files: dict[str, Any]) -> list[str]:
        for path, old in sorted(files.items()):
            root = self.target.files
            if old.get("symlink") is not None:
                root.symlink(path, old["symlink"])
            elif old["content"] is None:
                if root.kind(path) == "link":  # the one the change made (systemctl enable): it goes
                    root.remove_link(path)
                else:
                    root.remove(path)
            else:
                status = root.lstat(path)
                uid, gid = (status.st_uid, status.st_gid) if status else (0, 0)
                root.write(path, old["content"], old["mode"], uid, gid)
        return sorted(files)
