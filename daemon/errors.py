"""Failures the daemon expects, each with the D-Bus error name a client sees.

The ops' own (InvalidParams, UnknownOp, OpFailed, UnsafePath) are in ops/errors.py, under the same
base; these are the daemon's: jobs, snapshots, boot entries, access. This module does not import
sdbus, so the op engine runs without it.
"""

from __future__ import annotations

from ops.errors import ERROR_PREFIX as ERROR_PREFIX
from ops.errors import ExpectedError
from ops.errors import InvalidParams as InvalidParams
from ops.errors import OpFailed as OpFailed
from ops.errors import UnknownOp as UnknownOp
from ops.errors import UnsafePath as UnsafePath

# Every failure the daemon expects, the ops' included: what the bus layer turns into a named error.
DaemonError = ExpectedError


class NotPermitted(DaemonError):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


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
