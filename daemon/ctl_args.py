"""rastosctl's command line: its commands and options, and the checks of what is typed (numbers in
the range of their D-Bus type, KEY=VALUE parameters, step files), each a one-line error, exit 2."""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from daemon.compliance.report import FORMATS
from daemon.ctl_target import CONNECT_TIMEOUT
from daemon.jobs import FLAG_DRY_RUN, FLAG_NO_SNAPSHOT, FLAG_RESTORE_ON_FAILURE
from ops.declared import DESIRED_STATE
from ops.params import INT_MAX
from rastos.errors import RastosError

EXIT_USAGE = 2
UINT32_MAX = (1 << 32) - 1
MAX_EVENTS = 10000  # GetEventLog's limit
DEFAULT_PARALLEL = 10
MAX_PARALLEL = 256  # each host is an ssh process and its file descriptors


class Parser(argparse.ArgumentParser):
    """Every command and subcommand takes --json, so it may come before or after the command's name
    (the default is the top level's); a usage error is one line and exits 2, without the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not tables")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def number(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer from low to high (what the D-Bus argument holds and the daemon
    accepts), else a sentence that says so; never sdbus's OverflowError."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what or 'a whole number'}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what + ' ' if what else ''}from {low} to {high}, got {value}")
        return value

    return parse


JOB_ID = number(1, UINT32_MAX, "a job id")
SNAPSHOT_ID = number(1, UINT32_MAX, "a snapshot id")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rastosctl", description="control rastosd (org.rastos.Daemon1)")
    parser.set_defaults(json=False)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--bus-address", help="D-Bus address of the daemon's bus (default: the system bus)")
    where.add_argument("-H", "--host", metavar="[USER@]HOST[:PORT]", help="rastosd on that host, over SSH")
    where.add_argument("-M", "--machine", metavar="NAME", help="rastosd in that local container")
    where.add_argument("--inventory", type=Path, metavar="FILE",
                       help="run the command on the hosts of this inventory (TOML), over SSH")  # fmt: skip
    parser.add_argument("--limit", action="append", default=[], dest="limits", metavar="GROUP|HOST",
                        help="only these hosts and groups (repeatable, or comma-separated)")  # fmt: skip
    parser.add_argument("--parallel", type=number(1, MAX_PARALLEL), metavar="N",
                        help=f"at most N hosts at once (default {DEFAULT_PARALLEL})")  # fmt: skip
    parser.add_argument("--fail-fast", action="store_true", help="start no more hosts once one failed")
    parser.add_argument("--no-ask-password", dest="ask_password", action="store_false",
                        help="never ask for a password here: a change polkit wants one for is refused")  # fmt: skip
    parser.add_argument("--connect-timeout", type=number(1, 3600), default=int(CONNECT_TIMEOUT), metavar="SECONDS",
                        help=f"give up on a host silent this long (default {CONNECT_TIMEOUT:g})")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("status", help="version, host name, boot state, jobs and snapshots")
    ops = commands.add_parser("ops", help="the ops the daemon offers, or one op's parameters")
    ops.add_argument("op", nargs="?")
    for name, helptext in (("plan", "what an op would change, changing nothing"), ("apply", "run an op as a job")):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("op")
        command.add_argument("params", nargs="*", help="a JSON object, or KEY=VALUE pairs (VALUE is JSON or text)")
        if name == "apply":
            add_job_flags(command)
    pipeline = commands.add_parser("pipeline", help="run a pipeline of ops")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    pipeline_run = pipeline_commands.add_parser("run", help="run the steps in FILE (.json list or .toml [[step]])")
    pipeline_run.add_argument("file", type=Path)
    add_job_flags(pipeline_run)
    workflow = commands.add_parser("workflow", help="list, show or run the shipped workflows (ops/workflows)")
    workflow_commands = workflow.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    workflow_commands.add_parser("list", help="the workflows, their descriptions and variables")
    for name, helptext in (("show", "the steps a workflow runs, in order"), ("run", "run a workflow as one job")):
        command = workflow_commands.add_parser(name, help=helptext)
        command.add_argument("name")
        command.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                             help="set a variable (VALUE is JSON or text); repeatable")  # fmt: skip
        if name == "run":
            add_job_flags(command)
    apply_config = commands.add_parser(
        "apply-config", help="make the host what /etc/rastos/rastos.toml declares (--dry-run: the whole diff)"
    )
    apply_config.add_argument("--file", type=Path, help=f"default {DESIRED_STATE} (of this host: -H needs --file)")
    add_job_flags(apply_config)
    compliance = commands.add_parser("compliance", help="check the host against the compliance checks; remediate")
    compliance_commands = compliance.add_subparsers(dest="compliance_command", required=True, metavar="ACTION")
    scan = compliance_commands.add_parser("scan", help="run every check, change nothing (exit 4: some fail)")
    scan.add_argument("--format", choices=FORMATS, help="table (default), json (also --json) or html")
    scan.add_argument("--output", type=Path, help="write the report to FILE instead of printing it")
    remediate = compliance_commands.add_parser("remediate", help="fix the failed checks an op can fix, as one job")
    remediate.add_argument("--check", action="append", default=[], metavar="ID", help="only this check; repeatable")
    add_job_flags(remediate)
    confirm = commands.add_parser("confirm", help="confirm a risky change (firewall, network, ssh) before it reverts")
    confirm.add_argument("id", type=JOB_ID, help="the job that made the change")
    commands.add_parser("jobs", help="recent jobs")
    job = commands.add_parser("job", help="show a job; follow its progress until it ends")
    job.add_argument("id", type=JOB_ID)
    snapshot = commands.add_parser("snapshot", help="list, create, delete snapshots; roll back; mark good")
    snapshot_commands = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    snapshot_commands.add_parser("list")
    snapshot_commands.add_parser("create").add_argument("description")
    snapshot_commands.add_parser("delete").add_argument("id", type=SNAPSHOT_ID)
    snapshot_commands.add_parser("rollback", help="boot a writable copy of snapshot ID next").add_argument(
        "id", type=SNAPSHOT_ID
    )
    snapshot_commands.add_parser(
        "boot-once", help="boot snapshot ID read-only (changes kept in memory only) on the next boot only"
    ).add_argument("id", type=SNAPSHOT_ID)
    snapshot_commands.add_parser("mark-good", help="mark this boot good")
    update = commands.add_parser("update", help="stage an image update (a signed bundle); its status; cancel it")
    update_commands = update.add_subparsers(dest="update_command", required=True, metavar="ACTION")
    stage = update_commands.add_parser(
        "stage", help="stage the bundle at SOURCE (a path or an http(s) URL): it boots next, on trial"
    )
    stage.add_argument("source", help="a bundle file (made absolute here) or an http(s) URL")
    stage.add_argument("--reboot", action="store_true", help="reboot into it once it is staged")
    stage.add_argument("--no-wait", action="store_true", help="print the update's id and return at once")
    update_commands.add_parser("status", help="what is staging or was staged last, the running version")
    update_commands.add_parser("cancel", help="stop the staging in progress; nothing half-made is left")
    hub = commands.add_parser("hub", help="connect this host to a hub (the token on stdin); the link's status")
    hub_commands = hub.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    join = hub_commands.add_parser(
        "join", help="connect to the hub at --url with the token read from standard input (never an argument)"
    )
    join.add_argument("--url", required=True, action="append", help="the hub as this host reaches it: "
                      "ws(s)://HUB[:PORT]/api/v1/agent, or its http(s):// base; again for each hub of several "
                      "on one database, tried in that order")  # fmt: skip
    join.add_argument("--ca", type=Path, metavar="FILE", help="PEM certificate(s) a wss:// hub is verified with "
                      "(read here, installed there as hub-ca.pem beside daemon.toml)")  # fmt: skip
    for command in (join, hub_commands.add_parser("status", help="whether the link is connected, and if not, why")):
        command.add_argument("--wait", type=number(0, 3600), default=0, metavar="SECONDS",
                             help="wait up to SECONDS for the link to be connected (exit 5 if it is not)")  # fmt: skip
    log = commands.add_parser("log", help="the event log: every change, who asked for it, and the job")
    log.add_argument("--since", type=number(0, INT_MAX), default=0, help="only events after this id")
    log.add_argument("--limit", type=number(1, MAX_EVENTS), default=100, help="at most this many")
    return parser


def add_job_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dry-run", action="store_true", help="plan every step, change nothing")
    command.add_argument("--no-snapshot", action="store_true", help="take no pre/post snapshots")
    command.add_argument("--restore-on-failure", action="store_true", help="put changed files back if a step fails")
    command.add_argument("--no-wait", action="store_true", help="print the job and return at once")


def job_flags(args: argparse.Namespace) -> int:
    return (
        (FLAG_DRY_RUN if args.dry_run else 0)
        | (FLAG_NO_SNAPSHOT if args.no_snapshot else 0)
        | (FLAG_RESTORE_ON_FAILURE if args.restore_on_failure else 0)
    )


def key_values(arguments: Sequence[str], what: str, form: str = "KEY=VALUE") -> dict[str, Any]:
    """KEY=VALUE arguments as a dict: a VALUE that is JSON (a number, true, a list) is taken as such,
    any other as a string. `what` and `form` name the argument in an error."""
    values: dict[str, Any] = {}
    for argument in arguments:
        key, separator, value = argument.partition("=")
        if not separator or not key:
            raise RastosError(f"{what} {argument!r}: write {form}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def params_from(arguments: Sequence[str]) -> str:
    if len(arguments) == 1 and arguments[0].lstrip().startswith("{"):
        return arguments[0]
    return json.dumps(key_values(arguments, "parameter", "KEY=VALUE or one JSON object"))


def steps_from_file(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as error:
        raise RastosError(f"{path}: {error.strerror}") from None
    if path.suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise RastosError(f"{path}: {error}") from None
        return json.dumps(document.get("step", []))
    return text
