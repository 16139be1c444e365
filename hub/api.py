"""The REST API's contract: request schemas (JSON Schema, checked with `jsonschema`) and the OpenAPI
document built from the same schemas, so what the document promises is what the hub enforces."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Any

from jsonschema import Draft202012Validator

from hub import strictjson
from hub.errors import HubError
from hub.protocol import ACTION_KINDS, MAX_DESCRIPTION, MAX_SNAPSHOT_ID, RUN_COMPLIANCE
from hub.roles import RANKS, Access
from rastos import __version__

# Any JSON value the hub takes in (hub/strictjson.py), where the API takes free-form JSON. Its depth
# (at most strictjson.MAX_DEPTH) and strings without lone surrogates are checked, but not said here.
JSON_VALUE = {
    "description": f"any JSON; numbers fit 64 bits, nesting at most {strictjson.MAX_DEPTH} deep",
    "anyOf": [
        {"type": ["null", "boolean", "string"]},
        {"type": "number", "minimum": strictjson.LOWEST, "exclusiveMaximum": strictjson.BEYOND},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
    ],
}
SCHEMAS = {"JsonValue": JSON_VALUE}
NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
EVENT_METHOD = {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_.-]{0,63}$"}
STEP = {
    "type": "object",
    "properties": {
        "op": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"},
        "params": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
    },
    "required": ["op"],
    "additionalProperties": False,
}
TARGET = {
    "description": "exactly one of: hosts by name, one group, or all hosts",
    "oneOf": [
        {"type": "object", "properties": {"hosts": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 10000}},
         "required": ["hosts"], "additionalProperties": False},
        {"type": "object", "properties": {"group": NAME}, "required": ["group"], "additionalProperties": False},
        {"type": "object", "properties": {"all": {"const": True}}, "required": ["all"], "additionalProperties": False},
    ],
}  # fmt: skip
NEW_HOST = {
    "type": "object",
    "properties": {"name": NAME, "groups": {"type": "array", "items": NAME, "maxItems": 32, "uniqueItems": True}},
    "required": ["name"],
    "additionalProperties": False,
}
WORKFLOW_NAME = {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,40}$"}
RUN_WORKFLOW = {
    "type": "object",
    "description": "a workflow (GET /api/v1/workflows) the hub expands into the run's steps",
    "properties": {
        "name": WORKFLOW_NAME,
        "variables": {"type": "object", "maxProperties": 64, "description": "variable name -> value",
                      "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}  # fmt: skip
NEW_RUN_FIELDS = {
    "type": "object",
    "description": "steps, a workflow, or a compliance scan or remediation: exactly one",
    "properties": {
        "target": TARGET,
        "steps": {"type": "array", "items": STEP, "minItems": 1, "maxItems": 256},
        "workflow": RUN_WORKFLOW,
        "compliance": RUN_COMPLIANCE,
        "flags": {"type": "integer", "minimum": 0, "maximum": 7, "description": "dry-run 1, no-snapshot 2, restore 4"},
        "parallelism": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10},
    },
    "required": ["target"],
    "additionalProperties": False,
}
# What the document says; the hub checks the fields by the schema and "exactly one" in check_new_run,
# where a refusal can name the field.
RUN_KINDS = ("steps", "workflow", "compliance")
NEW_RUN = {**NEW_RUN_FIELDS, "oneOf": [{"required": [kind]} for kind in RUN_KINDS]}
NEW_ROLLOUT = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "minLength": 1, "maxLength": 64, "description": "an image's id"},
        "target": TARGET,
        "canary": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 1,
                   "description": "hosts in the first wave (the first of `hosts` as given, by name otherwise)"},
        "wave_percent": {"type": "integer", "minimum": 1, "maximum": 100, "default": 25,
                         "description": "each later wave: this share of the hosts after the canary, rounded up"},
        "health_timeout_s": {"type": "integer", "minimum": 1, "maximum": 604800, "default": 900,
                             "description": "seconds from a host's update to its healthy report on the version"},
    },
    "required": ["image", "target"],
    "additionalProperties": False,
}  # fmt: skip
MAX_GRACE = 30 * 86400  # seconds an old token may outlive its rotation
ROTATION = {
    "type": "object",
    "properties": {
        "grace_s": {"type": "integer", "minimum": 0, "maximum": MAX_GRACE, "default": 0,
                    "description": "seconds the old token keeps working (0: it stops now)"},
    },
    "additionalProperties": False,
}  # fmt: skip
LOGIN = {
    "type": "object",
    "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 200}},
    "required": ["token"],
    "additionalProperties": False,
}


HOST_ACTION_FIELDS = {
    "type": "object",
    "description": "snapshot (with a description), or rollback or boot_once (with a snapshot)",
    "properties": {
        "action": {"enum": list(ACTION_KINDS), "description": "take a snapshot of the running root; make a "
                   "snapshot's writable copy the next boot's default (rollback); boot a snapshot read-only, "
                   "the next boot only (boot_once)"},
        "snapshot": {"type": "integer", "minimum": 1, "maximum": MAX_SNAPSHOT_ID,
                     "description": "the snapshot's id, as the host's facts list it (rollback, boot_once)"},
        "description": {"type": "string", "minLength": 1, "maxLength": MAX_DESCRIPTION,
                        "pattern": "^[^\\x00-\\x1f\\x7f]*$",
                        "description": "the new snapshot's, one printable line (snapshot)"},
    },
    "required": ["action"],
    "additionalProperties": False,
}  # fmt: skip
# What the document says: the fields, and which action takes which. The hub checks the fields by the
# schema, and which action takes which in check_host_action, where a refusal can name the field. (The
# host's rastosd checks a description again as Snapshots.Create does: one it refuses fails the action.)
HOST_ACTION = {**HOST_ACTION_FIELDS, "allOf": [
    {"if": {"properties": {"action": {"const": "snapshot"}}},
     "then": {"required": ["description"], "not": {"required": ["snapshot"]}},
     "else": {"required": ["snapshot"], "not": {"required": ["description"]}}},
]}  # fmt: skip


def check_host_action(body: dict[str, Any]) -> dict[str, Any]:
    """A host action's body (checked against HOST_ACTION_FIELDS) whose action has what it takes."""
    action = body["action"]
    needed, unwanted = ("description", "snapshot") if action == "snapshot" else ("snapshot", "description")
    if needed not in body:
        raise HubError(f"{needed}: required for the action {action}")
    if unwanted in body:
        raise HubError(f"{unwanted}: the action {action} takes none")
    return body


