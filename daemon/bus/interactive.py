"""Whether a method call allows interactive authorization: the header flag a client sets when a person
is there to type a password (busctl --allow-interactive-authorization, systemctl on a terminal).

sdbus 0.14 exposes a message's sender, path and member but not its header flags. sd-bus has the
answer (`sd_bus_message_get_allow_interactive_authorization`), and sdbus's own extension module links
it (statically in PyPI's wheels, from libsystemd.so.0 in Debian's package), so the function is looked
up through that module: the one whose sd_bus_message layout matches the messages sdbus hands out.
The message pointer is the first field after the object header (`SdBusMessageObject` in sdbus's
sd_bus_internals.h). Before it is trusted, the layout is proven on each message: sd-bus's
sender read through the same pointer must be the sender sdbus reports. Where that fails (a future
sdbus with another layout) the flag reads as unset: the caller gets InteractiveAuthorizationRequired
rather than a password prompt, never a wrong answer.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import sdbus.sd_bus_internals

log = logging.getLogger("rastosd.bus")


class _MessageObject(ctypes.Structure):
    """sdbus's SdBusMessageObject: PyObject_HEAD, then the sd_bus_message pointer."""

    _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p), ("message", ctypes.c_void_p)]


@functools.cache
def _sd_bus() -> Any | None:
    if sdbus.sd_bus_internals.SdBusMessage.__basicsize__ != ctypes.sizeof(_MessageObject):
        log.warning("sdbus's message objects are not laid out as expected: calls never allow interactive authorization")
        return None
    library = ctypes.CDLL(sdbus.sd_bus_internals.__file__)  # dlsym searches the module and what it links
    library.sd_bus_message_get_allow_interactive_authorization.argtypes = [ctypes.c_void_p]
    library.sd_bus_message_get_allow_interactive_authorization.restype = ctypes.c_int
    library.sd_bus_message_get_sender.argtypes = [ctypes.c_void_p]
    library.sd_bus_message_get_sender.restype = ctypes.c_char_p
    return library


def allows_interactive_authorization(message: Any) -> bool:
    """The call's ALLOW_INTERACTIVE_AUTHORIZATION flag; False when it cannot be read for sure."""
    library = _sd_bus()
    if library is None or not isinstance(message, sdbus.sd_bus_internals.SdBusMessage):
        return False
    pointer = _MessageObject.from_address(id(message)).message
    if not pointer:
        return False
    sender = library.sd_bus_message_get_sender(pointer)
    if sender is None or sender.decode() != message.sender:
        return False
    return bool(library.sd_bus_message_get_allow_interactive_authorization(pointer) > 0)
