"""Op parameters: declared once, validated before anything runs, published as JSON Schema.

A declaration is a tuple of `Param`. `validate` turns the caller's JSON object into a dict with defaults
filled in, or raises `InvalidParams` naming the field's full path (`steps[1].params.name`). Unknown keys
are refused with a suggestion: a typo must never silently do nothing.

Before any schema sees it, a caller's JSON goes through `parse_json`, which bounds what one request
may cost (its length, nesting, the number of values, each string, list and integer) and refuses text
that is not Unicode (a lone surrogate from a `\\ud800` escape): every caller, also an unprivileged one
calling Plan, gets an answer within milliseconds, and nothing an op writes can fail to encode later.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ops.errors import InvalidParams

# What one request may hold (docs/daemon.md, "Limits"). Generous for any real use, small enough that
# parsing and checking a request that reaches them costs a few milliseconds.
MAX_JSON_LENGTH = 1 << 20  # characters of params_json or steps_json
MAX_DEPTH = 16  # nesting of lists and objects; a pipeline needs 5
MAX_VALUES = 50_000  # values in one document, containers included
MAX_ITEMS = 1024  # items of one list or object (a param may allow fewer)
MAX_STRING_LENGTH = 65536  # characters of any string (a param may allow fewer, see STRING_LENGTH)
MAX_KEY_LENGTH = 256  # characters of an object's key
STRING_LENGTH = 4096  # a string param's limit unless it declares its own max_length
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # integers must fit in 64 bits
SHOWN = 64  # characters of a caller's value echoed in an error message
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    max_length: int | None = None  # of a string, or of each item of a list or map (default STRING_LENGTH)
    max_items: int | None = None  # of a list or map (default MAX_ITEMS)
    pattern_help: str = ""  # what `pattern` means, in words, for the error message
    # A further check on the whole value; returns a problem or None.
    check: Callable[[Any], str | None] | None = None

    @property
    def string_length(self) -> int:
        return self.max_length if self.max_length is not None else STRING_LENGTH

    @property
    def items(self) -> int:
        return self.max_items if self.max_items is not None else MAX_ITEMS


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


class _Oversize:
    """An integer too long to convert, kept as its digit count so the walk can name its field."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))


class _Constant:
    """NaN or Infinity: Python's json reads them, JSON has no such thing."""

    def __init__(self, name: str) -> None:
        self.name = name


def _parse_int(digits: str) -> int | _Oversize:
    return int(digits) if len(digits) <= 20 else _Oversize(digits)


def parse_json(text: str, where: str) -> object:
    """The caller's JSON text as a document within the limits above, or InvalidParams naming where."""
    if len(text) > MAX_JSON_LENGTH:
        raise InvalidParams(where, f"is {len(text)} characters long; at most {MAX_JSON_LENGTH} are accepted")
    try:
        document = json.loads(text, parse_int=_parse_int, parse_constant=_Constant)
    except json.JSONDecodeError as error:
        raise InvalidParams(where, f"is not valid JSON: {error}") from None
    except RecursionError:  # the decoder recurses per level: this deep is far beyond MAX_DEPTH
        raise InvalidParams(where, f"nests lists and objects deeper than {MAX_DEPTH} levels") from None
    _Walk().check(document, where, 0)
    return document


class _Walk:
    """The limits of one document, checked before any schema reads it; counts values as it goes."""

    def __init__(self) -> None:
        self.values = 0

    def check(self, value: object, where: str, depth: int) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise InvalidParams(where, f"the document holds more than {MAX_VALUES} values")
        if isinstance(value, str):
            check_text(value, where, MAX_STRING_LENGTH)
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            return
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise InvalidParams(where, f"{value} does not fit in 64 bits")
        elif isinstance(value, _Oversize):
            raise InvalidParams(where, f"is an integer of {value.digits} digits; integers must fit in 64 bits")
        elif isinstance(value, _Constant):
            raise InvalidParams(where, f"{value.name} is not a JSON value")
        elif isinstance(value, list | dict):
            self._container(value, where, depth + 1)

    def _container(self, value: list[Any] | dict[str, Any], where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidParams(where, f"nests lists and objects deeper than {MAX_DEPTH} levels")
        if len(value) > MAX_ITEMS:
            raise InvalidParams(where, f"holds {len(value)} items; at most {MAX_ITEMS} are accepted")
        if isinstance(value, list):
            for index, item in enumerate(value):
                self.check(item, f"{where}[{index}]", depth)
            return
        for key, item in value.items():
            check_text(key, f"{where}.{shown_key(key)}", MAX_KEY_LENGTH, "the key")
            self.check(item, f"{where}.{shown_key(key)}", depth)


def check_text(value: str, where: str, limit: int, what: str = "the string") -> None:
    """Unicode only (no lone surrogate, which nothing could encode: not a reply, not a file) and no
    longer than `limit`."""
    if len(value) > limit:
        raise InvalidParams(where, f"{what} must be at most {limit} characters, got {len(value)}")
    if value.isascii():
        return
    try:
        value.encode()
    except UnicodeEncodeError as error:
        lone = value[error.start].encode("utf-8", "backslashreplace").decode()
        raise InvalidParams(
            where, f"{what} holds a lone surrogate ({lone}) at character {error.start}: it is not Unicode text"
        ) from None


def shown_key(key: str) -> str:
    """A key as an error message may name it: encodable, and short."""
    return shown(key, quote=False)


def shown(value: str, quote: bool = True) -> str:
    """A caller's string as an error message may echo it: control characters (NUL above all: sd-bus
    cannot send it) and what UTF-8 cannot hold escaped, cut short, so a message is always sent and
    never carries a megabyte back."""
    text = value[:SHOWN].encode("utf-8", "backslashreplace").decode()
    cut = "..." if len(value) > SHOWN else ""
    if quote:
        return f"{text!r}{cut}"
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", text) + cut


def validate(schema: Schema, value: object, where: str = "params") -> Params:
    if not isinstance(value, Mapping):
        raise InvalidParams(where, f"must be a JSON object, got {json_type(value)}")
    known = {param.name: param for param in schema}
    for key in value:
        if key not in known:
            import difflib  # here, for the rare mistake: rastosd's start imports this module

            close = difflib.get_close_matches(str(key)[:MAX_KEY_LENGTH], known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known) or 'none'}"
            raise InvalidParams(f"{where}.{shown_key(str(key))}", f"unknown parameter{hint}")
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


