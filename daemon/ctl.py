"""rastosctl: the command-line client of org.rastos.Daemon1.

Readable tables by default, `--json` on every command (before or after its name). A D-Bus error prints
its name and text and exits 1; a bad argument (a number out of range, an unknown command) is one line
and exits 2; a job that ends other than `done` exits 3; a compliance scan with a failed check exits 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sdbus import (
    DbusAccessDeniedError,
    DbusFailedError,
    DbusNameHasNoOwnerError,
    DbusServiceUnknownError,
    SdBus,
    SdBusBaseError,
    SdBusLibraryError,
    sd_bus_open_system,
)

import daemon.bus.errors  # noqa: F401  (registers our error names, so errors arrive by name)
from daemon.bus.interfaces import BUS_NAME, ROOT_PATH, JobInterface, ManagerInterface, SnapshotsInterface, job_path
from daemon.compliance.model import Report, Status
from daemon.compliance.remediate import pipeline as remediation_pipeline
from daemon.compliance.remediate import select
from daemon.compliance.report import FORMATS, render
from daemon.config import DaemonConfig, load_config
from daemon.jobs import FINAL_STATES, FLAG_DRY_RUN, FLAG_NO_SNAPSHOT, FLAG_RESTORE_ON_FAILURE
from ops.declared import DESIRED_STATE, REQUIRED, desired_state_steps, list_workflows, load_workflow
from ops.params import INT_MAX
from rastos.errors import RastosError

EXIT_BUS_ERROR = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_NONCOMPLIANT = 4
UINT32_MAX = (1 << 32) - 1
MAX_EVENTS = 10000  # GetEventLog's limit
UNREACHABLE = "rastosd is not reachable on {bus}: is rastosd.service running?"


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
    parser.add_argument("--bus-address", help="D-Bus address of the daemon's bus (default: the system bus)")
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
    apply_config.add_argument("--file", type=Path, default=DESIRED_STATE, help=f"default {DESIRED_STATE}")
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


class Client:
    def __init__(self, bus: SdBus, as_json: bool) -> None:
        self.bus = bus
        self.as_json = as_json
        self.manager = ManagerInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
        self.snapshots = SnapshotsInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)

    def emit(self, document: Any, text: str) -> None:
        print(json.dumps(document, indent=2) if self.as_json else text)

    async def status(self) -> int:
        boot = await self.manager.boot_state
        jobs = await self.manager.list_jobs()
        try:
            snapshots: list[Any] = await self.snapshots.list_snapshots()
        except DbusFailedError:
            snapshots = []
        active = [job[0] for job in jobs if job[2] not in FINAL_STATES]
        document = {
            "version": await self.manager.version, "hostname": await self.manager.hostname, "boot": boot,
            "active_jobs": active, "snapshots": len(snapshots),
        }  # fmt: skip
        lines = [
            f"version:     {document['version']}",
            f"host name:   {document['hostname']}",
            f"root:        {boot.get('root') or '-'} ({boot.get('kind')}, {boot.get('health')})",
            f"boot entry:  {boot.get('entry') or '-'}",
            f"active jobs: {', '.join(map(str, active)) or 'none'}",
            f"snapshots:   {len(snapshots)}",
        ]
        self.emit(document, "\n".join(lines))
        return 0

    async def ops(self, name: str | None) -> int:
        ops = await self.manager.list_ops()
        if name is None:
            document = [{"name": n, "description": d, "schema": json.loads(s)} for n, d, s in ops]
            self.emit(document, table(["OP", "DESCRIPTION"], [[n, d] for n, d, _ in ops]))
            return 0
        for op_name, description, schema_json in ops:
            if op_name == name:
                schema = json.loads(schema_json)
                rows = [
                    [key, spec.get("type", ""), "yes" if key in schema["required"] else "", spec.get("description", "")]
                    for key, spec in schema["properties"].items()
                ]
                self.emit(schema, f"{name}: {description}\n\n" + table(["PARAM", "TYPE", "REQUIRED", "MEANING"], rows))
                return 0
        raise RastosError(f"no op named {name!r}")

    async def plan(self, op: str, params: list[str]) -> int:
        plan = json.loads(await self.manager.plan(op, params_from(params)))
        self.emit(plan, format_changes(plan["changes"]) if plan["changes"] else f"{op}: nothing to change")
        return 0

    async def apply(self, op: str, params: list[str], args: argparse.Namespace) -> int:
        path = await self.manager.apply(op, params_from(params), job_flags(args))
        return await self.after_submit(path, args.no_wait)

    async def pipeline(self, file: Path, args: argparse.Namespace) -> int:
        path = await self.manager.run_pipeline(steps_from_file(file), job_flags(args))
        return await self.after_submit(path, args.no_wait)

    async def workflow(self, args: argparse.Namespace) -> int:
        if args.workflow_command == "list":
            workflows = list_workflows()
            document = [
                {"name": w.name, "description": w.description, "variables": {
                    v.name: {"description": v.description, "default": None if v.default is REQUIRED else v.default}
                    for v in w.variables.values()}}
                for w in workflows
            ]  # fmt: skip
            rows = [[w.name, ", ".join(w.variables) or "-", w.description] for w in workflows]
            self.emit(document, table(["NAME", "VARIABLES", "DESCRIPTION"], rows))
            return 0
        steps = load_workflow(args.name).steps_for(key_values(args.set, "--set", "VAR=VALUE"))
        if args.workflow_command == "show":
            text = "\n".join(f"{i}. {s['op']} {json.dumps(s['params'])}" for i, s in enumerate(steps, 1))
            self.emit(steps, text)
            return 0
        path = await self.manager.run_pipeline(json.dumps(steps), job_flags(args))
        return await self.after_submit(path, args.no_wait, diff=args.dry_run)

    async def apply_config(self, args: argparse.Namespace) -> int:
        steps = desired_state_steps(args.file)
        if not steps:
            self.emit({"steps": []}, f"{args.file} declares nothing")
            return 0
        path = await self.manager.run_pipeline(json.dumps(steps), job_flags(args))
        return await self.after_submit(path, args.no_wait, diff=args.dry_run)

    async def compliance(self, args: argparse.Namespace) -> int:
        report = Report.from_json(json.loads(await self.manager.compliance_scan()))
        if args.compliance_command == "scan":
            text = render(report, args.format or ("json" if self.as_json else "table"))
            if args.output is None:
                print(text)
            else:
                try:
                    args.output.write_text(text + "\n")
                except OSError as error:
                    raise RastosError(f"{args.output}: {error.strerror}") from None
            return EXIT_NONCOMPLIANT if report.failed else 0
        try:
            chosen = select(report.results, args.check)
        except ValueError as error:
            raise RastosError(str(error)) from None
        for result in chosen:
            if result.status is Status.FAIL and result.remediation is None:
                print(f"rastosctl: by hand: {result.id}: {result.manual or result.finding}", file=sys.stderr)
        steps = remediation_pipeline(chosen, report.context)
        if not steps:
            self.emit({"steps": []}, "nothing an op can remediate among the checks that fail")
            return 0
        path = await self.manager.run_pipeline(json.dumps(steps), job_flags(args))
        return await self.after_submit(path, args.no_wait, diff=args.dry_run)

    async def after_submit(self, path: str, no_wait: bool, diff: bool = False) -> int:
        job_id = int(path.rsplit("/", 1)[1])
        if no_wait:
            self.emit({"id": job_id, "path": path}, f"job {job_id} queued ({path})")
            return 0
        return await self.job(job_id, diff)

    async def confirm(self, job_id: int) -> int:
        await self.manager.confirm(job_id)
        self.emit({"confirmed": job_id}, f"job {job_id}'s change is confirmed: it stays")
        return 0

    async def jobs(self) -> int:
        jobs = await self.manager.list_jobs()
        document = [{"id": i, "kind": k, "state": s, "created": c, "path": p} for i, k, s, c, p in jobs]
        rows = [[str(i), k, s, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c))] for i, k, s, c, _ in jobs]
        self.emit(document, table(["ID", "KIND", "STATE", "CREATED"], rows))
        return 0

    async def job(self, job_id: int, diff: bool = False) -> int:
        paths = {row[0]: row[4] for row in await self.manager.list_jobs()}
        if paths.get(job_id, "/") != "/":
            await self.follow(JobInterface.new_proxy(BUS_NAME, job_path(job_id), self.bus))
        document = json.loads(await self.manager.get_job(job_id))
        self.emit(document, format_job(document) + (format_diff(document) if diff else ""))
        return 0 if document["state"] == "done" else EXIT_JOB_FAILED

    async def follow(self, job: JobInterface) -> None:
        """Print the job's output and progress as they come, until it reaches a final state."""
        finished = asyncio.Event()

        async def output() -> None:
            async for line in job.output:
                if not self.as_json:
                    print(f"  | {line}", flush=True)

        async def completed() -> None:
            async for _ in job.completed:
                finished.set()

        tasks = [asyncio.create_task(output()), asyncio.create_task(completed())]
        last_progress: tuple[int, str] | None = None
        try:
            while True:
                # Signals carry the news; the property read covers a job that ended before we listened.
                state = await job.state
                if state in FINAL_STATES:
                    break
                progress = await job.progress
                if progress != last_progress and not self.as_json:
                    print(f"[{progress[0]:3d}%] {progress[1]}", file=sys.stderr, flush=True)
                    last_progress = progress
                try:
                    await asyncio.wait_for(finished.wait(), 0.25)
                except TimeoutError:
                    continue
        finally:
            for task in tasks:
                task.cancel()

    async def snapshot(self, args: argparse.Namespace) -> int:
        action = args.snapshot_command
        if action == "list":
            rows = await self.snapshots.list_snapshots()
            document = [
                {"id": i, "time": t, "description": d, "kind": k, "job": j or None, "pre": p or None, "known_good": g}
                for i, t, d, k, j, p, g in rows
            ]
            shown = [
                [str(i), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)), k, str(j or ""), "yes" if g else "", d]
                for i, t, d, k, j, _, g in rows
            ]
            self.emit(document, table(["ID", "TIME", "KIND", "JOB", "GOOD", "DESCRIPTION"], shown))
        elif action == "create":
            snapshot_id = await self.snapshots.create_snapshot(args.description)
            self.emit({"id": snapshot_id}, f"created snapshot {snapshot_id}")
        elif action == "delete":
            await self.snapshots.delete_snapshot(args.id)
            self.emit({"deleted": args.id}, f"deleted snapshot {args.id}")
        elif action == "rollback":
            entry = await self.snapshots.rollback(args.id)
            self.emit({"snapshot": args.id, "entry": entry}, f"the next boot starts snapshot {args.id} ({entry})")
        elif action == "boot-once":
            entry = await self.snapshots.boot_once(args.id)
            self.emit(
                {"snapshot": args.id, "entry": entry},
                f"the next boot only starts snapshot {args.id} read-only ({entry}); the one after is as before",
            )
        else:
            await self.snapshots.mark_good()
            self.emit({"marked_good": True}, "this boot is marked good")
        return 0

    async def log(self, since: int, limit: int) -> int:
        events = await self.manager.get_event_log(since, limit)
        document = [
            {"id": i, "time": t, "uid": u, "method": m, "job": j or None, "detail": json.loads(d)}
            for i, t, u, m, j, d in events
        ]
        rows = [
            [str(i), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)), str(u), m, str(j or ""), d]
            for i, t, u, m, j, d in events
        ]
        self.emit(document, table(["ID", "TIME", "UID", "METHOD", "JOB", "DETAIL"], rows))
        return 0


