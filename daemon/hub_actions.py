"""What the hub may ask of this host besides runs: take a snapshot, roll back to one, boot one once.

The hub's `action` frame (docs/hub.md, hub/protocol.py) names one of these with an id. It is checked
here field by field, as every frame from the hub is (the hub is trusted, its frames are still input),
then carried out by the same core methods the D-Bus methods call (Snapshots.Create, Rollback,
BootOnce), as the hub's uid, the way a hub command's job is run: the hub's own event log names the
admin who asked. The outcome is recorded in the daemon's event log as `HubAction` (its detail carries
the action's id), which is what makes it reach the hub once even if the live answer is lost: the log
is the link's outbox (daemon/hub_link.py). The answer, `action_status`, is the same outcome at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.errors import DaemonError, InvalidParams
from daemon.snapshots import Snapshots, check_description
from daemon.store import StateStore

log = logging.getLogger("rastosd.hub")

KINDS = ("snapshot", "rollback", "boot_once")
FIELDS = frozenset({"id", "kind", "snapshot", "description"})
ACTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_SNAPSHOT_ID = 2**62
MAX_ERROR = 4000  # of a failure's message (the hub takes up to 4096 characters)


@dataclass(frozen=True)
class HubAction:
    id: str
    kind: str  # one of KINDS
    snapshot: int | None  # the snapshot a rollback or a one-shot boot starts; None to take one
    description: str | None  # the new snapshot's; None otherwise


class ActionCore(Protocol):
    """What an action needs of the daemon (core.py's Daemon): the same methods its bus face calls."""

    store: StateStore

    def require_snapshots(self) -> Snapshots: ...
    def prepare_rollback(self, snapshot_id: int) -> str: ...
    def boot_once(self, snapshot_id: int) -> str: ...


def action_id(frame: object) -> str | None:
    """The id of an action frame's action, if it has a usable one: a refusal is answered under it."""
    action = frame.get("action") if isinstance(frame, dict) else None
    found = action.get("id") if isinstance(action, dict) else None
    return found if isinstance(found, str) and ACTION_ID.match(found) else None


def parse_action(frame: object) -> HubAction:
    """The action of a hub frame {"type": "action", "action": {...}}; InvalidParams naming the field."""
    action = frame.get("action") if isinstance(frame, dict) else None
    if not isinstance(action, dict):
        raise InvalidParams("action", "must be an object")
    unknown = sorted(str(key) for key in action if key not in FIELDS)
    if unknown:
        raise InvalidParams(f"action.{unknown[0][:64]}", f"unknown field; known: {', '.join(sorted(FIELDS))}")
    found = action_id(frame)
    if found is None:
        raise InvalidParams("action.id", "must be 1 to 64 letters, digits, - or _")
    kind = action.get("kind")
    if kind not in KINDS:
        raise InvalidParams("action.kind", f"must be one of {', '.join(KINDS)}, got {str(kind)[:64]!r}")
    snapshot, description = action.get("snapshot"), action.get("description")
    if kind == "snapshot":
        if snapshot is not None:
            raise InvalidParams("action.snapshot", "must be null to take a snapshot")
        if not isinstance(description, str):
            raise InvalidParams("action.description", "must be a string to take a snapshot")
        check_description(description)
        return HubAction(found, kind, None, description)
    if not isinstance(snapshot, int) or isinstance(snapshot, bool) or not 1 <= snapshot <= MAX_SNAPSHOT_ID:
        raise InvalidParams("action.snapshot", f"must be a snapshot id (1 to 2**62) for {kind}")
    if description is not None:
        raise InvalidParams("action.description", f"must be null for {kind}")
    return HubAction(found, kind, snapshot, None)


def carry_out(daemon: ActionCore, action: HubAction, uid: int) -> dict[str, Any]:
    """Do it once, record the outcome in the event log, and return it as the `action_status` frame."""
    outcome: dict[str, Any] = {"snapshot": action.snapshot, "entry": None, "reboot_needed": False, "error": None}
    try:
        if action.kind == "snapshot":
            assert action.description is not None
            snapshots = daemon.require_snapshots()
            outcome["snapshot"] = snapshots.create(action.description, "manual", uid=uid, method="HubSnapshot")
        else:
            assert action.snapshot is not None
            act = daemon.prepare_rollback if action.kind == "rollback" else daemon.boot_once
            # Either boot entry takes effect at the next boot, not before: the host needs a reboot.
            outcome.update(entry=act(action.snapshot), reboot_needed=True)
        state = "done"
    except DaemonError as error:
        state, outcome["error"] = "failed", _cut(str(error))
    except Exception:  # answered, never raised: the hub waits for this action's answer
        log.exception("hub action %s (%s) failed", action.id, action.kind)
        state, outcome["error"] = "failed", "the daemon could not carry it out: its journal has details"
    log.info("hub action %s (%s): %s", action.id, action.kind, outcome["error"] or state)
    daemon.store.record(uid, "HubAction", None, action=action.id, kind=action.kind, state=state, **outcome)
    return {"type": "action_status", "action": action.id, "state": state, **outcome}


def refused(store: StateStore, found: str, error: DaemonError, uid: int) -> dict[str, Any]:
    """Record and answer an action frame refused before anything was done."""
    outcome = {"snapshot": None, "entry": None, "reboot_needed": False, "error": _cut(str(error))}
    store.record(uid, "HubAction", None, action=found, kind=None, state="failed", **outcome)
    return {"type": "action_status", "action": found, "state": "failed", **outcome}


def _cut(message: str) -> str:
    return message if len(message) <= MAX_ERROR else message[: MAX_ERROR - 3] + "..."
