"""Who is calling (uid and groups, from the bus driver) and whether they may call a method that changes
the host.

Root may, always, without asking anyone (as systemd's services let a caller with CAP_SYS_ADMIN by):
the boot's health check and the hub's own work never wait for polkit. Anyone else: where polkit is on
the bus (or the bus can start it) polkit decides, per action (daemon/bus/polkit.py); where it is not,
members of the configured admin group may, as before polkit. The bus policy lets every caller reach
every method, as systemd-hostnamed's does: this is the check.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass

from sdbus import SdBus, get_current_message

from daemon.bus.interactive import allows_interactive_authorization
from daemon.bus.interfaces import BusDriver
from daemon.bus.polkit import Polkit
from daemon.errors import NotPermitted


@dataclass(frozen=True)
class Caller:
    uid: int
    gids: frozenset[int]


class Callers:
    def __init__(self, bus: SdBus, admin_group: str) -> None:
        self._driver = BusDriver.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", bus)
        self._admin_group = admin_group
        self._cache: dict[str, Caller] = {}  # unique names are never reused on a bus
        self.polkit: Polkit | None = None  # set once the daemon has found polkit on its bus

    async def current(self) -> Caller:
        sender = get_current_message().sender
        if sender is None:
            raise NotPermitted("the call carries no sender")
        if sender not in self._cache:
            credentials = await self._driver.get_connection_credentials(sender)
            uid = int(credentials["UnixUserID"][1])
            gids = credentials.get("UnixGroupIDs", ("au", None))[1]
            groups = frozenset(gids) if gids is not None else _groups_of(uid)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[sender] = Caller(uid, groups)
        return self._cache[sender]

    def is_admin(self, caller: Caller) -> bool:
        """Root or a member of the admin group: who may change the host where polkit is not installed
        (and whose plans run on the daemon's own threads)."""
        if caller.uid == 0:
            return True
        try:
            admin_gid = grp.getgrnam(self._admin_group).gr_gid
        except KeyError:
            return False
        return admin_gid in caller.gids

    async def authorize(self, method: str, refusal: str = "changes the host") -> Caller:
        """The caller, if they may call `method` (Interface.Member); NotPermitted otherwise. Before the
        arguments are read: a refused call costs one lookup of the caller and one polkit query."""
        caller = await self.current()
        if caller.uid == 0:
            return caller
        if self.polkit is not None:
            message = get_current_message()
            await self.polkit.check(method, message.sender or "", allows_interactive_authorization(message))
            return caller
        if self.is_admin(caller):
            return caller
        member = method.rsplit(".", 1)[-1]
        raise NotPermitted(f"{member} {refusal}: only root or members of group {self._admin_group!r} may call it")

    def describe(self) -> str:
        """Which check is in force, for the log at start."""
        if self.polkit is not None:
            return "polkit decides who may change the host (root always may)"
        return f"polkit is not on this bus: root and members of group {self._admin_group!r} may change the host"


def _groups_of(uid: int) -> frozenset[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset({user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)})