def table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def format_changes(changes: list[dict[str, str]]) -> str:
    lines = []
    for change in changes:
        lines.append(f"{change['action']:>7} {change['subject']}")
        lines += [f"          {line}" for line in change.get("detail", "").splitlines() if change["action"] != "run"]
        if change["action"] == "run":
            lines.append(f"          $ {change['detail']}")
    return "\n".join(lines)


def format_diff(document: dict[str, Any]) -> str:
    """Every planned change with its detail (the unified diffs): what a dry run would do, in full."""
    sections = []
    for position, step in enumerate(document["steps"], 1):
        changes = (step.get("result") or {}).get("changes", [])
        if changes:
            sections.append(f"--- step {position}: {step['op']}\n{format_changes(changes)}")
    return "\n\n" + "\n\n".join(sections) if sections else "\n\nno changes"


def format_job(document: dict[str, Any]) -> str:
    lines = [f"job {document['id']} ({document['kind']}): {document['state']}"]
    for position, step in enumerate(document["steps"], 1):
        lines.append(f"  step {position}: {step['op']} {step['state']}")
        result = step.get("result") or {}
        if step["state"] == "planned":
            lines += [f"    would {c['action']} {c['subject']}" for c in result.get("changes", [])] or [
                "    nothing to change"
            ]
        if result.get("error"):
            lines.append(f"    error: {result['error']}")
    result = document.get("result") or {}
    if result.get("snapshots"):
        lines.append(f"  snapshots: pre {result['snapshots']['pre']}, post {result['snapshots']['post']}")
    if result.get("restored"):
        lines.append(f"  restored: {', '.join(result['restored'])}")
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    confirmation = document.get("confirmation")
    if confirmation and confirmation["state"] == "pending":
        deadline = time.strftime("%H:%M:%S", time.localtime(confirmation["deadline"]))
        lines.append(f"  PENDING: reverted at {deadline} unless confirmed: rastosctl confirm {document['id']}")
    elif confirmation:
        lines.append(f"  confirmation: {confirmation['state']} {confirmation.get('detail') or ''}".rstrip())
    return "\n".join(lines)


