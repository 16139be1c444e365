"""Kernel profiles: profiles/kernel/NAME.toml, a base configuration and a fragment of options.

    description = "..."
    base = "tinyconfig"            # debian | defconfig | tinyconfig
    extends = ["container"]        # other kernel profiles whose options come first (optional)
    [options]                      # CONFIG_ names without the prefix
    VIRTIO_BLK = "y"               # y, m or n
    NR_CPUS = 64                   # a number
    LSM = "landlock,lockdown,yama" # any other text is a string option
    [features.kasan]               # options added only when the feature is asked for
    KASAN = "y"

`debian` is the configuration Debian builds its own kernel of that version with (the linux-config
package of the same source), so a profile on it changes Debian's kernel by its fragment and nothing
else; `defconfig` and `tinyconfig` are the kernel's own starting points. Errors name the file and key.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imagebuilder.checkout import CHECKOUT
from rastos.errors import RastosError

KERNEL_PROFILE_DIR = CHECKOUT / "profiles" / "kernel"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_OPTION = re.compile(r"^[A-Z0-9_]+$")
_KEYS = {"description", "base", "extends", "options", "features"}


class Base(enum.Enum):
    debian = "debian"
    defconfig = "defconfig"
    tinyconfig = "tinyconfig"


@dataclass(frozen=True)
class KernelProfile:
    name: str
    description: str
    base: Base
    options: Mapping[str, str]  # merged over `extends`, in .config notation (y, 64, "text")
    features: Mapping[str, Mapping[str, str]]
    path: Path

    def fragment(self, features: tuple[str, ...] = ()) -> dict[str, str]:
        """The options to merge: the profile's, then each feature's asked for."""
        merged = dict(self.options)
        for feature in features:
            if feature not in self.features:
                known = ", ".join(sorted(self.features)) or "none"
                raise RastosError(f"kernel profile {self.name} has no feature {feature!r}; it has: {known}")
            merged.update(self.features[feature])
        return merged


class KernelProfileError(RastosError):
    pass


def available(directory: Path = KERNEL_PROFILE_DIR) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.toml"))


def load(name: str, directory: Path = KERNEL_PROFILE_DIR) -> KernelProfile:
    return _load(name, directory, ())


def _load(name: str, directory: Path, chain: tuple[str, ...]) -> KernelProfile:
    if not _NAME.match(name):
        raise KernelProfileError(f"kernel profile name {name!r} is not valid (lower case letters, digits, -)")
    if name in chain:
        raise KernelProfileError(f"kernel profiles extend each other in a cycle: {' -> '.join((*chain, name))}")
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise KernelProfileError(f"no kernel profile {name!r}", hint=f"known: {', '.join(available(directory))}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise KernelProfileError(f"{path}: not valid TOML: {error}") from None
    where = str(path)
    if unknown := sorted(set(data) - _KEYS):
        raise KernelProfileError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_KEYS))}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise KernelProfileError(f"{where}: description: must be a string")
    base_name = data.get("base")
    if base_name not in {b.value for b in Base}:
        raise KernelProfileError(f"{where}: base: {base_name!r} is not one of {', '.join(b.value for b in Base)}")
    extends = data.get("extends", [])
    if not isinstance(extends, list) or not all(isinstance(parent, str) for parent in extends):
        raise KernelProfileError(f"{where}: extends: must be a list of kernel profile names")
    options: dict[str, str] = {}
    features: dict[str, Mapping[str, str]] = {}
    for parent_name in extends:
        parent = _load(parent_name, directory, (*chain, name))
        if parent.base.value != base_name:
            raise KernelProfileError(
                f"{where}: extends: {parent_name} starts from base {parent.base.value}, this profile from {base_name}"
            )
        options.update(parent.options)
        for feature, table in parent.features.items():
            features[feature] = MappingProxyType({**features.get(feature, {}), **table})
    options.update(_options(data.get("options", {}), f"{where}: options"))
    raw_features = data.get("features", {})
    if not isinstance(raw_features, dict):
        raise KernelProfileError(f"{where}: features: must be a table of tables")
    for feature, table in raw_features.items():  # a feature of a parent's name gets these options too
        features[feature] = MappingProxyType(
            {**features.get(feature, {}), **_options(table, f"{where}: features.{feature}")}
        )
    return KernelProfile(
        name, description, Base(base_name), MappingProxyType(options), MappingProxyType(features), path
    )


def _options(table: Any, where: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise KernelProfileError(f"{where}: must be a table of OPTION = value")
    options = {}
    for key, value in table.items():
        name = key.removeprefix("CONFIG_")
        if not _OPTION.match(name):
            raise KernelProfileError(f"{where}.{key}: not a kernel option name (upper case, digits, _)")
        options[name] = config_value(value, f"{where}.{key}")
    return options


def config_value(value: Any, where: str) -> str:
    """A TOML value in .config notation: y/m/n as they are, numbers as digits, other text quoted."""
    if isinstance(value, bool):
        raise KernelProfileError(f'{where}: write "y" or "n", not true/false')
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise KernelProfileError(f'{where}: must be "y", "m", "n", a number or a string')
    if value in ("y", "m", "n") or re.fullmatch(r"0x[0-9a-fA-F]+", value):
        return value
    if '"' in value or "\n" in value:
        raise KernelProfileError(f"{where}: a string option may not hold a quote or a newline")
    return f'"{value}"'
