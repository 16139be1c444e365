"""The registry: every op the daemon offers, by name. Adding an op is adding it to OP_CLASSES.

The op modules are imported the first time the registry is looked into, not when the package is:
`ops.errors` or `ops.rootfs` alone should not cost a process every op's imports. rastosd's start, on
a small VM's boot path, needs none of them until a call names an op.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from ops.base import Op
from ops.errors import UnknownOp
from ops.order import check_declarations

V = TypeVar("V")

# name -> (module, class); the name is checked against the class's own when the registry loads.
OP_CLASSES: dict[str, tuple[str, str]] = {
    "certs": ("ops.certs", "CertsOp"),
    "firewall": ("ops.firewall", "FirewallOp"),
    "hostname": ("ops.hostname", "HostnameOp"),
    "monitoring": ("ops.monitoring", "MonitoringOp"),
    "motd": ("ops.motd", "MotdOp"),
    "network": ("ops.network", "NetworkOp"),
    "ssh": ("ops.ssh", "SshOp"),
    "sysctl": ("ops.sysctl", "SysctlOp"),
    "update": ("ops.update", "UpdateOp"),
    "user": ("ops.user", "UserOp"),
    "zsh": ("ops.zsh", "ZshOp"),
}


@functools.cache
def _registry() -> tuple[dict[str, Op], dict[str, tuple[str, ...]]]:
    ops: dict[str, Op] = {}
    for name, (module, cls) in OP_CLASSES.items():
        op = getattr(importlib.import_module(module), cls)()
        if op.name != name:
            raise RuntimeError(f"{module}.{cls} is named {op.name!r}, registered as {name!r}")
        ops[name] = op
    after = {name: op.after for name, op in ops.items()}
    check_declarations(after)  # a cycle is a bug in the registry: the daemon must not start with it
    return ops, after


class _LoadedOnUse(Mapping[str, V]):
    """A read-only mapping filled from the op modules the first time anything looks into it."""

    def __init__(self, pick: Callable[[], Mapping[str, V]]) -> None:
        self._pick = pick

    def __getitem__(self, key: str) -> V:
        return self._pick()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pick())

    def __len__(self) -> int:
        return len(self._pick())


OPS: Mapping[str, Op] = _LoadedOnUse(lambda: _registry()[0])
AFTER: Mapping[str, tuple[str, ...]] = _LoadedOnUse(lambda: _registry()[1])


def get_op(name: str, field: str = "op") -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise UnknownOp(f"{field}: no op named {name!r}; known: {', '.join(sorted(OPS))}") from None