def check_new_run(body: dict[str, Any]) -> dict[str, Any]:
    """A run's body (checked against NEW_RUN_FIELDS) with exactly one of steps, a workflow and compliance."""
    given = [kind for kind in RUN_KINDS if kind in body]
    if len(given) > 1:
        raise HubError(f"{given[1]}: a run has one of steps, a workflow or compliance, not {' and '.join(given)}")
    if not given:
        raise HubError("steps: required (or a workflow, or compliance)")
    compliance = body.get("compliance")
    if compliance is not None and compliance.get("checks") and compliance["action"] != "remediate":
        raise HubError("compliance.checks: only a remediation takes checks; a scan runs them all")
    return body


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of `schema` whose references resolve as in the OpenAPI document (#/components/...)."""
    return Draft202012Validator({"$ref": "#/$defs/body", "$defs": {"body": schema}, "components": {"schemas": SCHEMAS}})


_VALIDATORS = {
    id(schema): _validator(schema)
    for schema in (NEW_HOST, NEW_RUN_FIELDS, NEW_ROLLOUT, ROTATION, LOGIN, HOST_ACTION_FIELDS)
}
MAX_MESSAGE_CHARS = 300  # jsonschema's messages hold the value they are about, which may be large


def validate(schema: dict[str, Any], document: object) -> dict[str, Any]:
    """The document if it matches; otherwise a HubError naming the first bad field."""
    found = islice(_VALIDATORS[id(schema)].iter_errors(document), 100)
    errors = sorted(found, key=lambda error: [str(part) for part in error.absolute_path])
    if errors:
        error = errors[0]
        best = min(error.context or [error], key=lambda e: len(e.message))  # a oneOf: its plainest reason
        path = ".".join(str(part) for part in best.absolute_path) or "body"
        raise HubError(f"{path}: {best.message[:MAX_MESSAGE_CHARS]}")
    assert isinstance(document, dict)
    return document


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _answer(description, ERROR)


# What the hub answers: the objects of its state, as the UI's stream carries them too.
ROLE = {"enum": [role.value for role in RANKS]}
ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "FIELD: reason"},
        "needed_role": {**ROLE, "description": "a 403 for a role too low: the role the operation needs"},
        "role": {**ROLE, "description": "a 403 for a role too low: the caller's"},
    },
    "required": ["error"],
}
ME = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "role": ROLE,
        "may": {"type": "array", "items": {"type": "string"},
                "description": "each operation the role allows, as METHOD PATH (POST /api/v1/runs/{id}/cancel)"},
    },
    "required": ["name", "role", "may"],
}  # fmt: skip
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_OBJECT_OR_NULL = {"type": ["object", "null"]}
HOST_ACTION_STATE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "time": {"type": "number"},
        "admin": {"type": "string", "description": "who asked"},
        "action": {"enum": list(ACTION_KINDS)},
        "snapshot": {"type": ["integer", "null"]},
        "description": {"type": ["string", "null"]},
        "state": {"enum": ["sent", "done", "failed", "lost"],
                  "description": "lost: the connection ended before an answer; the host's event log still "
                                 "brings its outcome if it carried it out"},
        "result": {"type": ["object", "null"], "properties": {
            "snapshot": {"type": ["integer", "null"], "description": "the snapshot taken, or named"},
            "entry": {"type": ["string", "null"], "description": "the boot entry written"},
            "reboot_needed": {"type": ["boolean", "null"]},
            "error": {"type": ["string", "null"], "description": "the daemon's word on a failure"}}},
        "finished": _NUMBER_OR_NULL,
    },
    "required": ["id", "time", "admin", "action", "snapshot", "description", "state", "result", "finished"],
}  # fmt: skip
COMPLIANCE_STATE = {
    "description": "the host's newest compliance scan (null before its first)",
    "properties": {
        "time": {"type": "number", "description": "when the host scanned, by its clock"},
        "received": {"type": "number"},
        "passed": {"type": "integer"},
        "failed": {"type": "integer"},
        "not_applicable": {"type": "integer"},
        "score": {"type": ["number", "null"], "description": "passed / (passed + failed), from 0 to 1; null when "
                  "no check applies"},
        "failed_checks": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "title": {"type": "string"}, "severity": {"enum": ["low", "medium", "high"]},
            "finding": {"type": "string"}}, "required": ["id", "title", "severity", "finding"]}},
        "command": {"type": ["string", "null"], "description": "the run's command that asked for it"},
    },
    "required": ["time", "received", "passed", "failed", "not_applicable", "score", "failed_checks", "command"],
}  # fmt: skip
HOST_BOOT = {
    "type": "object",
    "description": "one boot as the host's agent reported it (its `Booted` event), each text at most 255 "
                   "characters; `failed_entry` and `failed_root` name a new deployment that did not boot, when "
                   "this boot fell back from it",
    "properties": {
        "time": {"type": "number"}, "boot": {"type": "string"}, "root": {"type": "string"},
        "kind": {"type": "string"}, "snapshot": {"type": ["integer", "null"]}, "entry": {"type": "string"},
        "image_version": {"type": "string"}, "failed_entry": {"type": "string"}, "failed_root": {"type": "string"},
        "health": {"enum": ["pending", "good"], "description": "good once the boot was marked or blessed good"},
    },
    "required": ["time", "boot", "root", "kind", "snapshot", "entry", "image_version", "failed_entry",
                 "failed_root", "health"],
}  # fmt: skip
HOST_CHANGE = {
    "type": "object",
    "description": "the newest run (that changed something, not a dry run), rollback or one-shot boot, or "
                   "rollout's update, from the hub, that changed the host",
    "properties": {
        "time": {"type": "number"}, "by": {"type": "string", "description": "the admin"},
        "kind": {"enum": ["run", "action", "rollout"]},
        "id": {"type": "string", "description": "the run's, action's or rollout's id"},
        "what": {"type": "string"},
    },
    "required": ["time", "by", "kind", "id", "what"],
}  # fmt: skip
HOST = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "groups": {"type": "array", "items": {"type": "string"}},
        "online": {"type": "boolean"},
        "last_seen": _NUMBER_OR_NULL,
        "health": {"type": "string"},
        "facts": {**_OBJECT_OR_NULL, "description": "the agent's newest report (hub/protocol.py)"},
        "last_rollback": _OBJECT_OR_NULL,
        "jobs": {"type": "array", "items": {"type": "object"}},
        "actions": {"type": "array", "items": HOST_ACTION_STATE, "description": "the newest 10, oldest first"},
        "compliance": {**COMPLIANCE_STATE, "type": ["object", "null"]},
        "boot_status": {"enum": ["healthy", "on trial", "fell back", "unknown"],
                        "description": "how the host's last boot reported stands"},
        "boots": {"type": "array", "items": HOST_BOOT, "description": "its boot history, the newest 20, oldest first"},
        "last_change": {"oneOf": [{"type": "null"}, HOST_CHANGE]},
    },
    "required": ["name", "groups", "online", "last_seen", "health", "facts", "last_rollback", "jobs", "actions",
                 "compliance", "boot_status", "boots", "last_change"],
}  # fmt: skip
COMMAND = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "run_id": {"type": "string"},
        "host": {"type": "string"},
        "state": {"type": "string"},
        "job_id": {"type": ["integer", "null"]},
        "result": _OBJECT_OR_NULL,
        "created": {"type": "number"},
        "sent": _NUMBER_OR_NULL,
        "finished": _NUMBER_OR_NULL,
    },
    "required": ["id", "run_id", "host", "state", "job_id", "result", "created", "sent", "finished"],
}
RUN = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "created": {"type": "number"},
        "admin": {"type": "string"},
        "target": {"type": "object"},
        "steps": {"type": "array", "items": {"type": "object"}, "description": "[] for a compliance run"},
        "compliance": {**RUN_COMPLIANCE, "type": ["object", "null"]},
        "flags": {"type": "integer"},
        "parallelism": {"type": "integer"},
        "state": {"enum": ["running", "complete", "partial", "failed", "cancelled"]},
        "finished": _NUMBER_OR_NULL,
        "commands": {"type": "array", "items": COMMAND},
        "cancel_requested": {"type": "boolean"},
    },
    "required": ["id", "created", "admin", "target", "steps", "flags", "parallelism", "state", "finished", "commands"],
}
OP = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                   "schema": {"type": "object", "description": "its params, as JSON Schema (draft 2020-12)"}},
    "required": ["name", "description", "schema"],
}  # fmt: skip
WORKFLOW = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "variables": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "required": {"type": "boolean"},
                           "fills": {"type": "array", "items": {"type": "string"}, "description": "OP.PARAM"},
                           "schema": {"type": "object", "description": "JSON Schema (draft 2020-12)"}},
            "required": ["name", "required", "fills", "schema"]}},
    },
    "required": ["name", "description", "variables"],
}  # fmt: skip
EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "time": {"type": "number"},
        "host": {"type": ["string", "null"]},
        "agent_event": {"type": ["integer", "null"]},
        "actor": {"type": "string"},
        "method": {"type": "string"},
        "detail": {"type": "object"},
    },
    "required": ["id", "time", "host", "agent_event", "actor", "method", "detail"],
}
_IMAGE_FIELDS: dict[str, Any] = {
    "id": {"type": "string"},
    "profile": {"type": "string"},
    "version": {"type": "string"},
    "parent": {"type": ["string", "null"], "description": "a delta's parent version: the hosts it applies to"},
    "delta": {"type": "boolean"},
    "size": {"type": "integer", "description": "bytes"},
    "sha256": {"type": "string"},
    "uploaded_at": {"type": "number"},
    "uploaded_by": {"type": "string"},
    "key_id": {"type": "string", "description": "the key its signature names"},
    "signature_checked": {"type": "boolean", "description": "checked against the hub's --trusted-keys"},
}
IMAGE = {"type": "object", "properties": _IMAGE_FIELDS, "required": list(_IMAGE_FIELDS)}
IMAGE_DETAIL = {
    "type": "object",
    "properties": {**_IMAGE_FIELDS, "manifest": {"type": "object", "description": "its manifest.json"}},
    "required": [*_IMAGE_FIELDS, "manifest"],
}
ROLLOUT_HOST = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "wave": {"type": "integer", "description": "1 is the canary; 0 for a host skipped at the start"},
        "state": {"enum": ["pending", "sent", "staging", "staged", "done", "failed", "skipped", "cancelled"]},
        "update_id": {"type": "string", "description": "the id of the agent's update frame"},
        "sent": _NUMBER_OR_NULL,
        "finished": _NUMBER_OR_NULL,
        "detail": {"type": ["string", "null"], "description": "why it failed or was skipped"},
        "from_version": {"type": ["string", "null"], "description": "the version it ran when it was sent"},
        "fallback_before": {"type": ["string", "null"]},
    },
    "required": ["host", "wave", "state", "update_id", "sent", "finished", "detail", "from_version"],
}
ROLLOUT_CHANGE = {
    "type": "object",
    "properties": {
        "time": {"type": "number"},
        "state": {
            "enum": ["running", "paused", "halted", "complete", "aborted"],
            "description": "what it went to: running when started or resumed",
        },
        "by": {"type": "string", "description": "the admin who steered it, or hub"},
        "reason": {"type": ["string", "null"], "description": "for a halt, why: the host and what happened"},
    },
    "required": ["time", "state", "by", "reason"],
}
ROLLOUT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "created": {"type": "number"},
        "admin": {"type": "string"},
        "image": {"type": "string"},
        "profile": {"type": "string"},
        "version": {"type": "string"},
        "target": {"type": "object"},
        "canary": {"type": "integer"},
        "wave_percent": {"type": "integer"},
        "health_timeout_s": {"type": "integer"},
        "state": {"enum": ["running", "paused", "halted", "complete", "aborted"]},
        "reason": {"type": ["string", "null"],
                   "description": "why it is halted, while it is (a resume clears it; history keeps it)"},
        "wave": {"type": "integer", "description": "the wave under way; 0 before the first"},
        "waves": {"type": "integer"},
        "finished": _NUMBER_OR_NULL,
        "hosts": {"type": "array", "items": ROLLOUT_HOST},
        "history": {"type": "array", "items": ROLLOUT_CHANGE,
                    "description": "each change of its state, oldest first (the newest 32)"},
    },
    "required": ["id", "created", "admin", "image", "profile", "version", "target", "canary", "wave_percent",
                 "health_timeout_s", "state", "reason", "wave", "waves", "finished", "hosts", "history"],
}  # fmt: skip
STATE = {
    "type": "object",
    "properties": {
        "type": {"const": "init"}, "epoch": {"type": "string"}, "version": {"type": "integer"},
        "state": {"type": "object", "properties": {
            "hosts": {"type": "object", "additionalProperties": HOST},
            "runs": {"type": "object", "additionalProperties": RUN},
            "events": {"type": "array", "items": EVENT, "description": "the newest 100"},
            "images": {"type": "object", "additionalProperties": IMAGE},
            "rollouts": {"type": "object", "additionalProperties": ROLLOUT},
        }, "required": ["hosts", "runs", "events", "images", "rollouts"]},
    },
    "required": ["type", "epoch", "version", "state"],
}  # fmt: skip

