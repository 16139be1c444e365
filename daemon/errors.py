"""Failures the daemon expects, each with the D-Bus error name a client sees.

One name per kind of failure, so clients branch on the name and never parse message text. The bus
layer maps these to D-Bus errors; this module does not import sdbus, so the op engine runs without it.
"""

from __future__ import annotations

from rastos.errors import RastosError

ERROR_PREFIX = "org.rastos.Daemon1.Error."


class DaemonError(RastosError):
    """An expected failure. `dbus_name` is the error name a D-Bus caller receives."""

    dbus_name = ERROR_PREFIX + "Failed"


class InvalidParams(DaemonError):
    """A parameter is missing, unknown or out of range; the message starts with the field's path."""

    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotPermitted(DaemonError):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class UnknownOp(DaemonError):
    dbus_name = ERROR_PREFIX + "UnknownOp"


class NoSuchJob(DaemonError):
    dbus_name = ERROR_PREFIX + "NoSuchJob"


class JobNotCancellable(DaemonError):
    dbus_name = ERROR_PREFIX + "JobNotCancellable"


class NoSuchSnapshot(DaemonError):
    dbus_name = ERROR_PREFIX + "NoSuchSnapshot"


class SnapshotProtected(DaemonError):
    """The snapshot is the booted one, the last known-good one, or the base of a deployment."""

    dbus_name = ERROR_PREFIX + "SnapshotProtected"


class SnapshotsUnavailable(DaemonError):
    """The target root is not a btrfs subvolume or has no snapshot directory."""

    dbus_name = ERROR_PREFIX + "SnapshotsUnavailable"


class BootConfigError(DaemonError):
    """The boot loader's entries could not be read or written (no ESP, no entry to copy)."""

    dbus_name = ERROR_PREFIX + "BootConfig"


class OpFailed(DaemonError):
    """An op's apply or verify failed. Reported in a job's result, not as a reply to a call."""

    dbus_name = ERROR_PREFIX + "OpFailed"


class UnsafePath(OpFailed):
    """A path an op would use leads through a symbolic link, or to something that is no plain file:
    refused, and nothing read or written there (daemon/ops/rootfs.py)."""

    dbus_name = ERROR_PREFIX + "UnsafePath"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}; refused, nothing read or written there")
        self.path = path


class NotPending(DaemonError):
    """Confirm() for a job whose change is not waiting for a confirmation (none, or settled)."""

    dbus_name = ERROR_PREFIX + "NotPending"


ALL_ERRORS: tuple[type[DaemonError], ...] = (
    DaemonError,
    InvalidParams,
    NotPermitted,
    UnknownOp,
    NoSuchJob,
    JobNotCancellable,
    NoSuchSnapshot,
    SnapshotProtected,
    SnapshotsUnavailable,
    BootConfigError,
    OpFailed,
    UnsafePath,
    NotPending,
)
