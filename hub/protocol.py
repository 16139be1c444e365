"""The messages the hub and its agents exchange over the agent WebSocket, checked at the edge.

Each frame is one JSON object with a `type`. Agent -> hub:
  facts           {"facts": {...}}: the host as it is now (replaces the last report)
  events          {"events": [{"id", "time", "uid", "method", "job", "detail"}]}: the daemon's event
                  log after the hub's cursor, in order; the hub answers `ack` with its new cursor
  command_status  {"command", "state", "job", "result"}: where a dispatched command stands
  update_status   {"update", "state", "version", "detail"}: where an image update the hub sent stands:
                  staging, staged (the host reboots into it if asked), failed or cancelled; `detail`
                  (a string, at most 4096 characters, or null) is the daemon's word on a failure
  action_status   {"action", "state", "snapshot", "entry", "reboot_needed", "error"}: how an action the
                  hub sent ended: done or failed; `snapshot` the one taken (or named), `entry` the boot
                  entry a rollback or one-shot boot wrote, `reboot_needed` whether it waits for a reboot,
                  `error` (at most 4096 characters) the daemon's word on a failure
  compliance      {"command", "report": {"time", "passed", "failed", "not_applicable", "failed_checks":
                  [{"id", "title", "severity", "finding"}]}}: the host's newest compliance scan, as a
                  run's command asked for it (`command`, or null for one the agent sends unasked); it
                  replaces the host's report before. `failed` is the number of `failed_checks`
  output          {"command", "step", "first", "lines"}: lines a step of a command's job printed, while it
                  runs, in batches (daemon/hub_output.py): `step` its index in the run's steps, `first`
                  the number of the first line among all the step printed (a jump is lines skipped),
                  at most OUTPUT_FRAME_LINES lines of at most OUTPUT_LINE_CHARS characters. Relayed
                  to the run's followers and kept only in memory, bounded (hub/live_output.py);
                  what the stored run keeps of a step's output comes with the job's end, as before
Hub -> agent:
  welcome         {"host", "last_event", "commands": [...]}: who the agent is, the newest of its
                  events the hub has, and the commands the hub thinks are in flight there
  command         {"command": {"id", "steps", "flags"}}: run these steps once (the id is the key); or
                  {"command": {"id", "compliance": {"action", "checks"}, "flags"}}: scan the host
                  (`scan`), or scan it and run the failed checks' remediations as one job (`remediate`,
                  only the `checks` named when there are any), then scan again; each scan is answered
                  with a `compliance` frame, the command with command_status as ever
  cancel          {"command": ID}
  confirm         {"job": N}: the agent's risky change made by job N stands (daemon/confirm.py). The hub
                  sends it when a command's final status arrives with a change pending: that the status
                  got here and the confirm gets back is the check that the host is still reachable
  update          {"update": {"id", "url", "version", "reboot"}}: stage the image bundle at `url` (with
                  `reboot`, boot into it once staged) and report with update_status. `url` is a path
                  on the hub (/api/v1/images/ID/bundle), never a whole URL: the agent joins it to the
                  hub's base as it reaches the hub (its agent URL without /api/v1/agent, http(s) for
                  ws(s)), so the hub needs not know how its hosts see it (a NAT, a proxy, QEMU's
                  10.0.2.2), and the host token the download carries (`Authorization: Bearer`) goes
                  nowhere else. While a rollout is active (running, paused or halted), the hub
                  sends it again after each welcome until the agent reports it staged or ended: the
                  id is the key, an agent stages an id once and answers a repeat with its state. An
                  update to the version the host runs already is answered by its facts alone, sent
                  again after it; one to the version staged already (after a restart of rastosd,
                  which forgot the id) with staged, and a reboot into it if asked; one to the version
                  staging with staging, then as that staging ends
  action          {"action": {"id", "kind", "snapshot", "description"}}: take a snapshot (kind
                  `snapshot`, with a description), roll back to one (`rollback`) or boot one once
                  (`boot_once`), each with the snapshot's id. Sent once, only to an agent online, never
                  queued nor sent again: the id is the key the agent does it once by, and its answer
                  comes as action_status, and as the HubAction event in its log (detail.action), which
                  reaches the hub even if the answer was lost with the connection
  ack             {"last_event": N}
  error           {"message": "FIELD: reason"}: the agent's last frame was refused
A message that breaks these rules is answered with `error` naming the field, and the connection is
closed; nothing it carried is stored. What the hub keeps of a well-formed message is bounded (see the
limits below and docs/hub.md): an event's detail or a command's result larger than KEPT_DETAIL_BYTES
keeps its steps' last lines, then its small fields only; it is never refused for its size, since a
daemon resends a refused event forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from hub import strictjson
from hub.errors import HubError

MAX_MESSAGE_BYTES = 1 << 20  # a frame; larger ones are refused before they are read
MAX_EVENTS_PER_MESSAGE = 500
MAX_FACTS_BYTES = 256 << 10  # a host's facts, as JSON: refused above it
KEPT_DETAIL_BYTES = 64 << 10  # an event's detail or a command's result, as JSON: cut down above it
KEPT_OUTPUT = ((100, 1000), (10, 200))  # per step, its last lines and their length: as many as fit
SMALL_FIELD_BYTES = 1024  # what is kept of a detail still too large once its output is cut
MAX_EVENT_ID = 2**62  # fits every database's 64-bit integer
MAX_JOB_ID = 2**62
MAX_UID = 2**32 - 1
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: later than any clock a host can sensibly have
COMMAND_STATES = frozenset({"queued", "running", "done", "failed", "cancelled", "interrupted", "rejected"})
UPDATE_STATES = ("staging", "staged", "failed", "cancelled")
MAX_UPDATE_DETAIL = 4096
UPDATE_STATUS = {
    "type": "object",
    "properties": {
        "type": {"const": "update_status"},
        "update": {"type": "string", "minLength": 1, "maxLength": 64},
        "state": {"enum": list(UPDATE_STATES)},
        "version": {"type": "string", "minLength": 1, "maxLength": 64},
        "detail": {"type": ["string", "null"], "maxLength": MAX_UPDATE_DETAIL},
    },
    "required": ["type", "update", "state", "version"],
}
_UPDATE_STATUS = Draft202012Validator(UPDATE_STATUS)
ACTION_KINDS = ("snapshot", "rollback", "boot_once")
ACTION_STATES = ("done", "failed")
ACTION_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
MAX_SNAPSHOT_ID = 2**62
_SNAPSHOT_ID = {"type": "integer", "minimum": 1, "maximum": MAX_SNAPSHOT_ID}
MAX_DESCRIPTION = 200  # a snapshot's description: a boot menu entry's title too (daemon/snapshots.py)
ACTION = {
    "type": "object",
    "properties": {
        "type": {"const": "action"},
        "action": {"type": "object", "properties": {
            "id": ACTION_ID, "kind": {"enum": list(ACTION_KINDS)},
            "snapshot": {"oneOf": [{"type": "null"}, _SNAPSHOT_ID]},
            "description": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_DESCRIPTION,
                            "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
        }, "required": ["id", "kind", "snapshot", "description"], "additionalProperties": False,
           # a snapshot is taken with a description; a rollback or a one-shot boot names a snapshot
           "if": {"properties": {"kind": {"const": "snapshot"}}},
           "then": {"properties": {"snapshot": {"type": "null"}, "description": {"type": "string"}}},
           "else": {"properties": {"snapshot": {"type": "integer"}, "description": {"type": "null"}}}},
    },
    "required": ["type", "action"],
    "additionalProperties": False,
}  # fmt: skip
_ACTION = Draft202012Validator(ACTION)
ACTION_STATUS = {
    "type": "object",
    "properties": {
        "type": {"const": "action_status"},
        "action": ACTION_ID,
        "state": {"enum": list(ACTION_STATES)},
        "snapshot": {"oneOf": [{"type": "null"}, {**_SNAPSHOT_ID, "minimum": 0}]},
        "entry": {"type": ["string", "null"], "maxLength": 255},
        "reboot_needed": {"type": "boolean"},
        "error": {"type": ["string", "null"], "maxLength": MAX_UPDATE_DETAIL},
    },
    "required": ["type", "action", "state", "snapshot", "entry", "reboot_needed", "error"],
    "additionalProperties": False,
}
_ACTION_STATUS = Draft202012Validator(ACTION_STATUS)
COMPLIANCE_ACTIONS = ("scan", "remediate")
CHECK_ID = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,63}$"}
MAX_CHECKS = 1000  # a scan's checks (65 today): what a report may count or list
MAX_CHECK_TITLE = 200
MAX_FINDING = 1000  # a finding quotes the host's own files: what the hub keeps of one
RUN_COMPLIANCE = {
    "type": "object",
    "description": "a compliance scan, or a remediation of the failed checks (only those named in checks, if any)",
    "properties": {
        "action": {"enum": list(COMPLIANCE_ACTIONS)},
        "checks": {"type": "array", "items": CHECK_ID, "maxItems": 100, "uniqueItems": True,
                   "description": "remediate only: the checks to fix (every failed one an op fixes when empty)"},
    },
    "required": ["action"],
    "additionalProperties": False,
}  # fmt: skip
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_CHECKS}
COMPLIANCE = {
    "type": "object",
    "properties": {
        "type": {"const": "compliance"},
        "command": {"oneOf": [{"type": "null"}, {"type": "string", "minLength": 1, "maxLength": 64}]},
        "report": {"type": "object", "properties": {
            "time": {"type": "number", "minimum": 0, "maximum": 253402300799},
            "passed": _COUNT, "failed": _COUNT, "not_applicable": _COUNT,
            "failed_checks": {"type": "array", "maxItems": MAX_CHECKS, "items": {
                "type": "object", "properties": {
                    "id": CHECK_ID,
                    "title": {"type": "string", "maxLength": MAX_CHECK_TITLE},
                    "severity": {"enum": ["low", "medium", "high"]},
                    "finding": {"type": "string", "maxLength": MAX_FINDING},
                }, "required": ["id", "title", "severity", "finding"], "additionalProperties": False}},
        }, "required": ["time", "passed", "failed", "not_applicable", "failed_checks"],
           "additionalProperties": False},
    },
    "required": ["type", "command", "report"],
    "additionalProperties": False,
}  # fmt: skip
_COMPLIANCE = Draft202012Validator(COMPLIANCE)
OUTPUT_FRAME_LINES = 500
OUTPUT_LINE_CHARS = 1100  # the agent cuts a line at 1,000 and says so
MAX_RUN_STEPS = 256  # as a run's body takes them (hub/api.py)
MAX_LINE_NUMBER = 2**53  # a step printing a line a nanosecond would take a century to get there
OUTPUT = {
    "type": "object",
    "properties": {
        "type": {"const": "output"},
        "command": {"type": "string", "minLength": 1, "maxLength": 64},
        "step": {"type": "integer", "minimum": 0, "maximum": MAX_RUN_STEPS - 1},
        "first": {"type": "integer", "minimum": 0, "maximum": MAX_LINE_NUMBER},
        "lines": {"type": "array", "minItems": 1, "maxItems": OUTPUT_FRAME_LINES,
                  "items": {"type": "string", "maxLength": OUTPUT_LINE_CHARS}},
    },
    "required": ["type", "command", "step", "first", "lines"],
    "additionalProperties": False,
}  # fmt: skip
_OUTPUT = Draft202012Validator(OUTPUT)
FACT_KEYS = {"hostname": str, "version": str, "boot_state": dict, "snapshots": list, "ops": list, "jobs": list}
_TEXT = {"type": "string", "maxLength": 4096}
FACTS = {
    "type": "object",
    "properties": {
        "hostname": {"type": "string", "maxLength": 255},
        "version": {"type": "string", "maxLength": 64},
        "boot_state": {"type": "object", "additionalProperties": _TEXT, "maxProperties": 32},
        "snapshots": {"type": "array", "maxItems": 1000, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0}, "created": {"type": "number", "minimum": 0},
                           "description": _TEXT, "kind": {"type": "string", "maxLength": 64},
                           "known_good": {"type": "boolean"}},
            "required": ["id", "created", "description", "kind", "known_good"],
        }},
        "ops": {"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": 64}},
        "jobs": {"type": "array", "maxItems": 100, "items": {"type": "object"}},
    },
}  # fmt: skip
_FACTS = Draft202012Validator(FACTS)


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


@dataclass(frozen=True)
class UpdateStatus:
    update: str
    state: str
    version: str
    detail: str | None


@dataclass(frozen=True)
class ActionStatus:
    action: str
    state: str
    snapshot: int | None
    entry: str | None
    reboot_needed: bool
    error: str | None

    def result(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "entry": self.entry, "reboot_needed": self.reboot_needed,
                "error": self.error}  # fmt: skip


@dataclass(frozen=True)
class ComplianceReport:
    command: str | None
    time: float
    passed: int
    failed: int
    not_applicable: int
    failed_checks: list[dict[str, str]]

    def as_json(self, received: float) -> dict[str, Any]:
        return {"time": self.time, "received": received, "passed": self.passed, "failed": self.failed,
                "not_applicable": self.not_applicable, "failed_checks": self.failed_checks,
                "command": self.command}  # fmt: skip


@dataclass(frozen=True)
class OutputLines:
    command: str
    step: int
    first: int
    lines: list[str]


AgentMessage = (
    dict[str, Any] | list[AgentEvent] | CommandStatus | UpdateStatus | ActionStatus | ComplianceReport | OutputLines
)


def decode(text: str) -> object:
    """A frame as the hub accepts JSON (hub/strictjson.py): no NaN, infinity, huge integer, lone
    surrogate or deep nesting, each refused naming the field."""
    try:
        return strictjson.loads(text, "message")
    except strictjson.JsonError as error:
        raise ProtocolError(error.message) from None


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
    if kind == "update_status":
        return kind, _update_status(message)
    if kind == "action_status":
        return kind, _action_status(message)
    if kind == "compliance":
        return kind, _compliance(message)
    if kind == "output":
        _checked(_OUTPUT, message, "output")
        return kind, OutputLines(message["command"], message["step"], message["first"], message["lines"])
    raise ProtocolError(
        f"type: unknown message type {_shown(kind)}; known: facts, events, command_status, update_status, "
        "action_status, compliance, output"
    )


def _shown(value: object) -> str:
    return repr(value)[:80]


def _field(document: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    value = document.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}.{key}: must be {_name(kind)}, got {type(value).__name__}")
    return value


def _ranged(document: dict[str, Any], key: str, where: str, low: int, high: int, optional: bool = False) -> Any:
    value = _field(document, key, int, where, optional)
    if value is not None and not low <= value <= high:
        raise ProtocolError(f"{where}.{key}: must be between {low} and {_power(high)}, got {value}")
    return value


def _power(value: int) -> str:
    """2**62 rather than 4611686018427387904: the limits read as the protocol states them."""
    exponent = value.bit_length() - 1
    return f"2**{exponent}" if value == 1 << exponent and exponent > 16 else str(value)


def _name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        kind, kind.__name__
    )


def _facts(facts: dict[str, Any]) -> dict[str, Any]:
    for key in facts:
        if key not in FACT_KEYS:
            raise ProtocolError(f"facts.{_shown(key)[1:-1]}: unknown fact; known: {', '.join(FACT_KEYS)}")
    for key, kind in FACT_KEYS.items():
        _field(facts, key, kind, "facts", optional=True)
    if (size := len(strictjson.dumps(facts))) > MAX_FACTS_BYTES:
        raise ProtocolError(f"facts: {size} bytes, more than the {MAX_FACTS_BYTES} a host's facts may hold")
    _checked(_FACTS, facts, "facts")
    return facts


def _events(items: list[Any]) -> list[AgentEvent]:
    if len(items) > MAX_EVENTS_PER_MESSAGE:
        raise ProtocolError(f"events: at most {MAX_EVENTS_PER_MESSAGE} a message, got {len(items)}")
    parsed: list[AgentEvent] = []
    for index, item in enumerate(items):
        where = f"events[{index}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where}: must be an object")
        event_id = _ranged(item, "id", where, 1, MAX_EVENT_ID)
        if parsed and event_id <= parsed[-1].id:
            raise ProtocolError(f"{where}.id: events must come in increasing order of id")
        when = _time(item, "time", where)
        method = _field(item, "method", str, where)
        if not 1 <= len(method) <= 64 or not method.isprintable():
            raise ProtocolError(f"{where}.method: must be 1 to 64 printable characters")
        uid = _ranged(item, "uid", where, 0, MAX_UID)
        job = _ranged(item, "job", where, 0, MAX_JOB_ID, optional=True)
        detail = kept(_field(item, "detail", dict, where), "an event's detail")
        parsed.append(AgentEvent(event_id, when, uid, method, job, detail))
    return parsed


def _time(document: dict[str, Any], key: str, where: str) -> float:
    value = document.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{where}.{key}: must be a number")
    if not 0 <= value <= MAX_TIME:  # an integer too large for a float fails here, before float() would
        raise ProtocolError(f"{where}.{key}: must be seconds since 1970 up to the year 9999, got {_shown(value)}")
    return float(value)


def _command_status(message: dict[str, Any]) -> CommandStatus:
    command = _field(message, "command", str, "message")
    if not 1 <= len(command) <= 64:
        raise ProtocolError("message.command: must be a command id (1 to 64 characters)")
    state = _field(message, "state", str, "message")
    if state not in COMMAND_STATES:
        raise ProtocolError(f"message.state: {_shown(state)} is not one of {', '.join(sorted(COMMAND_STATES))}")
    result = _field(message, "result", dict, "message", optional=True)
    return CommandStatus(
        command, state, _ranged(message, "job", "message", 0, MAX_JOB_ID, optional=True),
        None if result is None else kept(result, "a command's result"),
    )  # fmt: skip


def _update_status(message: dict[str, Any]) -> UpdateStatus:
    _checked(_UPDATE_STATUS, message, "message")
    return UpdateStatus(message["update"], message["state"], message["version"], message.get("detail"))


def _action_status(message: dict[str, Any]) -> ActionStatus:
    _checked(_ACTION_STATUS, message, "message")
    return ActionStatus(message["action"], message["state"], message["snapshot"], message["entry"],
                        message["reboot_needed"], message["error"])  # fmt: skip


def _compliance(message: dict[str, Any]) -> ComplianceReport:
    _checked(_COMPLIANCE, message, "message")
    report = message["report"]
    checks = report["failed_checks"]
    if report["failed"] != len(checks):
        raise ProtocolError(f"message.report.failed: {report['failed']}, but failed_checks lists {len(checks)}")
    if report["passed"] + report["failed"] + report["not_applicable"] > MAX_CHECKS:
        raise ProtocolError(f"message.report: more than the {MAX_CHECKS} checks a scan may count")
    ids = [check["id"] for check in checks]
    if len(set(ids)) != len(ids):
        raise ProtocolError("message.report.failed_checks: a check is listed twice")
    # int(): JSON Schema counts 1.0 as an integer, and PostgreSQL's integer columns take only ints
    return ComplianceReport(message["command"], float(report["time"]), int(report["passed"]),
                            int(report["failed"]), int(report["not_applicable"]), checks)  # fmt: skip


def command_frame(command_id: str, steps: list[dict[str, Any]], flags: int,
                  compliance: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """What a command carries: its steps, or for a compliance run what to do instead."""
    if compliance is not None:
        return {"id": command_id, "compliance": compliance, "flags": flags}
    return {"id": command_id, "steps": steps, "flags": flags}


def action_frame(action_id: str, kind: str, snapshot: int | None, description: str | None) -> dict[str, Any]:
    """The `action` frame for an agent, checked against its schema as the agent checks it on arrival
    (daemon/hub_actions.py): the hub sends nothing it would refuse from an agent."""
    frame = {"type": "action", "action": {"id": action_id, "kind": kind, "snapshot": snapshot,
                                          "description": description}}  # fmt: skip
    _checked(_ACTION, frame, "action")
    return frame


def _checked(validator: Draft202012Validator, document: dict[str, Any], where: str) -> None:
    """A ProtocolError naming the first field of `document` its schema refuses."""
    error = min(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)), default=None)
    if error is not None:
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        raise ProtocolError(f"{where}{path}: {error.message[:200]}")


def kept(detail: dict[str, Any], what: str) -> dict[str, Any]:
    """What the hub keeps of an agent's free-form object: itself if small; otherwise with each step's
    output cut to its last lines (fewer and shorter if need be); otherwise its small fields only,
    with a note of what went."""
    size = len(strictjson.dumps(detail))
    if size <= KEPT_DETAIL_BYTES:
        return detail
    for lines, chars in KEPT_OUTPUT:
        cut = _cut_output(detail, lines, chars)
        if len(strictjson.dumps(cut)) <= KEPT_DETAIL_BYTES:
            return cut
    small = [(key, value) for key, value in cut.items() if len(strictjson.dumps({key: value})) <= SMALL_FIELD_BYTES]
    note = f"{size} bytes, over the {KEPT_DETAIL_BYTES} the hub keeps of {what}"
    return {**dict(small[: KEPT_DETAIL_BYTES // (2 * SMALL_FIELD_BYTES)]), "omitted": note}


def _cut_output(detail: dict[str, Any], lines: int, chars: int) -> dict[str, Any]:
    """The steps of a job's result (`steps` at the top or under `result`) with their output cut."""
    cut = dict(detail)
    for holder in (cut, cut.get("result")):
        if not isinstance(holder, dict) or not isinstance(holder.get("steps"), list):
            continue
        steps = [dict(step) if isinstance(step, dict) else step for step in holder["steps"]]
        for step in steps:
            if isinstance(step, dict) and isinstance(step.get("output"), list):
                step["output"] = [_line(line, chars) for line in step["output"][-lines:]]
        if holder is cut:
            cut["steps"] = steps
        else:
            cut["result"] = {**holder, "steps": steps}
    return cut


def _line(line: object, chars: int) -> object:
    if isinstance(line, str) and len(line) > chars:
        return line[:chars] + f"... ({len(line) - chars} characters cut)"
    return line
