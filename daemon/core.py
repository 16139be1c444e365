"""rastosd's core: what one daemon process holds and does, apart from its face on the bus.

The bus face (daemon/bus/objects.py) calls in here for every method and is told back what changed
(`Listener`); the core imports nothing of sdbus, so it runs, and is tested, without a bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import btrfsutil

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
from daemon.config import DaemonConfig
from daemon.errors import BootConfigError, SnapshotProtected, SnapshotsUnavailable
from daemon.failpoints import failpoint
from daemon.followups import run_owed
from daemon.hub_link_settings import HUB_UID, load_settings
from daemon.jobs import Job, JobListener, JobManager, parse_params
from daemon.snapshots import SnapshotLayout, Snapshots, subvolume_path
from daemon.store import SnapshotRow, StateStore
from daemon.updates import StageAnswer, Updates
from ops.steps import step_from
from ops.target import Target
from rastos.errors import CommandError, RastosError
from rastos.process import run

if TYPE_CHECKING:
    import ssl

    from daemon.hub_join import Joined
    from daemon.hub_link import HubLink, UpdateCompleted

log = logging.getLogger("rastosd")

BOOT_TEXT = 255  # characters of each text of a boot report (the hub keeps as many: hub/fleet.py)


class Listener(JobListener, Protocol):
    """What the bus face hears of the core, besides jobs (all on the event loop's thread)."""

    def boot_state_changed(self) -> None: ...
    def fell_back(self, failed_entry: str, failed_root: str, booted_entry: str) -> None: ...


class Daemon:
    """Everything one rastosd process holds but its face on the bus: the target, the state store,
    snapshots, boot entries, jobs. It is the job manager's listener and passes on what the bus face
    (`listener`, daemon/bus/objects.py) shows; the hub link hears of jobs here too."""

    def __init__(self, config: DaemonConfig, credentials: Path | None = None) -> None:
        self.config = config
        self.credentials = credentials  # systemd's credentials directory: hub settings given at boot
        self.listener: Listener = _Unheard()
        self.target = Target(config.root, runtime=config.root_runtime)
        self.store = StateStore(config.database)
        self.entries = BootEntries(config.esp, config.boot_tries)
        self.boot_id = current_boot_id()
        self._booted_entry = config.booted_entry or read_loader_variable("LoaderEntrySelected") or ""
        self._fallback: Fallback | None = None
        self._fallback_known = False
        self._fallback_lock = threading.Lock()
        # Set once what a start repairs and owes is done (settle()): calls that change the host or show
        # its snapshots and updates wait for it, the rest are answered as soon as rastosd is on the bus.
        self.settled = asyncio.Event()
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
        self.jobs = JobManager(self.target, self.store, self.snapshots, self, self.booted_snapshot)
        refusal, running = self._update_refusal()
        self.updates = Updates(config, self.store, self.entries, running, refusal=refusal,
                               run_lock=self.jobs.run_lock, prepare_deployment=self._prepare_deployment)  # fmt: skip
        self.hub: HubLink | None = None
        self._hub_task: asyncio.Task[None] | None = None
        self._hub_update_completed: UpdateCompleted | None = None  # the link's (only the newest link's)
        self.updates.on_completed.append(self._tell_hub_update_completed)
        self._join_lock = asyncio.Lock()
        self._rollback_lock = threading.Lock()

    def _read_root_subvolume(self) -> str:
        if self.overlay_root is not None:
            return self.overlay_root
        if self.snapshots is None:
            return ""
        return subvolume_path(self.config.root)

    def _update_refusal(self) -> tuple[str | None, str]:
        """Why this boot cannot stage image updates (None if it can), and its root subvolume."""
        if self.overlay_root is not None:
            return (
                f"this boot runs the read-only snapshot {self.overlay_root} under an overlay in memory: "
                "stage updates from a deployment"
            ), self.overlay_root
        try:
            if btrfsutil.is_subvolume(self.config.root):
                return None, subvolume_path(self.config.root)
        except btrfsutil.BtrfsUtilError:
            pass
        return f"the root {self.config.root} is not a btrfs subvolume: this host cannot take image updates", ""

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
        # The image version is read once, at start (updates.running_version): it is fixed for the boot.
        version = self.updates.running_version
        return BootState(self.root_subvolume, self.booted_snapshot, entry, health, self.fallback, version)

    def boot_report(self) -> dict[str, Any]:
        """What the `Booted` event says of this boot, once, at rastosd's first start in it (the hub's
        boot history of the host): what booted, and the entry it fell back from if it did. Each text
        at most BOOT_TEXT characters, as the hub keeps them."""
        state = self.boot_state()
        failed = state.fallback
        texts = {"root": state.root, "kind": state.kind, "entry": state.entry, "image_version": state.image_version,
                 "failed_entry": failed.failed_entry if failed else "",
                 "failed_root": failed.failed_root if failed else ""}  # fmt: skip
        return {"snapshot": state.snapshot, **{key: value[:BOOT_TEXT] for key, value in texts.items()}}

    # Image updates (docs/updates.md)

    def _prepare_deployment(self, new_root: Path, running_root: Path, pristine_image: Path | None) -> dict[str, Any]:
        """The new deployment made this host's: files carried, host state re-applied, hand changes
        reported (daemon/updates/carry.py, imported on the first staging: it loads the op library)."""
        from daemon.updates.carry import prepare_deployment

        return prepare_deployment(new_root, running_root, pristine_image, self.store, config=self.config,
                                  running_subvolume=self.root_subvolume)  # fmt: skip

    def stage_update(
        self, source: str, *, version: str, reboot: bool, headers: Mapping[str, str],
        tls: ssl.SSLContext | None = None,
    ) -> StageAnswer:  # fmt: skip
        """A staging of `version` for the hub link (hub_link.py's DaemonCore), as the daemon's own."""
        return self.updates.stage_version(source, version, uid=HUB_UID, method="HubUpdate", reboot=reboot,
                                          headers=dict(headers), tls=tls)  # fmt: skip

    def on_update_completed(self, callback: UpdateCompleted) -> None:
        """The link's callback for the end of a staging: a link made anew (Hub.Join) replaces the
        one before, which must not hear of stagings any more."""
        self._hub_update_completed = callback

    def _tell_hub_update_completed(self, staging: int, ok: bool, result: dict[str, Any]) -> None:
        if (callback := self._hub_update_completed) is not None:
            callback(staging, ok, result)

    # The hub link (hub_link.py): started with the daemon, made anew by Hub.Join

    def start_hub(self) -> None:
        """Connect to the hub the settings name, if any (on the event loop)."""
        settings = load_settings(self.config.hub_urls, self.config.hub_token_file, self.credentials,
                                 self.config.hub_ca)  # fmt: skip
        if settings is None:
            return
        from daemon.hub_link import HubLink  # only a host with a hub needs the link's modules

        self.hub = HubLink(self, settings)
        self._hub_task = asyncio.create_task(self.hub.run_forever())

    async def stop_hub(self) -> None:
        """End the link, its connection closed, before returning."""
        task, self._hub_task, self.hub = self._hub_task, None, None
        self._hub_update_completed = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def join_hub(self, url: str, token: str, ca_pem: str, uid: int) -> Joined:
        """Hub.Join (hub_join.py): check, write, record (never the token), then a new link at once.
        One at a time: two would write the same files and start a link each."""
        from daemon.hub_join import join

        async with self._join_lock:
            joined = await asyncio.to_thread(join, self.config, self.credentials, url, token, ca_pem)
            self.store.record(uid, "HubJoin", None, **joined.as_json())
            log.info("joined the hub at %s (token in %s)", joined.url, joined.token_file)
            self.config = replace(self.config, hub_urls=tuple(joined.url.split()), hub_token_file=joined.token_file,
                                  hub_ca=joined.ca_file)  # fmt: skip
            await self.stop_hub()
            self.start_hub()
            return joined

    def hub_status(self) -> dict[str, Any]:
        if self.hub is not None:
            return self.hub.status()
        reason = None
        if self.config.hub_url is not None:
            reason = "the hub's settings cannot be used (the token file cannot be read?): the journal says why"
        return {"state": "off", "url": self.config.hub_url, "urls": list(self.config.hub_urls), "error": reason,
                "since": None}  # fmt: skip

    @property
    def fallback(self) -> Fallback | None:
        """The entry this boot fell back from, if it did. Read from the ESP's entries when first
        needed, not while rastosd starts: the ESP is an automount whose device udev announces late in
        a busy boot, and waiting for it held up rastosd's first answer (in a loaded emulated boot,
        past the unit's start timeout)."""
        with self._fallback_lock:
            if not self._fallback_known:
                self._fallback = self._find_fallback()
                self._fallback_known = True
            return self._fallback

    def _find_fallback(self) -> Fallback | None:
        try:
            return find_fallback(self.entries, self._booted_entry)
        except (BootConfigError, OSError) as error:
            log.warning("cannot tell whether this boot fell back: %s", error)
            return None

    async def settle(self) -> None:
        """What a start records, repairs and owes, done once rastosd answers on the bus: the boot (and
        what booted, for the hub's history of the host), repairs after a crash
        between two steps, updates a good boot lets go, follow-ups owed by jobs, pending
        confirmations' timers, and the report of a fallback. Off the event loop: these touch the disk
        and the ESP, and the loop meanwhile answers what need not wait for them."""
        # Whether this boot fell back, and which update boots next, are read before the repairs, which
        # may rewrite the entries they are read from; a BootState read before then reads it itself.
        await asyncio.to_thread(lambda: (self.fallback, self.updates.staged_version))
        self.store.record_boot(self.boot_id, self.root_subvolume, await asyncio.to_thread(self.boot_report))
        await asyncio.to_thread(self.reconcile)
        if (await asyncio.to_thread(self.boot_state)).health == "good":  # restarted on a boot known good
            await asyncio.to_thread(self.collect_updates, "rastosd started on a boot known good")
        await asyncio.to_thread(run_owed, self.store, self.target)
        self.jobs.confirmations.resume()
        self.report_fallback()
        self.settled.set()

    def report_fallback(self) -> None:
        """Once per boot: the event log, the journal and a signal say what failed and what booted."""
        if self.fallback is None:
            return
        failed, root = self.fallback.failed_entry, self.fallback.failed_root
        if self.store.record_fallback(self.boot_id, failed, root):
            log.warning("boot fell back: %s (root %s) used up its tries; booted %s", failed, root, self._booted_entry)
        self.listener.fell_back(failed, root, self._booted_entry)

    def reconcile(self) -> None:
        """Once per start: repair what a crash or power cut between two steps left (snapshots.py,
        updates/reconcile.py)."""
        done = []
        if self.snapshots is not None:
            try:
                done += self.snapshots.reconcile(self.booted_snapshot)
            except (OSError, btrfsutil.BtrfsUtilError) as error:
                log.error("cannot reconcile snapshots and boot entries: %s", error)
        try:
            done += self.updates.reconcile()
        except (OSError, btrfsutil.BtrfsUtilError, RastosError) as error:
            log.error("cannot reconcile image updates: %s", error)
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
        # One at a time: each retires the snapshot's other deployments once its entry is written, so
        # two at once would retire each other's (or make one under the same name).
        with self._rollback_lock:
            return self._roll_back(snapshots, row)

    def _roll_back(self, snapshots: Snapshots, row: SnapshotRow) -> str:
        # An earlier rollback deployment of the snapshot, and its entry, stay as they were until the
        # new one's entry is written: the new one has a name of its own, and the earlier goes only then.
        deployment = snapshots.make_deployment(row.id)
        failpoint("deployment-made")
        try:
            entry = self.entries.add_for_snapshot(
                row.id, row.description, subvolume_path(deployment), self.root_subvolume, row.created
            )
        except OSError as error:  # the ESP full or failing
            snapshots.remove_deployment(deployment)  # no deployment without its entry
            raise BootConfigError(
                f"cannot write the boot entry of snapshot {row.id} in {self.entries.entries_dir}: "
                f"{error.strerror or error}; any earlier rollback to it is left as it was"
            ) from None
        except BaseException:
            snapshots.remove_deployment(deployment)
            raise
        failpoint("entry-written")
        snapshots.retire_earlier(row.id, deployment)
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
        self.listener.boot_state_changed()

    def collect_updates(self, why: str) -> list[str]:
        """Update retention, on a boot known good (docs/updates.md, "Retention"). A failure is logged:
        what it left is collected at the next good boot, and the boot stays good."""
        failed = None
        if self.fallback is not None:
            # Kept for the boot that fell back from it (it reports it), not for every later boot that
            # still finds its used-up entry.
            first = self.store.first_fallback_boot(self.fallback.failed_entry)
            if first in (None, self.boot_id):
                failed = self.fallback.failed_root
        try:
            return self.updates.collect(why, failed=failed)
        except (OSError, btrfsutil.BtrfsUtilError, RastosError) as error:
            log.error("update retention failed (the next good boot tries again): %s", error)
            return []

    # JobListener: passed on to the bus face, and to the hub link

    def job_added(self, job: Job) -> None:
        self.listener.job_added(job)

    def job_changed(self, job: Job, what: str) -> None:
        if what == "State" and self.hub is not None:
            self.hub.job_changed(job)
        self.listener.job_changed(job, what)

    def job_output(self, job: Job, step: int, line: str) -> None:
        self.listener.job_output(job, step, line)
        if self.hub is not None:
            self.hub.job_output(job, step, line)

    def job_finished(self, job: Job) -> None:
        self.listener.job_finished(job)


class _Unheard:
    """The listener until the bus face is wired (and in tests without one): hears nothing."""

    def job_added(self, job: Job) -> None: ...
    def job_changed(self, job: Job, what: str) -> None: ...
    def job_output(self, job: Job, step: int, line: str) -> None: ...
    def job_finished(self, job: Job) -> None: ...
    def boot_state_changed(self) -> None: ...
    def fell_back(self, failed_entry: str, failed_root: str, booted_entry: str) -> None: ...
