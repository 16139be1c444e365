"""daemon.toml with some of its [hub] keys changed and everything else kept (Hub.Join).

The file's own lines are edited where they can be: the [hub] table's `url` and `ca` lines are
replaced, added under its header, or removed, so comments and the other tables stay as the admin
wrote them. The result is read back and must hold exactly the settings wanted; where the file says
its hub settings another way (dotted keys, an inline table), it is written anew from its settings
instead, every one kept, comments not. Either way it is checked as rastosd reads it at start.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.config import parse_config

HUB_HEADER = re.compile(r"^\s*\[\s*hub\s*\]\s*(#.*)?$")
ANY_HEADER = re.compile(r"^\s*\[")
REWRITTEN = "# Written by rastosd (Hub.Join): the settings of the file before, without its comments.\n"


def with_hub_keys(text: str, source: Path, changes: Mapping[str, str | list[str] | None]) -> str:
    """`text` (the file `source`) with each [hub] key of `changes` set to its value, or removed for
    None. The text must be a valid configuration already (RastosError naming the key otherwise)."""
    parse_config(text, source)
    wanted = copy.deepcopy(tomllib.loads(text))
    hub = wanted.setdefault("hub", {})
    for key, value in changes.items():
        if value is None:
            hub.pop(key, None)
        else:
            hub[key] = value
    if not hub:
        del wanted["hub"]
    edited = _edit_lines(text, changes)
    result = edited if _reads_as(edited, wanted) else REWRITTEN + render(wanted)
    parse_config(result, source)
    return result


def _reads_as(text: str, wanted: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == wanted
    except tomllib.TOMLDecodeError:
        return False


def _edit_lines(text: str, changes: Mapping[str, str | list[str] | None]) -> str:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, line in enumerate(lines) if HUB_HEADER.match(line)), None)
    added = [f"{key} = {value_text(value)}\n" for key, value in changes.items() if value is not None]
    if start is None:
        if not added:
            return "".join(lines)
        gap = ["\n"] if lines and lines[-1].strip() else []
        return "".join([*lines, *gap, "[hub]\n", *added])
    end = next((i for i in range(start + 1, len(lines)) if ANY_HEADER.match(lines[i])), len(lines))
    section = lines[start + 1 : end]
    for key, value in changes.items():
        found = [i for i, line in enumerate(section) if re.match(rf"^\s*{key}\s*=", line)]
        for index in reversed(found):
            del section[index]
        if value is not None:  # in its place, or a key the table lacked after its last line
            section.insert(found[0] if found else _after_last_line(section), f"{key} = {value_text(value)}\n")
    return "".join([*lines[: start + 1], *section, *lines[end:]])


def _after_last_line(section: list[str]) -> int:
    end = len(section)
    while end and not section[end - 1].strip():
        end -= 1
    return end


def render(document: Mapping[str, Any]) -> str:
    """A configuration document (tables of strings, integers and lists of strings) as TOML."""
    parts = []
    for table, values in document.items():
        lines = [f"{key} = {value_text(value)}\n" for key, value in values.items()]
        parts.append(f"[{table}]\n{''.join(lines)}")
    return "\n".join(parts)


def value_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return string_text(value)
    if isinstance(value, list):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")  # the configuration holds no other kind


def string_text(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = []
    for char in value:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
