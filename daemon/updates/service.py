"""`Updates`: what the bus face (Stage, Cancel, GetStatus, Progress, Completed) and the hub agent call
to stage image updates. One staging at a time, on a worker thread of its own (which takes a mount
namespace of its own to reach the file system's top level: layout.py); the steps are steps.py's.

Listeners (`on_progress`, `on_completed`) are called on the event loop's thread when `Updates` was
made inside a running loop (as rastosd makes it), else on the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from daemon.boot import BootEntries
from daemon.config import DaemonConfig
from daemon.errors import (
    BUNDLE_ERRORS,
    BootConfigError,
    DaemonError,
    InvalidParams,
    NotStaging,
    UpdateBusy,
    UpdateFailed,
    UpdateNoSpace,
    UpdatesUnavailable,
)
from daemon.store import DAEMON_UID, StateStore
from daemon.updates.layout import GENERATION, HostLayout, on_own_thread, top_level, version_deployed
from daemon.updates.model import PrepareDeployment, StageAnswer, Staging, carry_nothing, image_version
from daemon.updates.reconcile import reconcile
from daemon.updates.retention import collect, staged_roots
from daemon.updates.source import Cancelled, Source, check_headers, open_local, parse_source
from ops.errors import ERROR_PREFIX
from rastos.errors import RastosError
from rastos.process import run

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("rastosd.updates")

PHASES = ("idle", "downloading", "verifying", "receiving", "reapplying", "installing", "staged", "failed", "cancelled")
PROGRESS_INTERVAL = 0.25  # seconds between two Progress notifications within one phase
REBOOT_DELAY = 3.0  # seconds between Completed and the reboot: the hub agent tells the hub first
INTERNAL = ERROR_PREFIX + "Internal"

Progress = tuple[str, int, int]
CompletedListener = Callable[[int, bool, dict[str, Any]], None]
ProgressListener = Callable[[Progress], None]


def logind_reboot(bus_address: str | None) -> Callable[[], None]:
    """A reboot through systemd-logind on the daemon's own bus (a test's private bus has no logind,
    so a test cannot reboot the machine it runs on)."""

    def reboot() -> None:
        address = [f"--address={bus_address}"] if bus_address else []
        run(["busctl", *address, "call", "org.freedesktop.login1", "/org/freedesktop/login1",
             "org.freedesktop.login1.Manager", "Reboot", "b", "false"], capture=True)  # fmt: skip

    return reboot


class Updates:
    def __init__(
        self,
        config: DaemonConfig,
        store: StateStore,
        entries: BootEntries,
        running: str,
        *,
        refusal: str | None = None,
        run_lock: threading.Lock | None = None,
        prepare_deployment: PrepareDeployment = carry_nothing,
        reboot: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.entries = entries
        self.running = running  # the running root's subvolume (@, @deployments/1.2, ...)
        self.refusal = refusal  # why this boot cannot stage updates, if it cannot
        self.run_lock = run_lock if run_lock is not None else threading.Lock()
        self.prepare_deployment = prepare_deployment
        self.reboot = reboot if reboot is not None else logind_reboot(config.bus_address)
        self.on_completed: list[CompletedListener] = []
        self.on_progress: list[ProgressListener] = []
        self.progress: Progress = ("idle", 0, 0)
        self.running_version = image_version(config.root)
        self._staged_version: str | None = None  # read from the ESP when first asked (staged_version)
        self._lock = threading.Lock()
        # Held while a staging or retention changes subvolumes and entries: never both at once.
        self._disk = threading.Lock()
        self._current: Staging | None = None
        self._worker: threading.Thread | None = None
        self._last_notified = 0.0
        self._last = self._last_result()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # The API

    def stage(
        self,
        source: str,
        *,
        uid: int,
        method: str,
        reboot: bool,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        """Start staging the bundle at `source` (an absolute path or an http(s) URL); returns the
        update's id at once. The source's form, a path's file and the headers are checked here
        (InvalidParams); all else ends in on_completed."""
        parsed = parse_source(source)
        checked = check_headers(headers or {})
        if self.refusal is not None:
            raise UpdatesUnavailable(self.refusal)
        with self._lock:
            return self._start(parsed, checked, uid=uid, method=method, reboot=reboot, tls=tls)

    def stage_version(
        self, source: str, version: str, *, uid: int, method: str, reboot: bool,
        headers: Mapping[str, str] | None = None, tls: ssl.SSLContext | None = None,
    ) -> StageAnswer:  # fmt: skip
        """Stage `version` from `source`, for a caller that names the version before the bundle does
        (the hub agent), unless this daemon has it: a staging of the version under way is joined (a
        reboot asked for is added to it), and a deployment of it that boots next is the answer,
        rebooted into if `reboot` asks, as after a staging. So a request sent again, after rastosd
        restarted or under another id, is not a second download and receive. Refusals as `stage`'s,
        a staging of another version under way included."""
        parsed = parse_source(source)
        checked = check_headers(headers or {})
        if not version:
            raise InvalidParams("version", "is empty")
        if self.refusal is not None:
            raise UpdatesUnavailable(self.refusal)
        # The version stands for the update asked for: a version names one image build of a profile
        # (one root subvolume per version on the builder, and the hub refuses another bundle of a
        # profile's version with other contents: docs/updates.md, "One identity per version"), and the
        # hub itself judges a host by its version alone, skipped or done. Held under the lock, so no
        # staging starts between the look and the answer: one of another version under way is refused
        # (`_start`), never rebooted through, as it may be about to put its own entry first.
        with self._lock:
            current = self._current
            if current is not None and current.version == version:
                return self._join(current, uid=uid, method=method, reboot=reboot)
            staged = self._staged_deployment() if current is None else None
            if staged is None or version_deployed(staged) != version:
                started = self._start(parsed, checked, uid=uid, method=method, reboot=reboot, tls=tls)
                return StageAnswer(started, "staging")
            update_id = self.store.staged_update_of(staged) or 0
            self.store.record(uid, method, None, update=update_id or None, version=version, reboot=reboot,
                              answered="staged")  # fmt: skip
        log.info("%s is staged already (%s boots next): asked for again, not staged again", version, staged)
        if reboot:
            threading.Thread(target=self._reboot, args=(update_id, uid, version), name=f"reboot-{update_id}",
                             daemon=True).start()  # fmt: skip
        return StageAnswer(update_id, "staged")

    def _join(self, current: Staging, *, uid: int, method: str, reboot: bool) -> StageAnswer:
        """The staging under way is the one asked for; called with `_lock` held, so its worker reads
        the reboot asked for here when it ends (`_run`)."""
        current.reboot = current.reboot or reboot
        self.store.record(uid, method, None, update=current.id, version=current.version, reboot=reboot,
                          answered="staging")  # fmt: skip
        log.info("update %d: staging %s already, asked for again", current.id, current.version)
        return StageAnswer(current.id, "staging")

    def _start(
        self, parsed: Source, checked: dict[str, str], *, uid: int, method: str, reboot: bool,
        tls: ssl.SSLContext | None,
    ) -> int:  # fmt: skip
        """A new staging on a worker of its own, an https source verified with `tls` (None: the system's
        store); called with `_lock` held."""
        if self._current is not None:
            current = self._current
            raise UpdateBusy(
                f"update {current.id} ({current.version or current.source.shown}) is staging: one at a time; "
                "cancel it or wait for its end"
            )
        fd = open_local(parsed.text) if parsed.url is None else None
        try:
            update_id = self.store.add_update(uid, method, parsed.shown, reboot)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        staging = Staging(update_id, parsed, uid, method, reboot, checked, fd, tls)
        self._current = staging
        self._set_progress("downloading" if parsed.url else "verifying", 0, 0, force=True)
        self._worker = threading.Thread(target=self._run, args=(staging,), name=f"update-{update_id}", daemon=True)
        self._worker.start()
        log.info("update %d: staging %s", update_id, parsed.shown)
        return update_id

    def cancel(self, *, uid: int, method: str) -> None:
        """Stop the staging in progress; it ends `cancelled` (on_completed) with nothing left of it,
        unless it was writing its boot entry already, when it ends `staged`."""
        with self._lock:
            staging = self._current
            if staging is None:
                raise NotStaging("no update is staging")
            self.store.record(uid, method, None, update=staging.id)
            self._stop(staging, "cancelled before it was staged")
        log.info("update %d: cancel asked for", staging.id)

    def shutdown(self, timeout: float) -> None:
        """On stop: the staging in progress is cancelled, and its end (its cleanup) waited for."""
        with self._lock:
            staging, worker = self._current, self._worker
            if staging is None or worker is None:
                return
            self._stop(staging, "cancelled: rastosd stopped before it was staged")
        worker.join(timeout)

    @staticmethod
    def _stop(staging: Staging, why: str) -> None:
        staging.why_cancelled = why
        staging.cancelled.set()
        if staging.download is not None:
            staging.download.cancel()

    def status(self) -> dict[str, Any]:
        with self._lock:
            current, last = self._current, self._last
        phase, done, total = self.progress
        shown = {"id": current.id, "source": current.source.shown, "version": current.version} if current else {}
        last = last or {}
        return {
            "state": phase,
            "id": shown.get("id", last.get("id", 0)),
            "source": shown.get("source", last.get("source", "")),
            "version": shown.get("version", last.get("version") or ""),
            "running_version": self.running_version,
            "staged_version": self.staged_version,
            "last_error": None if current else last.get("error"),
            "hand_changes": [] if current else (last.get("carried") or {}).get("hand_changes", []),
            "progress": {"phase": phase, "done": done, "total": total},
            "result": None if current else (_bounded(last) or None),
        }

    def _entry_written(self, deployment: str) -> bool:
        """Whether an entry boots the deployment a staging cut short placed."""
        try:
            return any(root == deployment for root, _ in self.entries.update_entries())
        except (BootConfigError, OSError):
            return False

    def reconcile(self) -> list[str]:
        """Once per start: what a cut staging left (reconcile.py), and its record in the store."""
        interrupted = self.store.interrupt_unfinished_updates(self._entry_written)
        self._last = self._last_result()
        done = [f"update {update_id} was cut short by a stop of rastosd: failed" for update_id, _ in interrupted]
        if self.refusal is not None:
            return done
        received = [image for _, image in interrupted if image]
        # The kernel directories stagings of this host may have made (named as their deployments):
        # only those are ever removed for want of an entry, never kernel-install's or another's.
        kernels = [name for update_id, version in self.store.update_versions()
                   for name in (version, f"{version}{GENERATION}{update_id}")]  # fmt: skip

        def body() -> list[str]:
            with top_level(self.config.root) as top:
                layout = HostLayout(top)
                downloads = self.config.download_directory
                return reconcile(layout, self.entries, self.running, downloads, received, kernels)

        return done + on_own_thread(body, "update-reconcile")

    def collect(self, why: str, *, failed: str | None = None) -> list[str]:
        """Retention (retention.py), once this boot is known good: the update deployments and images
        nothing keeps go, each logged, and all in the event log as one `UpdateCleanup`. `failed`: the
        deployment this boot fell back from, kept for the boot. Not while a staging runs (the next
        good boot or start does it)."""
        if self.refusal is not None:
            return []
        if not self._disk.acquire(blocking=False):
            log.info("update retention left for later: a staging is under way")
            return []
        try:
            good = self.store.good_roots()

            def body() -> list[str]:
                with top_level(self.config.root) as top:
                    return collect(HostLayout(top), self.entries, self.running, good, failed)

            done = on_own_thread(body, "update-retention")
        finally:
            self._disk.release()
        for action in done:
            log.info("update retention: %s", action)
        if done:
            self.store.record(DAEMON_UID, "UpdateCleanup", None, why=why, actions=done)
        return done

    # The worker

    def _run(self, staging: Staging) -> None:
        state, result = "failed", self._ended(staging, {"message": "the staging ended unexpectedly"})
        try:
            result = self._stage(staging)
            state = "staged"
        except Cancelled:
            state, result = "cancelled", self._ended(staging, {"message": staging.why_cancelled})
        except Exception as error:  # every failure ends the staging, none the daemon
            state, result = "failed", self._ended(staging, describe(error, staging.id))
        finally:
            if staging.fd is not None:
                os.close(staging.fd)
            # Under the lock: a request for this version (`_join`) may ask for a reboot until the end.
            with self._lock:
                result["state"], result["reboot"] = state, staging.reboot
                try:
                    self.store.finish_update(staging.id, state, result, staging.uid)
                finally:  # whatever the store says, the next staging may begin
                    self._current = None
                    self._last = result
                    if state == "staged":
                        self.staged_version = staging.version
        log.log(logging.INFO if state == "staged" else logging.WARNING, "update %d (%s): %s%s", staging.id,
                staging.version or staging.source.shown, state,
                f": {result['error']['message']}" if "error" in result else "")  # fmt: skip
        self._set_progress(state, *self.progress[1:], force=True)
        for listener in list(self.on_completed):
            self._notify(listener, staging.id, state == "staged", result)
        if state == "staged" and staging.reboot:
            self._reboot(staging.id, staging.uid, staging.version)

    def _stage(self, staging: Staging) -> dict[str, Any]:
        # Downloads, bundles and their checks are imported with the first staging, not at every start.
        from daemon.updates.steps import Context, StagingRun

        context = Context(
            root=self.config.root, running=self.running, downloads=self.config.download_directory,
            keys_dir=self.config.update_keys_dir, entries=self.entries, run_lock=self.run_lock,
            prepare_deployment=self.prepare_deployment, progress=self._set_progress,
            versioned=self.store.set_update_version, received=self.store.set_update_image,
            deploying=self.store.set_update_deployment,
        )  # fmt: skip
        with self._disk, top_level(self.config.root) as top:
            layout = HostLayout(top)
            layout.ensure()
            return StagingRun(context, staging, layout).run()

    @staticmethod
    def _ended(staging: Staging, error: dict[str, Any]) -> dict[str, Any]:
        return {"id": staging.id, "source": staging.source.shown, "version": staging.version or None,
                "reboot": staging.reboot, "error": error}  # fmt: skip

    def _reboot(self, update_id: int, uid: int, version: str) -> None:
        """Into the staged deployment of `version` (that `update_id` placed), as `uid` asked: after a
        staging, or when a version staged already is asked for again (`stage_version`)."""
        time.sleep(REBOOT_DELAY)
        try:
            self.reboot()
        except RastosError as error:
            log.error("update %d is staged, but the reboot asked for failed: %s", update_id, error)
            self.store.record(uid, "RebootFailed", None, update=update_id or None, error=str(error)[:2000])
            return
        self.store.record(uid, "Reboot", None, update=update_id or None, version=version)

    # Telling listeners

    def _set_progress(self, phase: str, done: int, total: int, *, force: bool = False) -> None:
        assert phase in PHASES, phase
        changed = phase != self.progress[0]
        self.progress = (phase, done, total)
        now = time.monotonic()
        if force or changed or done == total or now - self._last_notified >= PROGRESS_INTERVAL:
            self._last_notified = now
            for listener in list(self.on_progress):
                self._notify(listener, self.progress)

    def _notify(self, listener: Callable[..., None], *args: Any) -> None:
        def call() -> None:
            try:
                listener(*args)
            except Exception:  # one listener's bug must not keep the news from the others
                log.exception("an update listener failed")

        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: rastosd is stopping
                self._loop.call_soon_threadsafe(call)
        else:
            call()

    def _last_result(self) -> dict[str, Any] | None:
        last = self.store.last_update()
        return None if last is None else (last.result or {"id": last.id, "source": last.source})

    @property
    def staged_version(self) -> str:
        """The version that boots next, if one was staged. Read from the ESP's entries when first asked,
        not when rastosd starts: the ESP is an automount whose device may not be there yet, and rastosd
        takes its bus name before it waits for anything that slow (Daemon.settle reads it)."""
        if self._staged_version is None:
            self._staged_version = self._staged_from_entries()
        return self._staged_version

    @staged_version.setter
    def staged_version(self, version: str) -> None:
        self._staged_version = version

    def _staged_from_entries(self) -> str:
        """The version whose entry boots next, if one was staged and not booted yet."""
        staged = self._staged_deployment()
        return (version_deployed(staged) or "") if staged else ""

    def _staged_deployment(self) -> str | None:
        """The update deployment whose entry boots next with tries left, read from the ESP now: a
        rollback or a boot that used up the entry's tries since the staging leaves none."""
        try:
            staged = staged_roots(self.entries, self.running)
        except (RastosError, OSError):
            return None
        return staged[0] if staged else None


