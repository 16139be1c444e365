"""A new deployment made the host's own: files carried from the running root, what the admins did
through rastosd re-applied, and what they changed by hand reported.

The new tree is a fresh image; the running root is the host. Three things bring the host over:

1. Files carried, byte for byte with their modes and owners (an owner by name where the new tree
   numbers it otherwise): the host's identity and secrets, which no op could make again the same way
   (`ALWAYS`, the SSH host keys, the hub token), and files an admin may have changed that the image
   also ships (`WHEN_CHANGED`, and the update keys the host trusts now: carried only when they differ
   from the pristine image's, so a new image's default, or its choice of keys, is not overwritten by
   an old, unchanged one).
   Everything is read and written through ops/rootfs.py: a link in place of a carried file, or on the
   way to it, in either tree is reported and neither followed nor replaced.
2. Host state re-applied with the op library on the new tree, offline as the image builder does
   (`Target(new_root, runtime=False)`: files only, nothing of the running system touched): first the
   declared state (/etc/rastos/rastos.toml), then every step the running root holds
   (history.py says which, and how rollbacks count). This is how /etc/hostname, users (passwd, shadow,
   group, gshadow, their sudo rules and keys), sysctl files, firewall and the rest come over: never by
   copying the files, which the new image may have changed. A user op that let useradd choose the uid
   is re-applied with the uid the account has on the running root, so the homes on the shared @home
   keep their owner. A step that fails on the new tree fails the whole preparation, naming the job,
   the step and the op. `update` steps are not re-applied: the new image is the upgrade, and packages
   such a step installed that the new tree lacks are named instead.
3. Hand changes under /etc reported (hand_changes.py), never merged.

Not carried, on purpose: /home, /var/log and /var/lib/rastos (and a hub appliance's /var/lib/postgresql
and /var/lib/rastos-hub) are subvolumes every deployment shares;
volatile files (adjtime, resolv.conf, ld.so.cache, passwd- and the like) are the system's to rewrite.
"""

from __future__ import annotations

import logging
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import btrfsutil

from daemon.config import DaemonConfig
from daemon.snapshots import subvolume_path
from daemon.store import StateStore
from daemon.updates.disk_ids import FILES, id_changes, with_host_ids
from daemon.updates.hand_changes import hand_changes
from daemon.updates.history import RECORD, StepRef, held_steps, record_text
from ops.certs import CA_CERT, CA_KEY
from ops.certs import HOST_CERT as TLS_CERT
from ops.certs import HOST_KEY as TLS_KEY
from ops.declared import desired_state_from_text
from ops.errors import UnsafePath
from ops.rootfs import Root
from ops.steps import Step, run_step, step_from
from ops.target import Target
from ops.update import backend_for
from rastos.errors import RastosError

log = logging.getLogger("rastosd.updates")

DECLARED = "/etc/rastos/rastos.toml"
FSTAB = "/etc/fstab"
UPDATE_KEYS = "/etc/rastos/update-keys.d"
SSH_DIR = "/etc/ssh"
PASSWD, GROUP = "/etc/passwd", "/etc/group"
SSH_HOST_KEY = re.compile(r"^ssh_host_[a-z0-9]+_key(\.pub)?$")
# The host's identity and what the certs op made (keys are made when it applies, so applying it again
# would make new ones and void what the old CA issued): always the running root's.
ALWAYS = ("/etc/machine-id", DECLARED, CA_KEY, CA_CERT, TLS_KEY, TLS_CERT)
# Shipped by the image and changed by an admin: the host's when it differs from the image it ran. A
# daemon.toml holds the hub's URL, and hub-ca.pem the CA enrolment installed beside it (Hub.Join):
# losing either would cut the host off its fleet. root's keys are not in @home: without them an admin
# who logs in as root would be locked out. A hub appliance's hub.env says where it listens and with
# which certificate: the image's own serves loopback only, which would cut the fleet off its hub.
WHEN_CHANGED = (
    "/etc/rastos/daemon.toml",
    "/etc/rastos/hub-ca.pem",
    "/root/.ssh/authorized_keys",
    "/etc/rastos-hub/hub.env",
)

