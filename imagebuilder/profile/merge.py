"""TOML tables into the profile's typed dataclasses: merging a child's tables over its parent's, then
building each dataclass with every key checked, every error naming the file that set the key, the
key, and the reason. Nothing here knows what a profile means; load.py does.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from imagebuilder.profile.model import KeyProblem, Profile
from rastos.errors import RastosError

log = logging.getLogger("rastos.profile")


class ProfileError(RastosError):
    """A profile file is wrong; the message names the file and the key."""


def table_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_key(source: Path, key: str, cls: type) -> ProfileError:
    known = [k for k in table_fields(cls) if k != "name"]
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
    return ProfileError(f"{source}: unknown key '{key}'", hint=hint)


def merge_table(
    cls: type,
    into: dict[str, Any],
    raw: Mapping[str, Any],
    source: Path,
    prefix: str,
    origins: dict[str, Path],
) -> None:
    fields = table_fields(cls)
    hints = type_hints(cls)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields or (key == "name" and cls is Profile):
            raise unknown_key(source, dotted, cls)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ProfileError(f"{source}: key '{dotted}': expected a table, got {describe(value)}")
            table = into.setdefault(key, {})
            merge_table(kind, table, value, source, f"{dotted}.", origins)  # type: ignore[arg-type]
            continue
        element = tuple_element(kind)
        if element is not None and dataclasses.is_dataclass(element):
            merge_table_list(element, into, key, value, source, dotted, origins, fields[key])  # type: ignore[arg-type]
            continue
        appending = fields[key].metadata.get("merge") == "append" and key in into
        if appending and isinstance(value, list) and isinstance(into[key], list):
            into[key] = into[key] + [v for v in value if v not in into[key]]
        elif appending and isinstance(value, dict) and isinstance(into[key], dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = value
        origins[dotted] = source


def merge_table_list(
    element: type,
    into: dict[str, Any],
    key: str,
    value: Any,
    source: Path,
    dotted: str,
    origins: dict[str, Path],
    spec: dataclasses.Field[Any],
) -> None:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProfileError(f"{source}: key '{dotted}': expected a list of tables, got {describe(value)}")
    current: list[dict[str, Any]] = into.get(key, []) if spec.metadata.get("merge") == "append" else []
    current_origins = [origins.get(f"{dotted}[{i}]", source) for i in range(len(current))]
    for i, item in enumerate(value):
        checked: dict[str, Any] = {}
        merge_table(element, checked, item, source, f"{dotted}[{i}].", {})
        # An entry with the same name as an inherited one replaces it.
        same = [j for j, old in enumerate(current) if old.get("name") == checked.get("name")]
        if same:
            current[same[0]] = checked
            current_origins[same[0]] = source
        else:
            current.append(checked)
            current_origins.append(source)
    into[key] = current
    for i, origin in enumerate(current_origins):
        origins[f"{dotted}[{i}]"] = origin


def tuple_element(kind: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0]
    return None


def describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


# --- building and checking ----------------------------------------------------------------------


@dataclasses.dataclass
class Origins:
    by_key: dict[str, Path]
    fallback: Path

    def of(self, dotted: str) -> Path:
        """The file that set `dotted`, or the nearest enclosing key that has one."""
        key = dotted
        while key:
            if key in self.by_key:
                return self.by_key[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return self.fallback


def build(cls: type, data: Mapping[str, Any], prefix: str, origins: Origins) -> Any:
    hints = type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        dotted = f"{prefix}{f.name}"
        value = convert(hints[f.name], f, data[f.name], dotted, origins)
        check = f.metadata.get("check")
        try:
            problem = check(value) if check else None
        except KeyProblem as below:
            raise ProfileError(f"{origins.of(dotted)}: key '{dotted}{below.suffix}': {below.problem}") from None
        if problem:
            raise ProfileError(f"{origins.of(dotted)}: key '{dotted}': {problem}")
        if newer := f.metadata.get("deprecated"):
            log.warning("%s: key '%s' is deprecated: write '%s%s' (the same value)", origins.of(dotted), dotted,
                        prefix, newer)  # fmt: skip
        values[f.name] = value
    return cls(**values)


def convert(kind: Any, spec: dataclasses.Field[Any] | None, value: Any, dotted: str, origins: Origins) -> Any:
    def wrong(expected: str) -> ProfileError:
        return ProfileError(f"{origins.of(dotted)}: key '{dotted}': expected {expected}, got {describe(value)}")

    parse = spec.metadata.get("parse") if spec else None
    if parse is not None:
        try:
            return parse(value)
        except ValueError as e:
            raise ProfileError(f"{origins.of(dotted)}: key '{dotted}': {e}") from None
    if dataclasses.is_dataclass(kind):
        return build(kind, value, f"{dotted}.", origins)  # type: ignore[arg-type]
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value is None else convert(inner[0], None, value, dotted, origins)
    if origin is tuple:
        element = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise wrong("a list")
        return tuple(convert(element, None, v, f"{dotted}[{i}]", origins) for i, v in enumerate(value))
    if origin is Mapping or kind is Mapping:
        if not isinstance(value, dict):
            raise wrong("a table")
        return {str(k): scalar_text(v, f"{dotted}.{k}", origins) for k, v in value.items()}
    if isinstance(kind, type) and issubclass(kind, Enum):
        choices = [m.value for m in kind]
        if value not in choices:
            raise ProfileError(f"{origins.of(dotted)}: key '{dotted}': {value!r} is not one of {', '.join(choices)}")
        return kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"profile field type {kind!r} is not supported")  # a bug in model.py


def scalar_text(value: Any, dotted: str, origins: Origins) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        return str(value)
    raise ProfileError(f"{origins.of(dotted)}: key '{dotted}': expected a string or integer, got {describe(value)}")


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value
