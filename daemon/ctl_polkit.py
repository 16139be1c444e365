"""rastosctl at a person's terminal asks for a password as systemctl does: its calls allow interactive
authorization, and polkit's text agent (pkttyagent) is registered for rastosctl's own process, so when
polkit wants an administrator's password for a change, the prompt appears on that terminal.

Not for root (rastosd lets root in without asking polkit), nor with `--no-ask-password`, nor without a
terminal on both ends (a script gets the refusal naming the action instead of a prompt nobody sees),
nor for a remote host (its polkit would need an agent there: `-H` and `-M` get the refusal).

sdbus 0.14 does not expose sd-bus's per-connection switch (`sd_bus_set_allow_interactive_authorization`),
so it is called through sdbus's own extension module, which links sd-bus: the sd_bus pointer is the
first field after the object header (`SdBusObject` in sdbus's sd_bus_internals.h). The layout is proven
on each bus before it is trusted: sd-bus's address read through that pointer must be the address sdbus
reports. Where it is not (a future sdbus), calls go out without the flag and the refusal says what
polkit wanted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import sdbus.sd_bus_internals

from daemon.bus.polkit import AUTHENTICATION_TIMEOUT_USEC

log = logging.getLogger("rastosctl")

AGENT_READY_TIMEOUT = 10.0  # seconds for pkttyagent to register with polkit
CLIENT_MARGIN_USEC = 15_000_000  # over rastosd's wait for polkit: its answer's way back, on a busy host
# Commands that only read: rastosd asks polkit nothing for them, so no prompt is ever wanted.
READ_ONLY = frozenset({"status", "ops", "plan", "jobs", "job", "log"})


class _BusObject(ctypes.Structure):
    """sdbus's SdBusObject: PyObject_HEAD, then the sd_bus pointer."""

    _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p), ("bus", ctypes.c_void_p)]


@functools.cache
def _sd_bus() -> Any:
    library = ctypes.CDLL(sdbus.sd_bus_internals.__file__)  # dlsym searches the module and what it links
    library.sd_bus_get_address.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p)]
    library.sd_bus_get_address.restype = ctypes.c_int
    library.sd_bus_set_allow_interactive_authorization.argtypes = [ctypes.c_void_p, ctypes.c_int]
    library.sd_bus_set_allow_interactive_authorization.restype = ctypes.c_int
    return library


def allow_interactive_authorization(bus: Any, allowed: bool = True) -> bool:
    """Set the flag on every call `bus` makes from now on; False when it could not be set for sure.
    Allowed, the calls also wait for a person at a password prompt: longer than rastosd waits for polkit,
    so its answer, a refusal included, arrives rather than a time-out."""
    if not isinstance(bus, sdbus.sd_bus_internals.SdBus):
        return False
    pointer = _BusObject.from_address(id(bus)).bus
    if not pointer:
        return False
    library = _sd_bus()
    address = ctypes.c_char_p()
    if library.sd_bus_get_address(pointer, ctypes.byref(address)) < 0 or address.value is None:
        return False
    if address.value.decode(errors="replace") != bus.address:
        log.warning("sdbus's bus objects are not laid out as expected: calls go out without asking for a password")
        return False
    if library.sd_bus_set_allow_interactive_authorization(pointer, int(allowed)) < 0:
        return False
    if allowed:
        bus.method_call_timeout_usec = AUTHENTICATION_TIMEOUT_USEC + CLIENT_MARGIN_USEC
    return True


def wants_password_prompt(command: str, local: bool, ask_password: bool) -> bool:
    """Whether this run of rastosctl may ask its person for a password."""
    return (
        ask_password
        and local
        and command not in READ_ONLY
        and os.geteuid() != 0
        and sys.stdin.isatty()
        and sys.stdout.isatty()
    )


@contextlib.contextmanager
def password_agent() -> Iterator[None]:
    """polkit's text agent for this process while the block runs. `--fallback`: an agent the session has
    already (a desktop's) asks instead. Registration is awaited (pkttyagent closes the notify pipe once
    polkit knows it), so the first call cannot reach polkit before the agent does."""
    program = shutil.which("pkttyagent")
    if program is None:
        log.debug("no pkttyagent here (Debian's polkitd package has it): polkit cannot ask for a password")
        yield
        return
    ready, notify = os.pipe()
    argv = [program, "--notify-fd", str(notify), "--fallback", "--process", str(os.getpid())]
    log.debug("starting %s", " ".join(argv))
    try:
        agent = subprocess.Popen(argv, pass_fds=(notify,))
    except OSError as error:
        os.close(ready)
        os.close(notify)
        log.warning("pkttyagent could not start (%s): polkit cannot ask for a password", error)
        yield
        return
    os.close(notify)
    try:
        _wait_closed(ready, AGENT_READY_TIMEOUT)
        yield
    finally:
        os.close(ready)
        agent.terminate()
        try:
            agent.wait(5)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _wait_closed(fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable and not os.read(fd, 64):
            return
    log.warning("pkttyagent did not register within %.0f s: calls go on without it", timeout)