Output = Callable[[str], None]


class CarryFailed(RastosError):
    """The new tree cannot be made the host's; the stager discards it. `job`, `step` (1-based) and `op`
    name the step that failed, where a step did (`job` None: the declared state's step)."""

    def __init__(
        self, message: str, *, job: int | None = None, step: int | None = None, op: str | None = None,
        hint: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, hint=hint)
        self.job = job
        self.step = step
        self.op = op


def prepare_deployment(
    new_root: Path,
    running_root: Path,
    pristine_image: Path | None,
    store: StateStore,
    *,
    config: DaemonConfig | None = None,
    running_subvolume: str | None = None,
    output: Output | None = None,
) -> dict[str, Any]:
    """Make `new_root` (a writable snapshot of the new image) the host's: carry files, re-apply host
    state, report hand changes (module docstring). Returns what was done, as JSON-able data:
    carried, not_carried, reapplied [{source, job, step, op, changed}], not_reapplied, warnings,
    chain (the running root and the roots it came from), hand_changes, hand_changes_truncated and,
    without a pristine image, hand_changes_note.

    `running_subvolume` is the running root as the boots table names it (the daemon's
    `root_subvolume`; by default read from `running_root`, which an overlay boot cannot). Call this
    with the job lock held (`JobManager.run_lock`): a job that ran between reading the history and
    carrying the files would be in neither. Raises CarryFailed; nothing is written outside new_root."""
    config = config or DaemonConfig()
    subvolume = running_subvolume if running_subvolume is not None else _subvolume_of(running_root)
    running, new = Root(running_root), Root(new_root)
    pristine = Root(pristine_image) if pristine_image is not None else None
    try:
        held = held_steps(store, running, subvolume)
    except RastosError as error:
        raise CarryFailed(error.message, hint=error.hint) from None
    files = _Files(running, new, pristine)
    files.carry_all(config)
    image = Target(pristine_image, runtime=False) if pristine_image is not None else None
    steps = _Reapply(Target(new_root, runtime=False), image, running, store, output or _log)
    steps.declared()
    steps.held(held.steps)
    try:
        new.write(RECORD, record_text(held, subvolume), 0o644)
    except (UnsafePath, OSError) as error:
        raise CarryFailed(f"cannot record what the new deployment was made of: {error}") from None
    result: dict[str, Any] = {
        "chain": held.chain,
        "carried": files.carried,
        "not_carried": files.refused,
        "reapplied": steps.applied,
        "not_reapplied": held.skipped + steps.skipped,
        "warnings": steps.account_warnings(),
    }
    if pristine is None:
        note = "no pristine image to compare with: hand changes were not looked for"
        result |= {"hand_changes": [], "hand_changes_truncated": 0, "hand_changes_note": note}
    else:
        entries, truncated = hand_changes(running, pristine, new, files.paths | steps.paths | {RECORD})
        result |= {"hand_changes": entries, "hand_changes_truncated": truncated}
    return result


def _subvolume_of(root: Path) -> str:
    try:
        return subvolume_path(root)
    except btrfsutil.BtrfsUtilError:
        return ""  # not on btrfs: no boots name it, so every job counts (history.py)


def _log(line: str) -> None:
    log.info("%s", line)


