"""The messages the hub and its agents exchange over the agent WebSocket, checked at the edge.

Each frame is one JSON object with a `type`. Agent -> hub:
  facts           {"facts": {...}}: the host as it is now (replaces the last report)
  events          {"events": [{"id", "time", "uid", "method", "job", "detail"}]}: the daemon's event
                  log after the hub's cursor, in order; the hub answers `ack` with its new cursor
  command_status  {"command", "state", "job", "result"}: where a dispatched command stands
Hub -> agent:
  welcome         {"host", "last_event", "commands": [...]}: who the agent is, the newest of its
                  events the hub has, and the commands the hub thinks are in flight there
  command         {"command": {"id", "steps", "flags"}}: run these steps once (the id is the key)
  cancel          {"command": ID}
  confirm         {"job": N}: the agent's risky change made by job N stands (daemon/confirm.py). The hub
                  sends it when a command's final status arrives with a change pending: that the status
                  got here and the confirm gets back is the check that the host is still reachable
  ack             {"last_event": N}
A message that breaks these rules is answered with `error` naming the field, and the connection is
closed; nothing it carried is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hub.errors import HubError

MAX_MESSAGE_BYTES = 1 << 20
MAX_EVENTS_PER_MESSAGE = 500
COMMAND_STATES = frozenset({"queued", "running", "done", "failed", "cancelled", "interrupted", "rejected"})
FACT_KEYS = {"hostname": str, "version": str, "boot_state": dict, "snapshots": list, "ops": list, "jobs": list}


class ProtocolError(HubError):
    pass


@dataclass(frozen=True)
class AgentEvent:
    id: int
    time: float
    uid: int
    method: str
    job: int | None
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "method": self.method,
                "detail": {**self.detail, "uid": self.uid, "job": self.job}}  # fmt: skip


@dataclass(frozen=True)
class CommandStatus:
    command: str
    state: str
    job: int | None
    result: dict[str, Any] | None


AgentMessage = dict[str, Any] | list[AgentEvent] | CommandStatus


MAX_EVENT_ID = 2**62  # fits every database's 64-bit integer


def decode(text: str) -> object:
    """JSON as the hub accepts it: no NaN or Infinity (no database column takes them)."""

    def refuse(constant: str) -> object:
        raise ProtocolError(f"message: {constant} is not allowed in JSON here")

    return json.loads(text, parse_constant=refuse)


def parse_agent_message(message: object) -> tuple[str, AgentMessage]:
    if not isinstance(message, dict):
        raise ProtocolError("message: must be a JSON object")
    kind = message.get("type")
    if kind == "facts":
        return kind, _facts(_field(message, "facts", dict, "message"))
    if kind == "events":
        return kind, _events(_field(message, "events", list, "message"))
    if kind == "command_status":
        return kind, _command_status(message)
    raise ProtocolError(f"type: unknown message type {kind!r}; known: facts, events, command_status")


def _field(document: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    value = document.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}.{key}: must be {_name(kind)}, got {type(value).__name__}")
    return value


def _name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        kind, kind.__name__
    )


def _facts(facts: dict[str, Any]) -> dict[str, Any]:
    for key in facts:
        if key not in FACT_KEYS:
            raise ProtocolError(f"facts.{key}: unknown fact; known: {', '.join(FACT_KEYS)}")
    for key, kind in FACT_KEYS.items():
        _field(facts, key, kind, "facts", optional=True)
    return facts


def _events(items: list[Any]) -> list[AgentEvent]:
    if len(items) > MAX_EVENTS_PER_MESSAGE:
        raise ProtocolError(f"events: at most {MAX_EVENTS_PER_MESSAGE} a message, got {len(items)}")
    parsed: list[AgentEvent] = []
    for index, item in enumerate(items):
        where = f"events[{index}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where}: must be an object")
        event_id = _field(item, "id", int, where)
        if not 1 <= event_id <= MAX_EVENT_ID:
            raise ProtocolError(f"{where}.id: must be between 1 and 2**62, got {event_id}")
        if parsed and event_id <= parsed[-1].id:
            raise ProtocolError(f"{where}.id: events must come in increasing order of id")
        when = item.get("time")
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise ProtocolError(f"{where}.time: must be a number")
        method = _field(item, "method", str, where)
        if not 1 <= len(method) <= 64 or not method.isprintable():
            raise ProtocolError(f"{where}.method: must be 1 to 64 printable characters")
        parsed.append(
            AgentEvent(event_id, float(when), _field(item, "uid", int, where), method,
                       _field(item, "job", int, where, optional=True), _field(item, "detail", dict, where))
        )  # fmt: skip
    return parsed


def _command_status(message: dict[str, Any]) -> CommandStatus:
    command = _field(message, "command", str, "message")
    state = _field(message, "state", str, "message")
    if state not in COMMAND_STATES:
        raise ProtocolError(f"message.state: {state!r} is not one of {', '.join(sorted(COMMAND_STATES))}")
    return CommandStatus(
        command, state, _field(message, "job", int, "message", optional=True),
        _field(message, "result", dict, "message", optional=True),
    )  # fmt: skip
