"""The REST API's contract: request schemas (JSON Schema, checked with `jsonschema`) and the OpenAPI
document built from the same schemas, so what the document promises is what the hub enforces."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator

from hub.errors import HubError
from rastos import __version__

NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
STEP = {
    "type": "object",
    "properties": {"op": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"}, "params": {"type": "object"}},
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
NEW_RUN = {
    "type": "object",
    "properties": {
        "target": TARGET,
        "steps": {"type": "array", "items": STEP, "minItems": 1, "maxItems": 256},
        "flags": {"type": "integer", "minimum": 0, "maximum": 7, "description": "dry-run 1, no-snapshot 2, restore 4"},
        "parallelism": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10},
    },
    "required": ["target", "steps"],
    "additionalProperties": False,
}
LOGIN = {
    "type": "object",
    "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 200}},
    "required": ["token"],
    "additionalProperties": False,
}
_VALIDATORS = {id(schema): Draft202012Validator(schema) for schema in (NEW_HOST, NEW_RUN, LOGIN)}


def validate(schema: dict[str, Any], document: object) -> dict[str, Any]:
    """The document if it matches; otherwise a HubError naming the first bad field."""
    errors = sorted(_VALIDATORS[id(schema)].iter_errors(document), key=lambda error: list(error.absolute_path))
    if errors:
        error = errors[0]
        best = min(error.context or [error], key=lambda e: len(e.message))  # a oneOf: its plainest reason
        path = ".".join(str(part) for part in best.absolute_path) or "body"
        raise HubError(f"{path}: {best.message}")
    assert isinstance(document, dict)
    return document


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answer(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


ERRORS = {
    "400": {"description": 'bad input: {"error": "FIELD: reason"}'},
    "401": {"description": "no valid admin token (Authorization: Bearer TOKEN, or the login cookie)"},
}
PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/login": {"post": {"summary": "Trade an admin token for a session cookie (the web UI)",
                                "requestBody": _body(LOGIN), "responses": {"204": {"description": "logged in"}}}},
    "/api/v1/state": {"get": {"summary": "The whole fleet state and its version (what a UI's init holds)",
                              "responses": {"200": _answer("state")}}},
    "/api/v1/hosts": {
        "get": {"summary": "Every host with its facts, health and last rollback",
                "responses": {"200": _answer("hosts")}},
        "post": {"summary": "Add a host; the answer holds its agent token, shown this once",
                 "requestBody": _body(NEW_HOST), "responses": {"201": _answer("name and token")}},
    },
    "/api/v1/hosts/{name}": {
        "get": {"summary": "One host", "responses": {"200": _answer("host"), "404": {"description": "no such host"}}},
        "delete": {"summary": "Remove a host (its token stops working)",
                   "responses": {"204": {"description": "removed"}}},
    },
    "/api/v1/runs": {
        "get": {"summary": "Recent runs with their commands", "responses": {"200": _answer("runs")}},
        "post": {"summary": "Run an op or a pipeline on hosts (&& per host, parallelism limit)",
                 "requestBody": _body(NEW_RUN), "responses": {"201": _answer("the run")}},
    },
    "/api/v1/runs/{id}": {"get": {"summary": "One run", "responses": {"200": _answer("run")}}},
    "/api/v1/runs/{id}/cancel": {"post": {"summary": "Cancel a run: pending commands end, running ones are asked to",
                                          "responses": {"200": _answer("the run")}}},
    "/api/v1/events": {"get": {
        "summary": "The event log, newest last",
        "parameters": [
            {"name": "host", "in": "query", "schema": NAME},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "before", "in": "query", "schema": {"type": "integer"}},
        ],
        "responses": {"200": _answer("events")},
    }},
    "/api/v1/stream": {"get": {"summary": "WebSocket: init {state, version}, then delta {change, version} and "
                                          "sync {version} every few seconds; send get_state to start over",
                               "responses": {"101": {"description": "switching protocols"}}}},
    "/api/v1/agent": {"get": {"summary": "WebSocket for rastosd agents (Authorization: Bearer HOST-TOKEN); "
                                         "messages in hub/protocol.py", "security": [{"agent": []}],
                              "responses": {"101": {"description": "switching protocols"}}}},
}  # fmt: skip


def openapi_document() -> dict[str, Any]:
    paths = {}
    for path, methods in PATHS.items():
        paths[path] = {
            method: {**operation, "responses": {**ERRORS, **operation["responses"]}}
            for method, operation in methods.items()
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "rastOS hub", "version": __version__},
        "components": {"securitySchemes": {
            "admin": {"type": "http", "scheme": "bearer"},
            "agent": {"type": "http", "scheme": "bearer", "description": "a host's own token"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "rastos_hub"},
        }},
        "security": [{"admin": []}, {"cookie": []}],
        "paths": paths,
    }  # fmt: skip