class _Files:
    """Carrying files from the running root to the new tree, each through the link-refusing access."""

    def __init__(self, running: Root, new: Root, pristine: Root | None) -> None:
        self.running = running
        self.new = new
        self.pristine = pristine
        self.carried: list[dict[str, Any]] = []
        self.refused: list[dict[str, str]] = []
        self.paths: set[str] = set()
        self._tables: dict[tuple[Path, str], dict[int, str]] = {}

    def carry_all(self, config: DaemonConfig) -> None:
        for path in ALWAYS:
            self.carry(path)
        self.carry(str(config.hub_token_file))
        for path in WHEN_CHANGED:
            self.carry(path, when_changed=True)
        self.carry_host_keys()
        self.carry_update_keys()
        self.carry_disk_ids()

    def carry(self, path: str, *, when_changed: bool = False) -> None:
        try:
            status = self.running.lstat(path)
            if status is None:
                return
            if stat.S_ISLNK(status.st_mode):
                self.refuse(path, "is a symbolic link on the running root: not followed, not carried")
                return
            content = self.running.read_bytes(path) if stat.S_ISREG(status.st_mode) else None
            if content is None:
                self.refuse(path, "is not a regular file on the running root: not carried")
                return
            if when_changed and self.as_in_image(path, content, status.st_mode, status.st_uid, status.st_gid):
                return
            there = self.new.kind(path)
            if there not in (None, "file"):
                shown = "symbolic link" if there == "link" else there
                self.refuse(path, f"is a {shown} in the new tree: left as it is, neither followed nor replaced")
                return
            self.make_parents(path)
            mode, uid, gid = (
                stat.S_IMODE(status.st_mode),
                self.owner(status.st_uid, PASSWD),
                self.owner(status.st_gid, GROUP),
            )
            self.new.write(path, content, mode, uid, gid, mtime_ns=status.st_mtime_ns)
        except UnsafePath as error:
            self.refuse(path, str(error))
            return
        self.paths.add(path)
        self.carried.append({"path": path, "action": "copied", "mode": f"{mode:04o}", "owner": f"{uid}:{gid}"})

    def refuse(self, path: str, reason: str) -> None:
        log.warning("not carried: %s: %s", path, reason)
        self.refused.append({"path": path, "reason": reason})

    def as_in_image(self, path: str, content: bytes, mode: int, uid: int, gid: int) -> bool:
        """The file is the pristine image's, unchanged (without a pristine image nobody can tell: no)."""
        if self.pristine is None:
            return False
        try:
            status = self.pristine.lstat(path)
            if status is None or not stat.S_ISREG(status.st_mode):
                return False
            same_status = (status.st_mode, status.st_uid, status.st_gid) == (mode, uid, gid)
            return same_status and self.pristine.read_bytes(path) == content
        except UnsafePath:
            return False

    def make_parents(self, path: str) -> None:
        """Directories the new tree lacks on the way, moded and owned as the running root's (/root/.ssh
        is 0700, not the 0755 a plain write would make)."""
        parts = path.strip("/").split("/")[:-1]
        for end in range(1, len(parts) + 1):
            directory = "/" + "/".join(parts[:end])
            if self.new.kind(directory) is not None:
                continue
            status = self.running.lstat(directory)
            if status is None or not stat.S_ISDIR(status.st_mode):
                return  # the write makes it, root's
            mode = stat.S_IMODE(status.st_mode)
            self.new.make_directory(
                directory, mode, self.owner(status.st_uid, PASSWD), self.owner(status.st_gid, GROUP)
            )

    def owner(self, number: int, table: str) -> int:
        """The new tree's id for the running root's user (PASSWD) or group (GROUP) of that number: the same
        name's, where both trees know it (a system group's id depends on the order packages came in);
        otherwise the number as it is."""
        if number == 0:
            return 0
        name = self.ids(self.running, table).get(number)
        numbers = {value: key for key, value in self.ids(self.new, table).items()}
        return numbers.get(name, number) if name is not None else number

    def ids(self, root: Root, table: str) -> dict[int, str]:
        key = (root.root, table)
        if key not in self._tables:
            try:
                text = root.read_text(table) or ""
            except UnsafePath:
                text = ""
            rows = [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]
            self._tables[key] = {int(row[2]): row[0] for row in rows if len(row) > 2 and row[2].isdigit()}
        return self._tables[key]

    def carry_host_keys(self) -> None:
        """The host's SSH keys; a key type the host does not have goes from the new tree, so the host
        shows exactly its own keys (a host without any keeps the image's)."""
        try:
            keys = [name for name in self.running.names(SSH_DIR) if SSH_HOST_KEY.match(name)]
            extra = [name for name in self.new.names(SSH_DIR) if SSH_HOST_KEY.match(name) and name not in keys]
        except UnsafePath as error:
            self.refuse(SSH_DIR, str(error))
            return
        for name in keys:
            self.carry(f"{SSH_DIR}/{name}")
        for name in extra if keys else []:
            path = f"{SSH_DIR}/{name}"
            try:
                self.new.remove(path)
            except UnsafePath as error:
                self.refuse(path, str(error))
                continue
            self.paths.add(path)
            self.carried.append({"path": path, "action": "removed", "reason": "a host key the host does not have"})

    def carry_update_keys(self) -> None:
        """The keys the host trusts now (rastos/bundle.py's rule: root's, not writable by others, no
        link) that it did not get from its image: a key as the image shipped it is the new image's to
        keep or drop, so a key rotated out of the images leaves the hosts with the next update."""
        try:
            names = [name for name in self.running.names(UPDATE_KEYS) if name.endswith(".pub")]
        except UnsafePath as error:
            self.refuse(UPDATE_KEYS, str(error))
            return
        for name in names:
            path = f"{UPDATE_KEYS}/{name}"
            try:
                status = self.running.lstat(path)
            except UnsafePath as error:
                self.refuse(path, str(error))
                continue
            if status is None:
                continue
            if not stat.S_ISREG(status.st_mode) or status.st_uid != 0 or status.st_mode & 0o022:
                self.refuse(path, "not trusted on the running host (a link, not root's, or writable by others)")
                continue
            self.carry(path, when_changed=True)

    def carry_disk_ids(self) -> None:
        """The host's file system ids in the new tree's fstab and kernel command line (disk_ids.py)."""
        try:
            changes = id_changes(self.running.read_text(FSTAB) or "", self.new.read_text(FSTAB) or "")
            for path in FILES if changes else ():
                status, text = self.new.lstat(path), self.new.read_text(path)
                if status is None or text is None or (rewritten := with_host_ids(text, changes)) == text:
                    continue
                self.new.write(path, rewritten.encode(), stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid)
                self.paths.add(path)
                self.carried.append({"path": path, "action": "host file system ids", "ids": sorted(changes.values())})
        except UnsafePath as error:
            self.refuse(FSTAB, str(error))