def check_param(schema: Schema, name: str, value: object, field: str) -> Any:
    """One param's value checked as `validate` checks it (the same error text), named `field`: how a
    profile key that is an op's param is checked where it is written."""
    param = next(param for param in schema if param.name == name)
    return _check_value(param, value, field)


def _check_value(param: Param, value: object, field: str) -> Any:
    if param.kind is Kind.STRING:
        return _check_string(param, value, field, param.pattern)
    if param.kind is Kind.INTEGER:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParams(field, f"must be an integer, got {json_type(value)}")
        if param.minimum is not None and value < param.minimum:
            raise InvalidParams(field, f"must be at least {param.minimum}, got {value}")
        if param.maximum is not None and value > param.maximum:
            raise InvalidParams(field, f"must be at most {param.maximum}, got {value}")
        checked: Any = value
    elif param.kind is Kind.BOOLEAN:
        if not isinstance(value, bool):
            raise InvalidParams(field, f"must be true or false, got {json_type(value)}")
        checked = value
    elif param.kind is Kind.STRING_LIST:
        if not isinstance(value, list):
            raise InvalidParams(field, f"must be a list of strings, got {json_type(value)}")
        _check_items(param, value, field)
        checked = [_check_string(param, item, f"{field}[{i}]", param.pattern) for i, item in enumerate(value)]
    else:
        if not isinstance(value, Mapping):
            raise InvalidParams(field, f"must be an object of strings, got {json_type(value)}")
        _check_items(param, value, field)
        checked = {}
        for key, item in value.items():
            key_field = f"{field}.{shown_key(str(key))}"
            _check_string(Param(param.name, Kind.STRING, "", max_length=MAX_KEY_LENGTH), key, key_field,
                          param.key_pattern)  # fmt: skip
            checked[key] = _check_string(param, item, key_field, param.pattern)
    if param.check is not None and (problem := param.check(checked)) is not None:
        raise InvalidParams(field, problem)
    return checked


def _check_items(param: Param, value: list[Any] | Mapping[Any, Any], field: str) -> None:
    if len(value) > param.items:
        raise InvalidParams(field, f"must hold at most {param.items} items, got {len(value)}")


def _check_string(param: Param, value: object, field: str, pattern: str | None) -> str:
    if not isinstance(value, str):
        raise InvalidParams(field, f"must be a string, got {json_type(value)}")
    if "\0" in value:
        raise InvalidParams(field, "must not contain a NUL character")
    if len(value) > param.string_length:
        raise InvalidParams(field, f"must be at most {param.string_length} characters, got {len(value)}")
    check_text(value, field, param.string_length)
    if param.choices and value not in param.choices:
        raise InvalidParams(field, f"must be one of {', '.join(param.choices)}, got {shown(value)}")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise InvalidParams(field, f"{shown(value)} is not valid: {param.pattern_help or 'must match ' + pattern}")
    if param.kind is Kind.STRING and param.check is not None and (problem := param.check(value)) is not None:
        raise InvalidParams(field, problem)
    return value


def json_type(value: object) -> str:
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
    string: dict[str, Any] = {"type": "string", "maxLength": param.string_length}
    if param.pattern:
        string["pattern"] = f"^(?:{param.pattern})$"
    if param.choices:
        string["enum"] = list(param.choices)
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
        out = {"type": "array", "items": string, "maxItems": param.items}
    else:
        out = {"type": "object", "additionalProperties": string, "maxProperties": param.items}
        out["propertyNames"] = {"maxLength": MAX_KEY_LENGTH}
        if param.key_pattern:
            out["propertyNames"]["pattern"] = f"^(?:{param.key_pattern})$"
    out["description"] = param.description
    if not param.required and param.default is not None:
        out["default"] = param.default
    return out
