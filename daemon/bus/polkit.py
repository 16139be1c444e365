"""polkit decides who may change the host, where it is installed.

Each method that changes the host has a polkit action (units/org.rastos.Daemon1.policy); rastosd asks
polkit's CheckAuthorization about the caller's bus name (subject kind `system-bus-name`, so polkit
reads the caller's uid, process and session from the bus itself) and passes the call's
allow-interactive-authorization flag on as polkit's AllowUserInteraction. A challenge (polkit would
let the caller in after authenticating) is refused with InteractiveAuthorizationRequired, as
systemd's services do; a plain no with AccessDenied. Both name the action.
"""

from __future__ import annotations

import logging
from typing import Any

from sdbus import DbusInterfaceCommonAsync, SdBus, SdBusBaseError, dbus_method_async

from daemon.bus.interfaces import BusDriver
from daemon.errors import AuthenticationRequired, NotPermitted

log = logging.getLogger("rastosd.bus")

POLKIT_NAME = "org.freedesktop.PolicyKit1"
PREFIX = "org.rastos.Daemon1."
ALLOW_USER_INTERACTION = 1
# polkit answers a check that may ask only once a person has typed a password into an agent, which
# takes longer than sd-bus's default 25 s at times (a long password, a slow machine, a distracted
# admin), so rastosd waits up to this for any call of its own (its others go to the bus driver, which
# answers at once); a client that lets polkit ask waits longer still, to hear rastosd's answer.
AUTHENTICATION_TIMEOUT_USEC = 120_000_000

# Method (as the caller names it, interface.member) -> its action. Read-only methods have none.
ACTIONS: dict[str, str] = {
    "Manager.Apply": PREFIX + "apply",
    "Manager.RunPipeline": PREFIX + "apply",
    "Manager.Confirm": PREFIX + "confirm",
    "Manager.ComplianceScan": PREFIX + "compliance-scan",
    "Snapshots.Create": PREFIX + "manage-snapshots",
    "Snapshots.Delete": PREFIX + "manage-snapshots",
    "Snapshots.Rollback": PREFIX + "manage-boot",
    "Snapshots.BootOnce": PREFIX + "manage-boot",
    "Snapshots.MarkGood": PREFIX + "manage-boot",
    "Job.Cancel": PREFIX + "cancel-job",
    "Updates.Stage": PREFIX + "stage-update",
    "Updates.Cancel": PREFIX + "stage-update",
    "Hub.Join": PREFIX + "join-hub",
}


class AuthorityInterface(DbusInterfaceCommonAsync, interface_name="org.freedesktop.PolicyKit1.Authority"):
    @dbus_method_async("(sa{sv})sa{ss}us", "(bba{ss})")
    async def check_authorization(
        self,
        subject: tuple[str, dict[str, tuple[str, Any]]],
        action_id: str,
        details: dict[str, str],
        flags: int,
        cancellation_id: str,
    ) -> tuple[bool, bool, dict[str, str]]:
        raise NotImplementedError


class Polkit:
    def __init__(self, bus: SdBus) -> None:
        self._authority = AuthorityInterface.new_proxy(POLKIT_NAME, "/org/freedesktop/PolicyKit1/Authority", bus)

    async def check(self, method: str, sender: str, interactive: bool) -> None:
        """Returns if polkit authorizes `sender` for `method`'s action (`method` is Interface.Member);
        raises NotPermitted (or AuthenticationRequired) naming the action otherwise."""
        action, member = ACTIONS[method], method.rsplit(".", 1)[-1]
        log.debug("asking polkit whether %s may %s (%s, interactive: %s)", sender, action, method,
                  "yes" if interactive else "no")  # fmt: skip
        subject = ("system-bus-name", {"name": ("s", sender)})
        flags = ALLOW_USER_INTERACTION if interactive else 0
        try:
            authorized, challenge, _ = await self._authority.check_authorization(subject, action, {}, flags, "")
        except SdBusBaseError as error:
            # Closed, not open: a question polkit did not answer is a no.
            log.warning("polkit could not be asked about %s: %s", action, error)
            name = getattr(error, "dbus_error_name", type(error).__name__)
            raise NotPermitted(f"{member}: polkit could not be asked about {action} ({name})") from None
        if authorized:
            return
        if challenge:
            raise AuthenticationRequired(
                f"{member}: polkit action {action} needs an administrator's authentication (call it with"
                " interactive authorization allowed and an authentication agent running)"
            )
        raise NotPermitted(f"{member}: polkit does not allow {action} to this caller")


async def find_polkit(bus: SdBus) -> Polkit | None:
    """polkit, if it is on the bus or the bus can start it; None where it is not installed."""
    driver = BusDriver.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", bus)
    if await driver.name_has_owner(POLKIT_NAME) or POLKIT_NAME in await driver.list_activatable_names():
        return Polkit(bus)
    return None
