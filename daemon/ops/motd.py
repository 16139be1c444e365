"""`motd`: the message of the day shown at login (/etc/motd)."""

from __future__ import annotations

from daemon.ops.base import Op, Plan, RemoveFile, Target, file_action
from daemon.ops.params import Kind, Param, Params


class MotdOp(Op):
    name = "motd"
    description = "Set the message of the day (/etc/motd); an empty text removes it"
    after = ("hostname",)  # a message that names the host is written once the host has its name
    schema = (
        Param("text", Kind.STRING, "the message; a final newline is added if missing", required=True, max_length=65536),
    )

    def plan(self, target: Target, params: Params) -> Plan:
        text: str = params["text"]
        if not text:
            exists = target.path("/etc/motd").exists()
            return Plan(self.name, (RemoveFile("/etc/motd"),) if exists else ())
        content = text if text.endswith("\n") else text + "\n"
        return Plan(self.name, tuple(file_action(target, "/etc/motd", content)))