ERRORS = {
    "400": _error("bad input, the field named: FIELD: reason"),
    "401": _error("no valid admin token (Authorization: Bearer TOKEN, or the session cookie of POST /api/v1/login)"),
    "403": _error(
        "a request that changes something, or a WebSocket, from a page of another origin; or an "
        "admin whose role does not allow the operation (its x-rastos-role): role: METHOD PATH needs "
        "the role R; NAME has the role ROLE, with needed_role and role"
    ),
}
BODY_ERRORS = {
    "413": _error("a body over 1 MiB"),
    "415": _error("a body that is not application/json"),
}
NOT_FOUND = {"404": _error("no such host, run or (workflow.name) workflow")}
CONFLICT = {"409": _error("in conflict with the hub's state (a host of that name exists; a run ended already)")}
BAD_STEP = {
    "422": _error(
        "a step its op refuses, as rastosd would, the field named: steps[I].params.FIELD: "
        "reason; or a workflow's variable: workflow.variables.NAME: reason"
    )
}
IMAGE_ERRORS = {
    "404": _error("no such image"),
    "409": _error("another bundle is this version already"),
    "413": _error("a bundle over the hub's --max-image-bytes"),
    "415": _error("a body that is not application/octet-stream"),
    "422": _error("not a complete bundle, a part that does not match its manifest, or a signature the hub's "
                  "trusted keys refuse: bundle: reason"),
}  # fmt: skip
ROLLOUT_ERRORS = {
    "404": _error("no such image, host, group or rollout"),
    "409": _error("a host in another active rollout; a rollout in a state that cannot do this"),
    "422": _error("a delta for hosts that run another version than its parent"),
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
HOST_NAME = {"name": "name", "in": "path", "required": True, "schema": NAME}
RUN_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
IMAGE_ID = ROLLOUT_ID = RUN_ID
PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/login": {"post": {"summary": "Trade an admin token for a session cookie (the web UI's login)",
                               "description": "The cookie holds a random session id (HttpOnly, SameSite=Strict, "
                                              "Secure over TLS) that ends after 12 hours or at logout.",
                               "security": [], "requestBody": _body(LOGIN),
                               "responses": {"204": {"description": "logged in"}, **BODY_ERRORS}}},
    "/api/v1/logout": {"post": {"summary": "End this session (its cookie stops working)",
                                "responses": {"204": {"description": "logged out"}}}},
    "/api/v1/me": {"get": {"summary": "Who is asking: the admin's name and role, and what the role allows",
                           "responses": {"200": _answer("the caller", ME)}}},
    "/api/v1/state": {"get": {"summary": "The fleet state and its version (what a UI's init holds)",
                              "responses": {"200": _answer("state", STATE)}}},
    "/api/v1/hosts": {
        "get": {"summary": "Every host with its facts, health and last rollback",
                "responses": {"200": _answer("hosts", {"type": "array", "items": HOST})}},
        "post": {"summary": "Add a host; the answer holds its agent token, shown this once",
                 "requestBody": _body(NEW_HOST),
                 "responses": {"201": _answer("name and token", {
                     "type": "object", "properties": {"name": {"type": "string"}, "token": {"type": "string"}},
                     "required": ["name", "token"]}), **BODY_ERRORS, **CONFLICT}},
    },
    "/api/v1/hosts/{name}": {
        "parameters": [HOST_NAME],
        "get": {"summary": "One host", "responses": {"200": _answer("host", HOST), **NOT_FOUND}},
        "delete": {"summary": "Remove a host (its token stops working)",
                   "responses": {"204": {"description": "removed"}, **NOT_FOUND}},
    },
    "/api/v1/hosts/{name}/rotate": {"parameters": [HOST_NAME], "post": {
        "summary": "A new agent token for the host, shown this once; the old one works grace_s seconds more",
        "description": "The agent connected with the old token is disconnected when the old token stops (at "
                       "once without grace). A revoked host gets a token again this way.",
        "requestBody": {"required": False, "content": {"application/json": {"schema": ROTATION}}},
        "responses": {"200": _answer("the new token", {
            "type": "object",
            "properties": {"name": {"type": "string"}, "token": {"type": "string"},
                           "old_token_expires": {**_NUMBER_OR_NULL,
                                                 "description": "when the old token stops; null: it has"}},
            "required": ["name", "token", "old_token_expires"]}), **BODY_ERRORS, **NOT_FOUND}}},
    "/api/v1/hosts/{name}/revoke": {"parameters": [HOST_NAME], "post": {
        "summary": "End the host's token now: its agent is disconnected and refused until the host is "
                   "given a new token (rotate) or removed",
        "responses": {"204": {"description": "revoked"}, **NOT_FOUND}}},
    "/api/v1/hosts/{name}/actions": {"parameters": [HOST_NAME], "post": {
        "summary": "Take a snapshot on the host, roll it back to one, or boot one once: sent to its agent at once",
        "description": "Only to a host online: an action is never queued. The request is in the event log "
                       "(HostActionRequested, naming the admin) before it is sent; the answer is the action as "
                       "sent, and its outcome (done or failed, the snapshot taken, the boot entry written, "
                       "whether a reboot is needed, the daemon's error) follows in the host's `actions` (the "
                       "stream, GET /api/v1/hosts/{name}) and as the host's HubAction event. A rollback or a "
                       "one-shot boot takes effect at the host's next boot; the hub reboots nothing.",
        "requestBody": _body(HOST_ACTION),
        "responses": {"202": _answer("the action, sent", HOST_ACTION_STATE), **BODY_ERRORS, **NOT_FOUND,
                      "409": _error("the host is offline: name: host NAME is offline; ...")}}},
    "/api/v1/runs": {
        "get": {"summary": "Recent runs with their commands",
                "responses": {"200": _answer("runs", {"type": "array", "items": RUN})}},
        "post": {"summary": "Run ops, a workflow, or a compliance scan or remediation on hosts (&& per host, "
                            "parallelism limit)",
                 "description": "A compliance run's hosts each scan themselves (scan), or scan, run the failed "
                                "checks' remediations as one job and scan again (remediate); each scan becomes "
                                "the host's `compliance` report.",
                 "requestBody": _body(NEW_RUN),
                 "responses": {"201": _answer("the run", RUN), **BODY_ERRORS, **BAD_STEP, **NOT_FOUND,
                               **CONFLICT}},
    },
    "/api/v1/runs/{id}": {"parameters": [RUN_ID],
                          "get": {"summary": "One run", "responses": {"200": _answer("run", RUN), **NOT_FOUND}}},
    "/api/v1/runs/{id}/cancel": {"parameters": [RUN_ID], "post": {
        "summary": "Cancel a run: pending commands end, running ones are asked to",
        "responses": {"200": _answer("the run", RUN), **NOT_FOUND, **CONFLICT}}},
    "/api/v1/runs/{id}/stream": {"parameters": [RUN_ID], "get": {
        "summary": "WebSocket following one run: run {run} at once (and whenever the hub cannot say what "
                   "changed), command {command} for each change of one of its commands, output {host, "
                   "command, step, first, lines} with the lines its steps print as they run (first: the "
                   "number of the first among all its step printed on that host), end {run} once it has "
                   "ended; then the hub closes it",
        "responses": {"101": {"description": "switching protocols"}, **NOT_FOUND}}},
    "/api/v1/workflows": {"get": {
        "summary": "The workflows a run may name (workflow: {name, variables}), each variable with the JSON "
                   "Schema of the parameter it fills (its default the variable's) and the OP.PARAM it fills",
        "responses": {"200": _answer("workflows", {"type": "array", "items": WORKFLOW})}}},
    "/api/v1/ops": {"get": {
        "summary": "The ops hosts run, each with its parameters as JSON Schema: what a run's steps are checked by",
        "responses": {"200": _answer("ops", {"type": "array", "items": OP})}}},
    "/api/v1/events": {"get": {
        "summary": "The event log, newest last: a page of at most `limit` events and 4 MiB that match every "
                   "filter given; the next page back is `before` the first id of this one",
        "parameters": [
            {"name": "host", "in": "query", "schema": NAME},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                        "default": 100}},
            {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                         "maximum": 2**63 - 1}},
            {"name": "actor", "in": "query", "description": "an admin's name, agent or hub",
             "schema": {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f]{1,64}$"}},
            {"name": "method", "in": "query", "description": "the event's kind: HostAdded, JobFinished, ...",
             "schema": EVENT_METHOD},
            *({"name": name, "in": "query", "description": f"{word} this time (seconds since 1970)",
               "schema": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS}}
              for name, word in (("since", "at or after"), ("until", "at or before"))),
        ],
        "responses": {"200": _answer("events", {"type": "array", "items": EVENT})},
    }},
    "/api/v1/images": {
        "get": {"summary": "The update bundles the hub keeps",
                "responses": {"200": _answer("images", {"type": "array", "items": IMAGE})}},
        "post": {"summary": "Upload a bundle (rastos-image build writes them): the file itself as the body",
                 "description": "Streamed to disk and checked whole: a complete bundle whose every part matches "
                                "its manifest and, if the hub has trusted keys, signed by one of them. The same "
                                "bundle again is answered 200 with the image it is already.",
                 "requestBody": {"required": True, "content": {"application/octet-stream": BINARY}},
                 "responses": {"201": _answer("the new image", IMAGE), "200": _answer("the image it is already", IMAGE),
                               **IMAGE_ERRORS}},
    },
    "/api/v1/images/{id}": {
        "parameters": [IMAGE_ID],
        "get": {"summary": "One image, with its manifest",
                "responses": {"200": _answer("image", IMAGE_DETAIL), "404": IMAGE_ERRORS["404"]}},
        "delete": {"summary": "Remove an image and its file (rastos-hub image remove does the same)",
                   "description": "Refused while a rollout that has not ended (running, paused, or halted, which "
                                  "may resume) uses the image, or while a host of an ended one may still be "
                                  "fetching its bundle; the error names the rollout. A full image may go while a "
                                  "delta from its version stays: a host applies a delta to what it runs.",
                   "security": [{"admin": []}, {"cookie": []}],
                   "responses": {"204": {"description": "removed, its file too"}, "404": IMAGE_ERRORS["404"],
                                 "409": _error("a rollout still needs it: id: image ID is in use by rollout R, "
                                               "which is STATE; or a host of R is still fetching it")}},
    },
    "/api/v1/images/{id}/bundle": {"parameters": [IMAGE_ID], "get": {
        "summary": "The bundle file, with HTTP ranges (Range: bytes=N-): what hosts download their updates from",
        "description": "For admins (any bundle), and for hosts with their own agent token as a bearer token: "
                       "only a bundle a rollout has sent the host; any other is answered 404, as one the hub "
                       "does not hold.",
        "security": [{"admin": []}, {"cookie": []}, {"agent": []}],
        "responses": {"200": {"description": "the bundle", "content": {"application/octet-stream": BINARY}},
                      "206": {"description": "the range asked for", "content": {"application/octet-stream": BINARY}},
                      "416": {"description": "a range that is not in the file"},
                      "401": _error("no valid admin or host token"),
                      "404": _error("no such image, or (to a host) one no rollout has sent it")}}},
    "/api/v1/rollouts": {
        "get": {"summary": "Recent rollouts and every active one, each with its hosts' states",
                "responses": {"200": _answer("rollouts", {"type": "array", "items": ROLLOUT})}},
        "post": {"summary": "Roll an image out to hosts in waves: a canary, then wave_percent at a time",
                 "description": "Hosts on the image's version already are skipped. A wave starts when every host "
                                "of the one before is back on the version with health good; a host that fails "
                                "(its staging, a boot that fell back, health_timeout_s) halts the rollout.",
                 "requestBody": _body(NEW_ROLLOUT),
                 "responses": {"201": _answer("the rollout", ROLLOUT), **BODY_ERRORS, **ROLLOUT_ERRORS}},
    },
    "/api/v1/rollouts/{id}": {"parameters": [ROLLOUT_ID], "get": {
        "summary": "One rollout", "responses": {"200": _answer("rollout", ROLLOUT), "404": ROLLOUT_ERRORS["404"]}}},
    **{f"/api/v1/rollouts/{{id}}/{action}": {"parameters": [ROLLOUT_ID], "post": {
        "summary": summary,
        "responses": {"200": _answer("the rollout", ROLLOUT), "404": ROLLOUT_ERRORS["404"],
                      "409": _error("a rollout in a state that cannot do this")}}}
       for action, summary in (
           ("pause", "Pause a running rollout: no update is sent until it resumes; those under way go on"),
           ("resume", "Resume a paused or halted rollout (a failed host stays failed)"),
           ("abort", "End a rollout: hosts not yet sent the update never are; updated hosts stay updated"),
       )},
    "/api/v1/stream": {"get": {"summary": "WebSocket: init {state, version}, then delta {change, version} and "
                                          "sync {version} every few seconds; send get_state to start over",
                               "responses": {"101": {"description": "switching protocols"}}}},
    "/api/v1/agent": {"get": {"summary": "WebSocket for rastosd agents (Authorization: Bearer HOST-TOKEN); "
                                         "messages in hub/protocol.py", "security": [{"agent": []}],
                              "responses": {"101": {"description": "switching protocols"}}}},
}  # fmt: skip


