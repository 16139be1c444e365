"""Failures an op expects, each with the D-Bus error name a client of rastosd sees.

One name per kind of failure, so clients branch on the name and never parse message text. The names
are data here (no sdbus): the image builder and the hub run ops and validate steps without a bus, and
rastosd's bus layer maps them to D-Bus errors. daemon/errors.py adds the daemon's own failures.
"""

from __future__ import annotations

from rastos.errors import RastosError

ERROR_PREFIX = "org.rastos.Daemon1.Error."


class ExpectedError(RastosError):
    """An expected failure. `dbus_name` is the error name a D-Bus caller receives."""

    dbus_name = ERROR_PREFIX + "Failed"


class InvalidParams(ExpectedError):
    """A parameter is missing, unknown or out of range; the message starts with the field's path."""

    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownOp(ExpectedError):
    dbus_name = ERROR_PREFIX + "UnknownOp"


class OpFailed(ExpectedError):
    """An op's apply or verify failed. Reported in a job's result, not as a reply to a call."""

    dbus_name = ERROR_PREFIX + "OpFailed"


class UnsafePath(OpFailed):
    """A path an op would use leads through a symbolic link, or to something that is no plain file:
    refused, and nothing read or written there (ops/rootfs.py)."""

    dbus_name = ERROR_PREFIX + "UnsafePath"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}; refused, nothing read or written there")
        self.path = path
