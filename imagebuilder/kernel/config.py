"""Kernel .config files: read, merge a fragment on a base, and report what the fragment asked for
that the kernel's own resolution (`make olddefconfig`) did not keep.

A fragment is a set of option values; merging writes them over the base, then Kconfig resolves the
whole: an option whose dependencies are not met is silently dropped, a `select` may turn on what the
fragment turned off, a choice keeps one member. The report is the check that matters: every value
asked for, compared with the final .config. (The kernel's scripts/kconfig/merge_config.sh prints the
same as warnings mixed into its output; here it is data a caller can show, test and refuse on.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

NOT_SET = "n"
_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


def parse(text: str) -> dict[str, str]:
    """Option name (without CONFIG_) -> value as written: y, m, a number, a quoted string; `n` for
    `# CONFIG_X is not set`."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        if match := _SET.match(line):
            options[match.group(1)] = match.group(2)
        elif match := _UNSET.match(line):
            options[match.group(1)] = NOT_SET
    return options


def line_for(name: str, value: str) -> str:
    return f"# CONFIG_{name} is not set" if value == NOT_SET else f"CONFIG_{name}={value}"


def merge(base: str, fragment: Mapping[str, str]) -> str:
    """`base` with each option of `fragment` set: its line replaced where the base has it, appended
    where it does not. Everything else of the base is kept as it was."""
    remaining = dict(fragment)
    lines = []
    for line in base.splitlines():
        match = _SET.match(line) or _UNSET.match(line)
        if match and match.group(1) in remaining:
            name = match.group(1)
            lines.append(line_for(name, remaining.pop(name)))
        else:
            lines.append(line)
    lines += [line_for(name, value) for name, value in remaining.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Miss:
    """An option the fragment set that the final configuration has otherwise."""

    name: str
    wanted: str
    got: str  # `n` also when the option is absent (its dependencies are not met)

    def __str__(self) -> str:
        return f"CONFIG_{self.name}: asked {self.wanted}, got {self.got}"


def misses(fragment: Mapping[str, str], final: Mapping[str, str]) -> list[Miss]:
    """Every fragment option whose value did not survive. `m` asked and `y` got is no miss: a module
    built in is there all the same (Kconfig does that when MODULES is off, or a `select` forces it)."""
    found = []
    for name, wanted in fragment.items():
        got = final.get(name, NOT_SET)
        if got == wanted or (wanted == "m" and got == "y"):
            continue
        found.append(Miss(name, wanted, got))
    return found
