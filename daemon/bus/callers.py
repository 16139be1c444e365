"""Who is calling: uid and groups from the bus driver, and the rule for mutating methods.

The bus policy in units/ already limits mutating methods to root and the admin group; the daemon
checks again from the bus's own credentials so that a loose or broken policy cannot open it up.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass

from sdbus import SdBus, get_current_message

from daemon.bus.interfaces import BusDriver
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
        if caller.uid == 0:
            return True
        try:
            admin_gid = grp.getgrnam(self._admin_group).gr_gid
        except KeyError:
            return False
        return admin_gid in caller.gids

    async def require_admin(self, method: str) -> Caller:
        caller = await self.current()
        if self.is_admin(caller):
            return caller
        raise NotPermitted(
            f"{method} changes the host: only root or members of group {self._admin_group!r} may call it"
        )


def _groups_of(uid: int) -> frozenset[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset({user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)})
