"""The registry: every op the daemon offers, by name. Adding an op is adding it to OPS."""

from __future__ import annotations

from ops.base import Op
from ops.certs import CertsOp
from ops.errors import UnknownOp
from ops.firewall import FirewallOp
from ops.hostname import HostnameOp
from ops.monitoring import MonitoringOp
from ops.motd import MotdOp
from ops.network import NetworkOp
from ops.order import check_declarations
from ops.ssh import SshOp
from ops.sysctl import SysctlOp
from ops.update import UpdateOp
from ops.user import UserOp
from ops.zsh import ZshOp

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