class _Reapply:
    """Steps re-applied to the new tree, one by one, as the image builder applies them."""

    def __init__(self, target: Target, image: Target | None, running: Root, store: StateStore, output: Output) -> None:
        self.target = target
        self.image = image  # the pristine image: what a step changes there is the op's, not a hand change
        self.running = running
        self.store = store
        self.output = output
        self.applied: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.paths: set[str] = set()  # every path a re-applied step writes, here or on the image
        self._installed: dict[str, str] | None = None

    def declared(self) -> None:
        try:
            text = self.running.read_text(DECLARED)
        except UnsafePath as error:
            raise CarryFailed(f"cannot read the declared state: {error}") from None
        if text is None:
            return
        try:
            steps = desired_state_from_text(text, Path(DECLARED))
        except RastosError as error:
            raise CarryFailed(f"the declared state on the running root: {error}") from None
        for number, declared in enumerate(steps, 1):
            self.one(declared["op"], declared["params"], {"source": "declared", "job": None, "step": number})

    def held(self, refs: list[StepRef]) -> None:
        by_job: dict[int, list[dict[str, Any]]] = {}
        for ref in refs:
            steps = by_job.setdefault(ref.job, self.store.steps(ref.job))
            if ref.position >= len(steps):
                raise CarryFailed(f"job {ref.job} has no step {ref.position + 1} in the state store", job=ref.job)
            stored = steps[ref.position]
            self.one(stored["op"], stored["params"], {"source": "job", "job": ref.job, "step": ref.position + 1})

    def one(self, op_name: str, params: dict[str, Any], where: dict[str, Any]) -> None:
        entry = {**where, "op": op_name}
        if op_name == "update":
            self.skip_update(entry, params)
            return
        # A param left out is stored as null (the schema's "no default"): left out again, as it was given.
        params = self.pinned(op_name, {key: value for key, value in params.items() if value is not None}, entry)
        try:
            step = step_from(self.target, op_name, params, "")
            plan = run_step(step, self.target, lambda line: self.output(f"{op_name}: {line}"))
        except Exception as error:  # whatever it is, the deployment is discarded: name the step
            shown = str(error) if isinstance(error, RastosError) else f"{type(error).__name__}: {error}"
            raise CarryFailed(
                f"{_place(entry)} does not apply to the new tree: {shown}", job=entry["job"], step=entry["step"],
                op=op_name,
            ) from error  # fmt: skip
        entry["changed"] = bool(plan.actions)
        self.paths.update(plan.paths)
        self.paths.update(self.written_on_image(step))
        self.applied.append(entry)
        log.info("re-applied %s: %s", _place(entry), "changed" if plan.actions else "unchanged")

    def written_on_image(self, step: Step) -> list[str]:
        """The paths the step would write on the pristine image: the op's files even where the new
        tree needed no change (a second preparation of one tree reports what the first did). Only a
        plan, read-only; a step that cannot be planned there alone (a user an earlier step makes)
        names none."""
        if self.image is None:
            return []
        try:
            return step.op.plan(self.image, step.params).paths
        except Exception:  # planned out of its sequence, on a tree it was never meant for
            return []

    def pinned(self, op_name: str, params: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        """A user op that let useradd choose the uid gets the uid the account has on the running root."""
        if op_name != "user":
            return params
        entry["user"] = params.get("name")
        if params.get("state", "present") != "present" or params.get("uid") is not None:
            return params
        uid = _accounts(self.running).get(str(params.get("name")), (None, None))[0]
        if uid is None:
            return params
        entry["uid"] = uid
        return {**params, "uid": uid}

    def skip_update(self, entry: dict[str, Any], params: dict[str, Any]) -> None:
        entry["reason"] = "an upgrade in place is not re-applied: the new image is the upgrade"
        missing = [name for name in params.get("packages") or [] if name not in self.installed()]
        if missing:
            entry["packages_missing"] = missing
            entry["reason"] += f"; packages it installed that the new tree lacks: {', '.join(missing)}"
        self.skipped.append(entry)

    def installed(self) -> dict[str, str]:
        if self._installed is None:
            try:
                self._installed = backend_for(self.target).installed()
            except (RastosError, OSError) as error:
                log.warning("cannot tell which packages the new tree has: %s", error)
                self._installed = {}
        return self._installed

    def account_warnings(self) -> list[str]:
        """Accounts re-applied whose ids differ from the running root's (a group id useradd chose)."""
        before, after = _accounts(self.running), _accounts(self.target.files)
        names = {str(entry["user"]) for entry in self.applied if entry["op"] == "user"}
        return [
            f"user {name}: uid:gid {before[name][0]}:{before[name][1]} on the running root, "
            f"{after[name][0]}:{after[name][1]} in the new tree"
            for name in sorted(names & set(before) & set(after))
            if before[name] != after[name]
        ]


def _accounts(root: Root) -> dict[str, tuple[int, int]]:
    try:
        text = root.read_text("/etc/passwd") or ""
    except UnsafePath:
        return {}
    rows = [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]
    numbered = [row for row in rows if len(row) > 3 and row[2].isdigit() and row[3].isdigit()]
    return {row[0]: (int(row[2]), int(row[3])) for row in numbered}


def _place(entry: dict[str, Any]) -> str:
    if entry["job"] is None:
        return f"{DECLARED} step {entry['step']} ({entry['op']})"
    return f"job {entry['job']} step {entry['step']} ({entry['op']})"
