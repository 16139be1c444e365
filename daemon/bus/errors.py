"""Daemon errors as D-Bus errors, and the guard every exported method runs under.

Expected failures (`DaemonError`) reach the caller under their own error name. Anything else is a bug:
it is logged with its traceback on the daemon's side, and the caller gets `...Error.Internal` with a
short text and no traceback (a traceback would leak paths and internals to an unprivileged caller).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from sdbus import (
    DbusAccessDeniedError,
    DbusFailedError,
    DbusInteractiveAuthorizationRequiredError,
    DbusInvalidArgsError,
)

from daemon.errors import ALL_ERRORS, ERROR_PREFIX, DaemonError

log = logging.getLogger("rastosd.bus")

P = ParamSpec("P")
R = TypeVar("R")

_PREDEFINED: dict[str, type[DbusFailedError]] = {
    DbusInvalidArgsError.dbus_error_name: DbusInvalidArgsError,
    DbusAccessDeniedError.dbus_error_name: DbusAccessDeniedError,
    DbusInteractiveAuthorizationRequiredError.dbus_error_name: DbusInteractiveAuthorizationRequiredError,
}


def _bus_error_class(name: str) -> type[DbusFailedError]:
    if name in _PREDEFINED:
        return _PREDEFINED[name]
    # sdbus maps an exception class to its error name when the class is created.
    return type(name.rsplit(".", 1)[1] + "BusError", (DbusFailedError,), {"dbus_error_name": name})


BUS_ERRORS: dict[str, type[DbusFailedError]] = {
    error.dbus_name: _bus_error_class(error.dbus_name) for error in ALL_ERRORS
}
InternalError = _bus_error_class(ERROR_PREFIX + "Internal")


def to_bus_error(error: DaemonError) -> DbusFailedError:
    return BUS_ERRORS[error.dbus_name](encodable(str(error)))


def encodable(text: str) -> str:
    """The text with what a D-Bus string cannot hold escaped: a lone surrogate (not UTF-8) and NUL
    (sd-bus takes C strings). sd-bus sends no reply at all for an error whose text it cannot make,
    and the caller would wait out its timeout."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()
    return text.replace("\0", "\\x00")


def guarded(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except DaemonError as error:
            raise to_bus_error(error) from None
        except DbusFailedError as error:
            if error.args and isinstance(error.args[0], str) and encodable(error.args[0]) != error.args[0]:
                raise type(error)(encodable(error.args[0])) from None
            raise
        except Exception as error:
            log.exception("%s failed unexpectedly", method.__name__)
            raise InternalError(
                f"internal error in rastosd ({type(error).__name__}); the journal has details"
            ) from None

    return wrapper
