"""`sysctl`: kernel parameters, persisted in one file of /etc/sysctl.d and set at once on a live system."""

from __future__ import annotations

from pathlib import Path

from daemon.errors import InvalidParams
from daemon.ops.base import Action, Op, Plan, RemoveFile, Target, WriteSysctl, file_action
from daemon.ops.params import Kind, Param, Params

KEY = r"[a-z0-9_]+(\.[a-z0-9_-]+)+"
VALUE = r"[^\n\r]{1,4096}"
NAME = r"[0-9]{2}-[a-z0-9-]{1,48}"


class SysctlOp(Op):
    name = "sysctl"
    description = "Set kernel parameters: /etc/sysctl.d/NAME.conf holds exactly these keys, applied at once"
    schema = (
        Param("settings", Kind.STRING_MAP, "key -> value, e.g. {\"vm.swappiness\": \"10\"}; empty removes the file",
              required=True, key_pattern=KEY, pattern=VALUE),
        Param("name", Kind.STRING, "the file's name without .conf, ordered by its number", default="90-rastos",
              pattern=NAME),
    )  # fmt: skip

    def plan(self, target: Target, params: Params) -> Plan:
        settings: dict[str, str] = params["settings"]
        path = f"/etc/sysctl.d/{params['name']}.conf"
        if not settings:
            return Plan(self.name, (RemoveFile(path),) if target.path(path).exists() else ())
        lines = ["# Written by rastosd (op sysctl); changes made here are replaced at the next apply."]
        lines += [f"{key} = {value}" for key, value in sorted(settings.items())]
        actions: list[Action] = file_action(target, path, "\n".join(lines) + "\n")
        if target.live:
            for key, value in sorted(settings.items()):
                current = read_live(key)
                if normalize(current) != normalize(value):
                    actions.append(WriteSysctl(key, value, current))
        return Plan(self.name, tuple(actions))

    def check(self, target: Target, params: Params) -> None:
        if target.live:
            for key in params["settings"]:
                if not Path("/proc/sys", *key.split(".")).is_file():
                    raise InvalidParams(f"params.settings.{key}", "this kernel has no such parameter")

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = super().verify(target, params)
        if target.live:
            problems += [
                f"{key} is {read_live(key)!r}, not {value!r}"
                for key, value in params["settings"].items()
                if normalize(read_live(key)) != normalize(value)
            ]
        return problems


def read_live(key: str) -> str:
    path = Path("/proc/sys", *key.split("."))
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return "(no such key)"


def normalize(value: str) -> str:
    """The kernel prints vectors with tabs; a profile writes them with spaces."""
    return " ".join(value.split())
