"""The registry: every op the daemon offers, by name. Adding an op is adding it to OPS."""

from __future__ import annotations

from daemon.errors import UnknownOp
from daemon.ops.base import Op
from daemon.ops.certs import CertsOp
from daemon.ops.firewall import FirewallOp
from daemon.ops.hostname import HostnameOp
from daemon.ops.monitoring import MonitoringOp
from daemon.ops.motd import MotdOp
from daemon.ops.network import NetworkOp
from daemon.ops.order import check_declarations
from daemon.ops.ssh import SshOp
from daemon.ops.sysctl import SysctlOp
from daemon.ops.update import UpdateOp
from daemon.ops.user import UserOp
from daemon.ops.zsh import ZshOp

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        CertsOp(),
        FirewallOp(),
        HostnameOp(),
        MonitoringOp(),
        MotdOp(),
        NetworkOp(),
        SshOp(),
        SysctlOp(),
        UpdateOp(),
        UserOp(),
        ZshOp(),
    )
}
AFTER: dict[str, tuple[str, ...]] = {name: op.after for name, op in OPS.items()}
check_declarations(AFTER)  # a cycle is a bug in the registry: the daemon must not start with it


def get_op(name: str, field: str = "op") -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise UnknownOp(f"{field}: no op named {name!r}; known: {', '.join(sorted(OPS))}") from None
