"""Failures the daemon expects, each with the D-Bus error name a client sees.

The ops' own (InvalidParams, UnknownOp, OpFailed, UnsafePath) are in ops/errors.py, under the same
base; these are the daemon's: jobs, snapshots, boot entries, access, image updates. This module does
not import sdbus, so the op engine runs without it.
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


class AuthenticationRequired(NotPermitted):
    """polkit would allow the call once the caller authenticates, and the call did not allow it to ask."""

    dbus_name = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


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


class HubCredentials(DaemonError):
    """Hub.Join on a host that takes its hub settings from systemd credentials, which come before the
    files Join writes."""

    dbus_name = ERROR_PREFIX + "HubCredentials"


UPDATE_PREFIX = ERROR_PREFIX + "Update."


class UpdateFailed(DaemonError):
    """Staging an image update failed for a reason none of the names below gives (a download the
    server refused, a deployment that cannot be replaced)."""

    dbus_name = UPDATE_PREFIX + "Failed"


class UpdateCorrupt(UpdateFailed):
    """The bundle is cut short or a part does not match its sha256 in the signed manifest."""

    dbus_name = UPDATE_PREFIX + "Corrupt"


class UpdateSignature(UpdateFailed):
    """The manifest's signature is malformed or does not match the manifest."""

    dbus_name = UPDATE_PREFIX + "Signature"


class UpdateUntrusted(UpdateFailed):
    """The bundle is signed by a key that is not in the host's update-keys.d (or none is)."""

    dbus_name = UPDATE_PREFIX + "Untrusted"


class UpdateParent(UpdateFailed):
    """A delta whose parent version this host does not hold."""

    dbus_name = UPDATE_PREFIX + "Parent"


class UpdateFormat(UpdateFailed):
    """Not a bundle this rastOS reads: a manifest field is missing or wrong."""

    dbus_name = UPDATE_PREFIX + "Format"


class UpdateBusy(UpdateFailed):
    """Another update is staging: one at a time."""

    dbus_name = UPDATE_PREFIX + "Busy"


class UpdateNoSpace(UpdateFailed):
    """The file system ran out of space while the update was downloaded or received."""

    dbus_name = UPDATE_PREFIX + "NoSpace"


class UpdatesUnavailable(UpdateFailed):
    """This boot cannot take updates: its root is not a btrfs subvolume, or it is a read-only
    snapshot under an overlay."""

    dbus_name = UPDATE_PREFIX + "Unavailable"


class NotStaging(UpdateFailed):
    """Cancel() while no update is staging."""

    dbus_name = UPDATE_PREFIX + "NotStaging"


# rastos.bundle's BundleError.reason -> the error a client sees.
BUNDLE_ERRORS: dict[str, type[UpdateFailed]] = {
    "corrupt": UpdateCorrupt,
    "signature": UpdateSignature,
    "untrusted": UpdateUntrusted,
    "parent": UpdateParent,
    "format": UpdateFormat,
}

ALL_ERRORS: tuple[type[DaemonError], ...] = (
    DaemonError,
    InvalidParams,
    NotPermitted,
    AuthenticationRequired,
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
    HubCredentials,
    UpdateFailed,
    *BUNDLE_ERRORS.values(),
    UpdateBusy,
    UpdateNoSpace,
    UpdatesUnavailable,
    NotStaging,
)
