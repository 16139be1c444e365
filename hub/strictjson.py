"""JSON as the hub takes it in and gives it out.

In: every document from outside (a REST body, an agent's frame) is read by `loads`, which refuses
what no column, browser or later check can take, naming the field: NaN and Infinity, numbers that
overflow to infinity (1e400), numbers beyond what a 64-bit column takes (from -2**63 up to, not
including, 2**64), lone surrogates (no UTF-8 encodes them) and nesting deeper than MAX_DEPTH.
Fields with a narrower range (event ids, times) check it themselves.

Out: `dumps` never writes a non-finite number (JSON has none, and a browser's JSON.parse throws on
the `Infinity` Python would write): a value that holds one anyway, from a database written before
these checks, is written with null in its place and logged.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from hub.errors import HubError

log = logging.getLogger("rastos-hub.json")

MAX_DEPTH = 32  # objects and lists within each other; real ones are a handful deep
LOWEST = -(2**63)  # every number fits a 64-bit column, signed or unsigned
BEYOND = 2**64
_INTEGER_DIGITS = len(str(BEYOND))  # longer digit strings are not even converted
OUT_OF_RANGE = "number out of range (finite, from -2**63 up to 2**64)"


class JsonError(HubError):
    """A document the hub refuses, with the field it is about."""


class _Huge(str):
    """An integer literal too long to be converted: reported by the walk, with its path."""


def _parse_int(text: str) -> int | _Huge:
    return int(text) if len(text.lstrip("-")) <= _INTEGER_DIGITS else _Huge(text)


def _refuse_constant(constant: str) -> object:
    raise JsonError(f"message: {constant} is not allowed in JSON here")


def loads(text: str | bytes, where: str = "message") -> object:
    """The document in `text`, or a JsonError naming the first field the hub cannot take."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise JsonError(f"{where}: not UTF-8: {error.reason} at byte {error.start}") from None
    try:
        document = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except JsonError as error:
        raise JsonError(error.message.replace("message:", f"{where}:", 1)) from None
    except RecursionError:
        raise JsonError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise JsonError(f"{where}: not valid JSON: {error}") from None
    check(document, where)
    return document


def check(document: object, where: str = "message") -> None:
    """Raise a JsonError naming the first value in `document` that the hub refuses (see the module)."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if isinstance(value, _Huge):
                raise JsonError(f"{_name(where, path)}: {OUT_OF_RANGE}")
            _check_string(value, where, path)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            if not LOWEST <= value < BEYOND:  # NaN fails this too
                raise JsonError(f"{_name(where, path)}: {OUT_OF_RANGE}")
        elif isinstance(value, dict | list):
            if len(path) >= MAX_DEPTH:
                raise JsonError(f"{_name(where, path)}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_string(key, where, (*path, key))
                    stack.append((item, (*path, key)))
            else:
                stack.extend((item, (*path, index)) for index, item in enumerate(value))


def _check_string(value: str, where: str, path: tuple[str | int, ...]) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise JsonError(f"{_name(where, path)}: lone surrogate {value[error.start]!r} (not valid Unicode)") from None


def _name(where: str, path: tuple[str | int, ...]) -> str:
    """A field's name as the hub's errors spell it: `events[0].detail.x`, or `steps.0.op` in a body."""
    name = ""
    for part in path:
        if isinstance(part, int) and where != "body":
            name += f"[{part}]"
        else:
            shown = str(part) if isinstance(part, int) or (part.isascii() and part.isprintable()) else repr(part)
            name += f".{shown[:64]}" if name else shown[:64]
    return name or where


def dumps(value: Any) -> str:
    """JSON text of `value`, with null for any non-finite number in it (logged: see the module)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        log.warning("a non-finite number was about to be sent; it is sent as null")
        return json.dumps(_finite(value), allow_nan=False)


def dumps_strict(value: Any) -> str:
    """JSON text of `value`; a ValueError if it holds a non-finite number (what the database is given)."""
    return json.dumps(value, allow_nan=False)


def loads_stored(text: str) -> Any:
    """A stored JSON value: NaN and Infinity, which a hub older than these checks let into SQLite,
    come back as null."""
    return json.loads(text, parse_constant=lambda _constant: None)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