def openapi_document(access: Mapping[tuple[str, str], Access]) -> dict[str, Any]:
    """The document, each operation saying what its route is registered with (`access`, by method and
    path: hub/access.py), as `x-rastos-role` and a sentence of its description."""
    paths: dict[str, dict[str, Any]] = {}
    for path, items in PATHS.items():
        paths[path] = {
            key: item if key == "parameters" else _operation(item, _access_of(access, key, path))
            for key, item in items.items()
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "rastOS hub", "version": __version__},
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "admin": {"type": "http", "scheme": "bearer"},
            "agent": {"type": "http", "scheme": "bearer", "description": "a host's own token"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "rastos_hub",
                       "description": "the session POST /api/v1/login sets"},
        }},
        "security": [{"admin": []}, {"cookie": []}],
        "paths": paths,
    }  # fmt: skip


def _access_of(access: Mapping[tuple[str, str], Access], method: str, path: str) -> Access:
    found = access.get((method.upper(), path))
    if found is None:
        raise KeyError(f"{method.upper()} {path}: in the document, but no route is registered for it")
    return found


def _operation(item: dict[str, Any], access: Access) -> dict[str, Any]:
    description = " ".join(part for part in (item.get("description"), access.sentence) if part)
    responses = {**ERRORS, **item["responses"]}
    return {**item, "description": description, "x-rastos-role": access.label, "responses": responses}