async def dispatch(args: argparse.Namespace) -> int:
    if args.bus_address:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = args.bus_address
    client = Client(sd_bus_open_system(), args.json)
    command = args.command
    if command == "status":
        return await client.status()
    if command == "ops":
        return await client.ops(args.op)
    if command == "plan":
        return await client.plan(args.op, args.params)
    if command == "apply":
        return await client.apply(args.op, args.params, args)
    if command == "pipeline":
        return await client.pipeline(args.file, args)
    if command == "workflow":
        return await client.workflow(args)
    if command == "apply-config":
        return await client.apply_config(args)
    if command == "compliance":
        return await client.compliance(args)
    if command == "confirm":
        return await client.confirm(args.id)
    if command == "jobs":
        return await client.jobs()
    if command == "job":
        return await client.job(args.id)
    if command == "snapshot":
        return await client.snapshot(args)
    return await client.log(args.since, args.limit)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(dispatch(args))
    except (DbusServiceUnknownError, DbusNameHasNoOwnerError):
        print(f"rastosctl: {unreachable(args)} (no one owns {BUS_NAME} on that bus)", file=sys.stderr)
        return EXIT_BUS_ERROR
    except DbusAccessDeniedError as error:
        print(f"rastosctl: {error.dbus_error_name}: {access_denied(error.args[0] if error.args else '')}",
              file=sys.stderr)  # fmt: skip
        return EXIT_BUS_ERROR
    except DbusFailedError as error:
        print(f"rastosctl: {error.dbus_error_name}: {error.args[0] if error.args else ''}", file=sys.stderr)
        return EXIT_BUS_ERROR
    except SdBusLibraryError as error:  # sd-bus could not connect: its text names a C file and an errno
        found = re.search(r"error number: (\d+)", str(error))
        reason = os.strerror(int(found[1])) if found else str(error)
        print(f"rastosctl: {unreachable(args)} (cannot connect to the bus: {reason})", file=sys.stderr)
        return EXIT_BUS_ERROR
    except SdBusBaseError as error:
        print(f"rastosctl: {error}", file=sys.stderr)
        return EXIT_BUS_ERROR
    except RastosError as error:
        print(f"rastosctl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


def unreachable(args: argparse.Namespace) -> str:
    return UNREACHABLE.format(bus=f"the bus at {args.bus_address}" if args.bus_address else "the system bus")


def access_denied(message: str) -> str:
    """The daemon's own refusal says what needs root; the bus policy's names a rule and a member
    ("Rejected send message, 1 matched rules; type=..."), so say it in the daemon's words."""
    if not message.startswith("Rejected send message"):
        return message
    found = re.search(r'member="([^"]+)"', message)
    method = found[1] if found else "this call"
    group = admin_group()
    if method == "ComplianceScan":
        return f"ComplianceScan reads /etc/shadow and users' keys: only root or members of group {group!r} may call it"
    return f"{method} changes the host: only root or members of group {group!r} may call it (the bus refused it)"


def admin_group() -> str:
    try:
        return load_config(None).admin_group
    except RastosError:  # unreadable or invalid: the daemon would not start on it either
        return DaemonConfig.admin_group
