"""Modules imported at their first use, not at the daemon's start: what it imports at start stays
resident for its whole life, and most hosts never issue a certificate (cryptography alone is ~9 MB)."""

from __future__ import annotations

import importlib
from typing import Any


class Lazy:
    """Stands for `module` (or its `attribute`, such as a class of constants) and imports it at the
    first attribute read through it. Not importlib's LazyLoader: that is thread-safe only from Python
    3.12, and plans run on several threads at once; import_module takes the import system's lock."""

    def __init__(self, module: str, attribute: str = "") -> None:
        self._module = module
        self._attribute = attribute

    def __getattr__(self, name: str) -> Any:
        target = importlib.import_module(self._module)
        if self._attribute:
            target = getattr(target, self._attribute)
        return getattr(target, name)
