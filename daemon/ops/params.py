"""Op parameters: declared once, validated before anything runs, published as JSON Schema.

A declaration is a tuple of `Param`. `validate` turns the caller's JSON object into a dict with defaults
filled in, or raises `InvalidParams` naming the field's full path (`steps[1].params.name`). Unknown keys
are refused with a suggestion: a typo must never silently do nothing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from daemon.errors import InvalidParams


class Kind(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    STRING_LIST = "string-list"
    STRING_MAP = "string-map"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    description: str
    required: bool = False
    default: Any = None
    pattern: str | None = None  # for strings, list items and map values
    key_pattern: str | None = None  # for map keys
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    pattern_help: str = ""  # what `pattern` means, in words, for the error message
    # A further check on the whole value; returns a problem or None.
    check: Callable[[Any], str | None] | None = None


Schema = tuple[Param, ...]

# Every risky op's (firewall, network, ssh): how long its change waits for a confirmation (confirm.py).
CONFIRM_TIMEOUT = Param(
    "confirm_timeout",
    Kind.INTEGER,
    "seconds to confirm the change before the daemon reverts it (0: stands at once)",
    default=120,
    minimum=0,
    maximum=86400,
)
Params = dict[str, Any]


def validate(schema: Schema, value: object, where: str = "params") -> Params:
    if not isinstance(value, Mapping):
        raise InvalidParams(where, f"must be a JSON object, got {_json_type(value)}")
    known = {param.name: param for param in schema}
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known) or 'none'}"
            raise InvalidParams(f"{where}.{key}", f"unknown parameter{hint}")
    result: Params = {}
    for param in schema:
        field = f"{where}.{param.name}"
        if param.name not in value:
            if param.required:
                raise InvalidParams(field, f"is required ({param.description})")
            result[param.name] = param.default
            continue
        result[param.name] = _check_value(param, value[param.name], field)
    return result


def _check_value(param: Param, value: object, field: str) -> Any:
    if param.kind is Kind.STRING:
        return _check_string(param, value, field, param.pattern)
    if param.kind is Kind.INTEGER:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParams(field, f"must be an integer, got {_json_type(value)}")
        if param.minimum is not None and value < param.minimum:
            raise InvalidParams(field, f"must be at least {param.minimum}, got {value}")
        if param.maximum is not None and value > param.maximum:
            raise InvalidParams(field, f"must be at most {param.maximum}, got {value}")
        checked: Any = value
    elif param.kind is Kind.BOOLEAN:
        if not isinstance(value, bool):
            raise InvalidParams(field, f"must be true or false, got {_json_type(value)}")
        checked = value
    elif param.kind is Kind.STRING_LIST:
        if not isinstance(value, list):
            raise InvalidParams(field, f"must be a list of strings, got {_json_type(value)}")
        checked = [_check_string(param, item, f"{field}[{i}]", param.pattern) for i, item in enumerate(value)]
    else:
        if not isinstance(value, Mapping):
            raise InvalidParams(field, f"must be an object of strings, got {_json_type(value)}")
        checked = {}
        for key, item in value.items():
            _check_string(Param(param.name, Kind.STRING, ""), key, f"{field}.{key}", param.key_pattern)
            checked[key] = _check_string(param, item, f"{field}.{key}", param.pattern)
    if param.check is not None and (problem := param.check(checked)) is not None:
        raise InvalidParams(field, problem)
    return checked


def _check_string(param: Param, value: object, field: str, pattern: str | None) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, f"must be a string, got {_json_type(value)}")
    if "\0" in value:
        raise InvalidParams(field, "must not contain a NUL character")
    if param.max_length is not None and len(value) > param.max_length:
        raise InvalidParams(field, f"must be at most {param.max_length} characters, got {len(value)}")
    if param.choices and value not in param.choices:
        raise InvalidParams(field, f"must be one of {', '.join(param.choices)}, got {value!r}")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise InvalidParams(field, f"{value!r} is not valid: {param.pattern_help or 'must match ' + pattern}")
    if param.kind is Kind.STRING and param.check is not None and (problem := param.check(value)) is not None:
        raise InvalidParams(field, problem)
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, Mapping) else type(value).__name__


def json_schema(schema: Schema) -> dict[str, Any]:
    """The declaration as JSON Schema (draft 2020-12), what `ListOps()` publishes."""
    properties: dict[str, Any] = {}
    for param in schema:
        properties[param.name] = _property_schema(param)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [param.name for param in schema if param.required],
        "properties": properties,
    }


def _property_schema(param: Param) -> dict[str, Any]:
    string: dict[str, Any] = {"type": "string"}
    if param.pattern:
        string["pattern"] = f"^(?:{param.pattern})$"
    if param.choices:
        string["enum"] = list(param.choices)
    if param.max_length is not None:
        string["maxLength"] = param.max_length
    out: dict[str, Any]
    if param.kind is Kind.STRING:
        out = dict(string)
    elif param.kind is Kind.INTEGER:
        out = {"type": "integer"}
        if param.minimum is not None:
            out["minimum"] = param.minimum
        if param.maximum is not None:
            out["maximum"] = param.maximum
    elif param.kind is Kind.BOOLEAN:
        out = {"type": "boolean"}
    elif param.kind is Kind.STRING_LIST:
        out = {"type": "array", "items": string}
    else:
        out = {"type": "object", "additionalProperties": string}
        if param.key_pattern:
            out["propertyNames"] = {"pattern": f"^(?:{param.key_pattern})$"}
    out["description"] = param.description
    if not param.required and param.default is not None:
        out["default"] = param.default
    return out