def describe(error: Exception, update_id: int) -> dict[str, Any]:
    """A failure as the result and the Completed signal carry it: its D-Bus error name and message."""
    reason = getattr(error, "reason", None)  # rastos.bundle's BundleError, imported with the first staging
    if isinstance(error, RastosError) and isinstance(reason, str):
        name = BUNDLE_ERRORS.get(reason, UpdateFailed).dbus_name
        return {"name": name, "reason": reason, "message": error.message, "hint": error.hint}
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return {"name": UpdateNoSpace.dbus_name, "message": f"no space left: {error.strerror} ({error.filename})"}
    if isinstance(error, DaemonError):
        return {"name": error.dbus_name, "message": error.message, "hint": error.hint}
    if isinstance(error, RastosError):
        return {"name": UpdateFailed.dbus_name, "message": error.message, "hint": error.hint}
    log.error("update %d failed unexpectedly", update_id, exc_info=error)
    return {"name": INTERNAL, "message": f"internal error in rastosd ({type(error).__name__}); the journal has details"}


SHOWN_STEPS = 20  # of the steps re-applied, in a status any caller may ask for as often as it likes


def _bounded(result: dict[str, Any]) -> dict[str, Any]:
    """The last result as GetStatus shows it: hand changes once (at the top), and of the re-applied
    steps and carried files their counts and the last few, whatever the host's history."""
    carried = result.get("carried")
    if not isinstance(carried, dict):
        return result
    shown = {key: value for key, value in carried.items() if key not in ("hand_changes", "chain")}
    for key in ("reapplied", "not_reapplied", "carried", "not_carried"):
        items = carried.get(key)
        if isinstance(items, list) and len(items) > SHOWN_STEPS:
            shown[key] = items[-SHOWN_STEPS:]
            shown[f"{key}_count"] = len(items)
    return {**result, "carried": shown}
