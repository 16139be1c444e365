"""`monitoring`: Prometheus' node exporter from the distribution, enabled and answering on its port.

Debian's prometheus-node-exporter.service runs `/usr/bin/prometheus-node-exporter $ARGS` with ARGS from
/etc/default/prometheus-node-exporter, so that file is all the op writes: the listen address, the
textfile directory (where other jobs drop `*.prom` files whose metrics the exporter serves with its own)
and a `--no-collector.NAME` for each collector turned off. The file is a conffile of the package: an
upgrade keeps it (the update op answers dpkg's question with "keep yours"). A collector name is checked
against the exporter's own --help: an unknown one would stop it from starting at all.

A missing package is installed through the update op's backend, the lists refreshed first: an install
against stale lists asks the mirror for versions it may have dropped. The unit is enabled with
`systemctl --root`, and restarted when anything changed; on the running system, also when it does not
answer. Verify fetches /metrics and looks for `node_exporter_build_info`, retrying while it starts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ops.actions import Action, Change, FollowUp, MakeDirectory, Output, RunCommand
from ops.base import Op, Plan, file_action, joined
from ops.errors import InvalidParams
from ops.params import Kind, Param, Params
from ops.target import Target, in_target
from ops.update import backend_for
from rastos.process import run

PACKAGE = "prometheus-node-exporter"
UNIT = "prometheus-node-exporter.service"
BINARY = "/usr/bin/prometheus-node-exporter"
DEFAULTS = "/etc/default/prometheus-node-exporter"
ENABLED_LINK = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"  # the unit's WantedBy
LISTEN = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):[0-9]{1,5}"
COLLECTOR = r"[a-z][a-z0-9_]{0,63}"
DIRECTORY = r"/(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._/-]{0,255}"  # absolute, no . or .. parts
ANSWER = "node_exporter_build_info"
VERIFY_TIMEOUT = 10.0


def check_listen(address: str) -> str | None:
    port = int(address.rpartition(":")[2])
    return None if 1 <= port <= 65535 else f"port {port} is not between 1 and 65535"


class MonitoringOp(Op):
    name = "monitoring"
    description = "Prometheus node exporter (the distribution's package): installed, configured, enabled, answering"
    # Not after firewall: the exporter listens whether or not the port is open, and the firewall opens a
    # port whether or not anything listens; neither needs the other first. After network: a listen
    # address that op assigns must exist before the restart binds it. After update: the lists refreshed
    # (and the host upgraded) before a package is installed from them.
    after = ("network", "update")
    schema = (
        Param("listen_address", Kind.STRING, "host:port the exporter listens on (\":9100\": every address)",
              default=":9100", pattern=LISTEN, pattern_help="host:port, e.g. :9100, 10.0.0.5:9100 or [::1]:9100",
              check=check_listen),
        Param("collectors_disabled", Kind.STRING_LIST, "collectors turned off, e.g. [\"wifi\", \"nfs\"]", default=[],
              pattern=COLLECTOR, pattern_help="a collector name: lower case letters, digits and _"),
        Param("textfile_directory", Kind.STRING, "directory of *.prom files whose metrics are served too",
              default="/var/lib/prometheus/node-exporter", pattern=DIRECTORY,
              pattern_help="an absolute path without . or .. parts"),
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        if not target.has_program(BINARY):
            return  # installed by the plan; its collectors are known once it is there
        known = collectors(target)
        for index, name in enumerate(params["collectors_disabled"]):
            if name not in known:
                problem = f"this node exporter has no collector {name!r}; known: {joined(sorted(known))}"
                raise InvalidParams(f"params.collectors_disabled[{index}]", problem)

    def plan(self, target: Target, params: Params) -> Plan:
        actions: list[Action] = []
        if not target.has_program(BINARY):
            actions.append(InstallPackages((PACKAGE,)))
        actions += file_action(target, DEFAULTS, render(params))
        if not target.is_dir(params["textfile_directory"]):
            actions.append(MakeDirectory(params["textfile_directory"]))
        if target.files.kind(ENABLED_LINK) != "link":  # systemctl's own link: looked at, not followed
            actions.append(
                RunCommand(
                    f"unit {UNIT}", ("systemctl", "--root={root}", "enable", UNIT), (ENABLED_LINK,), makes_links=True
                )
            )
        if actions or (target.live and not answers(params["listen_address"], wait=0)):
            actions.append(FollowUp("restart", UNIT))
        return Plan(self.name, tuple(actions))

    def verify(self, target: Target, params: Params) -> list[str]:
        problems = [f"{c.subject}: still needs {c.action}" for c in self.plan(target, params).changes
                    if c.subject != f"unit {UNIT}" or c.action != "restart"]  # fmt: skip
        if target.acts_at_runtime and not answers(params["listen_address"], wait=VERIFY_TIMEOUT):
            problems.append(f"the exporter does not answer at {metrics_url(params['listen_address'])} with {ANSWER}")
        return problems


@dataclass(frozen=True)
class InstallPackages(Action):
    """Packages installed through the distribution's backend (update.py), its lists refreshed first."""

    names: tuple[str, ...]

    def describe(self) -> Change:
        names = " ".join(self.names)
        return Change(f"package {names}", "install", f"refresh the lists, install {names}")

    def execute(self, target: Target, output: Output) -> None:
        backend = backend_for(target)
        if target.simulated:  # a dry run's shadow lives in memory: apt's simulation stands in
            for change in backend.installable(self.names):
                output(f"dry run: would {change.verb} {change.name} {change.shown}")
            return
        backend.refresh()
        backend.install(self.names)
        installed = backend.installed()
        output(f"installed {', '.join(f'{name} {installed.get(name)}' for name in self.names)}")


def render(params: Params) -> str:
    args = [f"--web.listen-address={params['listen_address']}",
            f"--collector.textfile.directory={params['textfile_directory']}"]  # fmt: skip
    args += [f"--no-collector.{name}" for name in params["collectors_disabled"]]
    return (
        "# Written by rastosd (op monitoring); changes made here are replaced at the next apply.\n"
        "# prometheus-node-exporter.service passes ARGS to /usr/bin/prometheus-node-exporter.\n"
        f'ARGS="{" ".join(args)}"\n'
    )


def collectors(target: Target) -> set[str]:
    """The collectors this exporter has, from its --help (`--[no-]collector.NAME`)."""
    result = run(in_target(target, [BINARY, "--help"]), capture=True, check=False)
    return set(re.findall(r"--(?:\[no-\])?collector\.([a-z0-9_]+)(?=\s)", result.stdout + result.stderr))


def metrics_url(listen_address: str) -> str:
    host, _, port = listen_address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"http://{host}:{port}/metrics"


def answers(listen_address: str, wait: float) -> bool:
    """Whether /metrics answers with the exporter's build info, trying for up to `wait` seconds."""
    import http.client  # here, not at the top: urllib and http would cost every start of the daemon
    import urllib.request

    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(metrics_url(listen_address), timeout=2) as response:
                if ANSWER in response.read().decode(errors="replace"):
                    return True
        except (OSError, http.client.HTTPException):  # refused, reset, not HTTP: not (yet) answering
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
