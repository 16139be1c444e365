"""org.rastos.Daemon1 as sdbus declarations: the daemon overrides them, rastosctl uses them as proxies.

The contract is `daemon/bus/org.rastos.Daemon1.xml` (commented); a test checks that the running daemon
exports exactly that. Add members, never change or remove one.
"""

from __future__ import annotations

from typing import Any

from sdbus import (
    DbusInterfaceCommonAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    DbusUnprivilegedFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)

BUS_NAME = "org.rastos.Daemon1"
ROOT_PATH = "/org/rastos/Daemon1"
JOB_PATH_PREFIX = ROOT_PATH + "/job/"
MANAGER_INTERFACE = "org.rastos.Daemon1.Manager"
SNAPSHOTS_INTERFACE = "org.rastos.Daemon1.Snapshots"
JOB_INTERFACE = "org.rastos.Daemon1.Job"
UPDATES_INTERFACE = "org.rastos.Daemon1.Updates"
HUB_INTERFACE = "org.rastos.Daemon1.Hub"

# sd-bus would refuse every method not flagged unprivileged to callers without CAP_SYS_ADMIN, which
# shuts out both readers and the admin group. rastosd decides itself (daemon/bus/callers.py).
OPEN = DbusUnprivilegedFlag


def job_path(job_id: int) -> str:
    return f"{JOB_PATH_PREFIX}{job_id}"


class ManagerInterface(DbusInterfaceCommonAsync, interface_name=MANAGER_INTERFACE):
    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def version(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def hostname(self) -> str:
        raise NotImplementedError

    @dbus_property_async("a{ss}", flags=DbusPropertyEmitsChangeFlag)
    def boot_state(self) -> dict[str, str]:
        raise NotImplementedError

    @dbus_method_async(result_signature="a(sss)", result_args_names=("ops",), flags=OPEN)
    async def list_ops(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError

    @dbus_method_async("ss", "s", input_args_names=("op", "params_json"), result_args_names=("plan_json",), flags=OPEN)
    async def plan(self, op: str, params_json: str) -> str:
        raise NotImplementedError

    @dbus_method_async(
        "sst", "o", input_args_names=("op", "params_json", "flags"), result_args_names=("job",), flags=OPEN
    )
    async def apply(self, op: str, params_json: str, flags: int) -> str:
        raise NotImplementedError

    @dbus_method_async("st", "o", input_args_names=("steps_json", "flags"), result_args_names=("job",), flags=OPEN)
    async def run_pipeline(self, steps_json: str, flags: int) -> str:
        raise NotImplementedError

    @dbus_method_async("u", input_args_names=("id",), flags=OPEN)
    async def confirm(self, job_id: int) -> None:
        raise NotImplementedError

    @dbus_method_async(result_signature="a(ussdo)", result_args_names=("jobs",), flags=OPEN)
    async def list_jobs(self) -> list[tuple[int, str, str, float, str]]:
        raise NotImplementedError

    @dbus_method_async("u", "s", input_args_names=("id",), result_args_names=("job_json",), flags=OPEN)
    async def get_job(self, job_id: int) -> str:
        raise NotImplementedError

    @dbus_method_async(
        "tu", "a(tdusus)", input_args_names=("since", "limit"), result_args_names=("events",), flags=OPEN
    )
    async def get_event_log(self, since: int, limit: int) -> list[tuple[int, float, int, str, int, str]]:
        raise NotImplementedError

    @dbus_method_async(result_signature="as", result_args_names=("problems",), flags=OPEN)
    async def check_health(self) -> list[str]:
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("report_json",), flags=OPEN)
    async def compliance_scan(self) -> str:
        raise NotImplementedError

    @dbus_signal_async("sss", signal_args_names=("failed_entry", "failed_root", "entry"))
    def boot_fallback(self) -> tuple[str, str, str]:
        raise NotImplementedError

    @dbus_signal_async("uos", signal_args_names=("id", "job", "kind"))
    def job_new(self) -> tuple[int, str, str]:
        raise NotImplementedError

    @dbus_signal_async("uoss", signal_args_names=("id", "job", "kind", "state"))
    def job_removed(self) -> tuple[int, str, str, str]:
        raise NotImplementedError


class SnapshotsInterface(DbusInterfaceCommonAsync, interface_name=SNAPSHOTS_INTERFACE):
    @dbus_method_async(result_signature="a(udssuub)", result_args_names=("snapshots",), method_name="List", flags=OPEN)
    async def list_snapshots(self) -> list[tuple[int, float, str, str, int, int, bool]]:
        raise NotImplementedError

    @dbus_method_async(
        "s", "u", input_args_names=("description",), result_args_names=("id",), method_name="Create", flags=OPEN
    )
    async def create_snapshot(self, description: str) -> int:
        raise NotImplementedError

    @dbus_method_async("u", input_args_names=("id",), method_name="Delete", flags=OPEN)
    async def delete_snapshot(self, snapshot_id: int) -> None:
        raise NotImplementedError

    @dbus_method_async("u", "s", input_args_names=("id",), result_args_names=("entry",), flags=OPEN)
    async def rollback(self, snapshot_id: int) -> str:
        raise NotImplementedError

    @dbus_method_async("u", "s", input_args_names=("id",), result_args_names=("entry",), flags=OPEN)
    async def boot_once(self, snapshot_id: int) -> str:
        raise NotImplementedError

    @dbus_method_async(flags=OPEN)
    async def mark_good(self) -> None:
        raise NotImplementedError


class UpdatesInterface(DbusInterfaceCommonAsync, interface_name=UPDATES_INTERFACE):
    # Python names of their own: the root object carries Manager and Snapshots too (and Job has a Cancel).

    @dbus_method_async(
        "sb", "t", input_args_names=("source", "reboot"), result_args_names=("id",), method_name="Stage", flags=OPEN
    )
    async def stage_update(self, source: str, reboot: bool) -> int:
        raise NotImplementedError

    @dbus_method_async(method_name="Cancel", flags=OPEN)
    async def cancel_update(self) -> None:
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("status_json",), method_name="GetStatus", flags=OPEN)
    async def get_update_status(self) -> str:
        raise NotImplementedError

    @dbus_property_async("(stt)", flags=DbusPropertyEmitsChangeFlag, property_name="Progress")
    def update_progress(self) -> tuple[str, int, int]:
        raise NotImplementedError

    @dbus_signal_async("tbs", signal_args_names=("id", "ok", "result_json"), signal_name="Completed")
    def update_completed(self) -> tuple[int, bool, str]:
        raise NotImplementedError


class HubInterface(DbusInterfaceCommonAsync, interface_name=HUB_INTERFACE):
    # Python names of their own, as Updates': the root object has a GetStatus already.

    @dbus_method_async(
        "sss", "s", input_args_names=("url", "token", "ca_pem"), result_args_names=("result_json",),
        method_name="Join", flags=OPEN,
    )  # fmt: skip
    async def join_hub(self, url: str, token: str, ca_pem: str) -> str:
        raise NotImplementedError

    @dbus_method_async(result_signature="s", result_args_names=("status_json",), method_name="GetStatus", flags=OPEN)
    async def get_hub_status(self) -> str:
        raise NotImplementedError


class JobInterface(DbusInterfaceCommonAsync, interface_name=JOB_INTERFACE):
    @dbus_property_async("u", flags=DbusPropertyConstFlag)
    def id(self) -> int:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def kind(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyConstFlag)
    def description(self) -> str:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def state(self) -> str:
        raise NotImplementedError

    @dbus_property_async("(us)", flags=DbusPropertyEmitsChangeFlag)
    def progress(self) -> tuple[int, str]:
        raise NotImplementedError

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag)
    def result(self) -> str:
        raise NotImplementedError

    @dbus_method_async(flags=OPEN)
    async def cancel(self) -> None:
        raise NotImplementedError

    @dbus_signal_async("s", signal_args_names=("line",))
    def output(self) -> str:
        raise NotImplementedError

    @dbus_signal_async("ss", signal_args_names=("state", "result_json"))
    def completed(self) -> tuple[str, str]:
        raise NotImplementedError


class BusDriver(DbusInterfaceCommonAsync, interface_name="org.freedesktop.DBus"):
    """The bus itself: the only trustworthy source of a caller's uid and groups, and of who is on it."""

    @dbus_method_async("s", "a{sv}")
    async def get_connection_credentials(self, name: str) -> dict[str, tuple[str, Any]]:
        raise NotImplementedError

    @dbus_method_async("s", "b")
    async def name_has_owner(self, name: str) -> bool:
        raise NotImplementedError

    @dbus_method_async(result_signature="as")
    async def list_activatable_names(self) -> list[str]:
        raise NotImplementedError

    @dbus_method_async(result_signature="s")
    async def get_id(self) -> str:
        """The bus's id: answered by dbus-daemon itself, the floor of a round trip (bench/)."""
        raise NotImplementedError
