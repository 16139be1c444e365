"""rastosctl: the command-line client of org.rastos.Daemon1.

Readable tables by default, `--json` on every command (before or after its name). A D-Bus error prints
its name and text and exits 1; a bad argument (a number out of range, an unknown command) is one line
and exits 2; a job that ends other than `done`, or an update staging that ends other than `staged`, exits 3;
a compliance scan with a failed check exits 4. rastosd that cannot be reached exits 1, with why.

The same commands reach another host's rastosd over SSH (`-H`), a local container's (`-M`), or every
host of an inventory at once (`--inventory`, daemon/ctl_fleet.py); daemon/ctl_target.py connects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdbus import (
    DbusAccessDeniedError,
    DbusFailedError,
    DbusNameHasNoOwnerError,
    DbusNoReplyError,
    DbusServiceUnknownError,
    SdBus,
    SdBusBaseError,
    SdBusLibraryError,
)

import daemon.bus.errors  # noqa: F401  (registers our error names, so errors arrive by name)
from daemon.bus.interfaces import (
    BUS_NAME,
    ROOT_PATH,
    HubInterface,
    JobInterface,
    ManagerInterface,
    SnapshotsInterface,
    UpdatesInterface,
    job_path,
)
from daemon.compliance.model import Report, Status
from daemon.compliance.remediate import pipeline as remediation_pipeline
from daemon.compliance.remediate import select
from daemon.compliance.report import render
from daemon.config import DaemonConfig, load_config
from daemon.ctl_args import (
    DEFAULT_PARALLEL,
    EXIT_USAGE,
    build_parser,
    job_flags,
    key_values,
    params_from,
    steps_from_file,
)
from daemon.ctl_fleet import HostResult, Outcome, Recorder, exit_status, run_fleet, summary
from daemon.ctl_output import (
    Output,
    PrintOutput,
    format_changes,
    format_diff,
    format_hub_status,
    format_job,
    format_joined,
    format_progress,
    format_update_result,
    format_update_status,
    table,
)
from daemon.ctl_polkit import allow_interactive_authorization, password_agent, wants_password_prompt
from daemon.ctl_target import Target, Unreachable, Via, connect, parse_destination, parse_machine
from daemon.inventory import InventoryHost, load_inventory
from daemon.jobs import FINAL_STATES
from ops.declared import DESIRED_STATE, REQUIRED, desired_state_steps, list_workflows, load_workflow
from rastos.errors import RastosError
from rastos.hub_settings import HubUrlProblem, agent_urls, check_ca, check_token

EXIT_BUS_ERROR = 1
EXIT_JOB_FAILED = 3
EXIT_NONCOMPLIANT = 4
EXIT_NOT_CONNECTED = 5  # hub join/status --wait: the link did not connect in time
EXIT_INTERRUPTED = 130  # as a shell reports a command that SIGINT ended
UNREACHABLE = "rastosd is not reachable on {bus}: is rastosd.service running?"


class Client:
    """The commands, on one bus; what they print goes to `out`. `variables`: values for a workflow's
    variables that come before --set's (an inventory's, for its host)."""

    def __init__(
        self, bus: SdBus, out: Output, variables: Mapping[str, Any] | None = None, remote: bool = False
    ) -> None:
        self.bus = bus
        self.remote = remote
        self.out = out
        self.variables = dict(variables or {})
        self.manager = ManagerInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
        self.snapshots = SnapshotsInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
        self.updates = UpdatesInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)
        self.hub_link = HubInterface.new_proxy(BUS_NAME, ROOT_PATH, bus)

    def emit(self, document: Any, text: str) -> None:
        self.out.emit(document, text)

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
            f"image:       {boot.get('image_version') or '-'}",
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
        self.out.changed = bool(plan["changes"])
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
        workflow = load_workflow(args.name)
        # An inventory's variables go to the workflows that declare them; --set's must all be known.
        inherited = {name: value for name, value in self.variables.items() if name in workflow.variables}
        steps = workflow.steps_for({**inherited, **key_values(args.set, "--set", "VAR=VALUE")})
        if args.workflow_command == "show":
            text = "\n".join(f"{i}. {s['op']} {json.dumps(s['params'])}" for i, s in enumerate(steps, 1))
            self.emit(steps, text)
            return 0
        path = await self.manager.run_pipeline(json.dumps(steps), job_flags(args))
        return await self.after_submit(path, args.no_wait, diff=args.dry_run)

    async def apply_config(self, args: argparse.Namespace) -> int:
        # rastosctl reads the file, not rastosd: over SSH the default would be this host's desired state,
        # applied to another.
        if args.file is None and self.remote:
            raise RastosError(f"apply-config reads {DESIRED_STATE} here, not on that host", hint="name it: --file FILE")
        file = args.file or DESIRED_STATE
        steps = desired_state_steps(file)
        if not steps:
            self.emit({"steps": []}, f"{file} declares nothing")
            return 0
        path = await self.manager.run_pipeline(json.dumps(steps), job_flags(args))
        return await self.after_submit(path, args.no_wait, diff=args.dry_run)

    async def compliance(self, args: argparse.Namespace) -> int:
        report = Report.from_json(json.loads(await self.manager.compliance_scan()))
        if args.compliance_command == "scan":
            text = render(report, args.format or ("json" if self.out.as_json else "table"))
            if args.output is None:
                self.out.emit(json.loads(render(report, "json")), text, verbatim=True)
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
                self.out.note(f"by hand: {result.id}: {result.manual or result.finding}")
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
        self.out.changed = True
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
        self.out.changed = self.out.changed or job_changed(document)
        self.emit(document, format_job(document) + (format_diff(document) if diff else ""))
        return 0 if document["state"] == "done" else EXIT_JOB_FAILED

    async def follow(self, job: JobInterface) -> None:
        """Print the job's output and progress as they come, until it reaches a final state."""
        finished = asyncio.Event()

        async def output() -> None:
            async for line in job.output:
                self.out.line(line)

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
                if progress != last_progress:
                    self.out.progress(f"[{progress[0]:3d}%] {progress[1]}")
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
        self.out.changed = action != "list"
        return 0

    async def update(self, args: argparse.Namespace) -> int:
        if args.update_command == "status":
            status = json.loads(await self.updates.get_update_status())
            self.emit(status, format_update_status(status))
            return 0
        if args.update_command == "cancel":
            await self.updates.cancel_update()
            self.emit({"cancel": True}, "the staging stops; nothing half-made is left")
            return 0
        # A path is made absolute here, as the daemon (with a working directory of its own) takes absolute
        # ones only; lexically: resolve() would follow a link the daemon must see, and refuse.
        source = args.source if "://" in args.source else os.path.abspath(args.source)  # noqa: PTH100
        if args.no_wait:
            update_id = await self.updates.stage_update(source, args.reboot)
            self.emit({"id": update_id}, f"update {update_id} is staging (rastosctl update status)")
            return 0
        result = await self.follow_update(source, args.reboot)
        self.out.changed = result.get("state") == "staged"
        self.emit(result, format_update_result(result))
        return 0 if result.get("state") == "staged" else EXIT_JOB_FAILED

    async def follow_update(self, source: str, reboot: bool) -> dict[str, Any]:
        """Stage, print the progress as it comes, and return the staging's result once it ended."""
        results: dict[int, dict[str, Any]] = {}
        heard = asyncio.Event()

        async def completed() -> None:
            async for update_id, _, result_json in self.updates.update_completed:
                results[update_id] = json.loads(result_json)
                heard.set()

        listener = asyncio.create_task(completed())
        try:
            await asyncio.sleep(0.1)  # the signal's match rule reaches the bus before the staging can end
            update_id = await self.updates.stage_update(source, reboot)
            shown = None
            while update_id not in results:
                # The signal carries the news; the status read covers one that came before we listened.
                status = json.loads(await self.updates.get_update_status())
                if status["id"] == update_id and status["result"] is not None:
                    return dict(status["result"])
                progress = format_progress(*await self.updates.update_progress)
                if progress != shown:
                    self.out.progress(progress)
                    shown = progress
                heard.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(heard.wait(), 0.5)
            return results[update_id]
        finally:
            listener.cancel()

    async def hub(self, args: argparse.Namespace) -> int:
        if args.hub_command == "join":
            joined = json.loads(await self.hub_link.join_hub(args.agent_url, args.token, args.ca_pem))
            self.out.changed = True
            self.out.progress(format_joined(joined))
            status = await self.hub_status(args.wait)
            self.emit({"joined": joined, "status": status}, format_hub_status(status))
        else:
            status = await self.hub_status(args.wait)
            self.emit(status, format_hub_status(status))
        if args.wait and status["state"] != "connected":
            self.out.note(f"the link did not connect within {args.wait} s: {status['state']}: {status['error']}")
            return EXIT_NOT_CONNECTED
        return 0

    async def hub_status(self, wait: int) -> dict[str, Any]:
        """The link's status: once, or as soon as it is connected within `wait` seconds (the last one read)."""
        status: dict[str, Any] = json.loads(await self.hub_link.get_hub_status())
        if wait and status["state"] != "connected":
            self.out.progress(f"waiting up to {wait} s for the link to connect to {status['url']}")
            deadline = time.monotonic() + wait
            while status["state"] != "connected" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                status = json.loads(await self.hub_link.get_hub_status())
        return status

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


async def dispatch(client: Client, args: argparse.Namespace) -> int:
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
    if command == "update":
        return await client.update(args)
    if command == "hub":
        return await client.hub(args)
    return await client.log(args.since, args.limit)


async def run_on(
    target: Target, args: argparse.Namespace, out: Output, variables: Mapping[str, Any] | None = None
) -> int:
    """One command on one target: the same path for the local bus, -H, -M and each inventory host."""
    connection = connect(target)
    try:
        if target.via is not Via.LOCAL:
            await connection.reach(args.connect_timeout)
        prompt = wants_password_prompt(args.command, target.via is Via.LOCAL, args.ask_password)
        prompt = prompt and allow_interactive_authorization(connection.bus)
        try:
            with password_agent() if prompt else contextlib.nullcontext():
                return await dispatch(Client(connection.bus, out, variables, target.via is not Via.LOCAL), args)
        except (DbusNoReplyError, SdBusLibraryError) as error:
            raise (connection.lost(error) or error) from None
    finally:
        connection.close()


async def run_host(args: argparse.Namespace, host: InventoryHost, recorder: Recorder) -> HostResult:
    try:
        status = await run_on(host.target, args, recorder, host.variables)
    except Unreachable as error:
        return HostResult(host, Outcome.UNREACHABLE, EXIT_BUS_ERROR, error=str(error), reason=str(error.reason))
    except (SdBusBaseError, RastosError) as error:
        status, message = failure(error, host.target)
        return HostResult(host, Outcome.FAILED, status, document=recorder.document, text=recorder.text, error=message)
    outcome = Outcome.FAILED if status else Outcome.CHANGED if recorder.changed else Outcome.UNCHANGED
    return HostResult(host, outcome, status, document=recorder.document, text=recorder.text)


def run_inventory(args: argparse.Namespace) -> int:
    hosts = load_inventory(args.inventory).select(args.limits)
    if not hosts:
        raise RastosError(f"{args.inventory}: no hosts to run on", hint="declare them in [[host]] tables")
    # Many ssh at once on one terminal must not ask anything there (an unknown host key, a key's
    # passphrase): each question goes to an askpass that answers no, and that host fails, named.
    os.environ["SSH_ASKPASS"], os.environ["SSH_ASKPASS_REQUIRE"] = "false", "force"
    runner = functools.partial(run_host, args)
    results = asyncio.run(run_fleet(hosts, runner, parallel=args.parallel, fail_fast=args.fail_fast, as_json=args.json))
    if not args.json:
        print(summary(results))
    return exit_status(results)


def target_of(args: argparse.Namespace) -> Target:
    if args.inventory is None and (args.limits or args.fail_fast or args.parallel is not None):
        raise RastosError("--limit, --parallel and --fail-fast choose among an inventory's hosts: add --inventory FILE")
    if args.parallel is None:
        args.parallel = DEFAULT_PARALLEL
    if args.host is not None:
        return parse_destination(args.host)
    if args.machine is not None:
        return parse_machine(args.machine)
    return Target(bus_address=args.bus_address)


def prepare_join(args: argparse.Namespace) -> None:
    """What `hub join` sends, read and checked here before anything is reached: the URL, the CA file
    and the token, which comes on standard input (an argument would show in every process list)."""
    if args.inventory is not None:
        raise RastosError("hub join takes one host: each host has a token of its own",
                          hint="rastos-hub host enrol makes a host's token and installs it there")  # fmt: skip
    try:
        args.agent_url = agent_urls(args.url)
    except HubUrlProblem as error:
        raise RastosError(f"--url{error.at}: {error.problem}") from None
    args.ca_pem = ""
    if args.ca is not None:
        try:
            args.ca_pem = check_ca(args.ca.read_text(errors="replace")).pem
        except OSError as error:
            raise RastosError(f"--ca {args.ca}: {error.strerror}") from None
        except ValueError as error:
            raise RastosError(f"--ca {args.ca}: {error}") from None
    try:
        args.token = check_token(read_token().strip())
    except ValueError as error:
        raise RastosError(f"the token on standard input {error}",
                          hint="rastosctl hub join --url URL < FILE, FILE holding the token") from None  # fmt: skip


def read_token() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("the host's agent token (not shown): ")
    return sys.stdin.readline(4096)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    target = Target(bus_address=args.bus_address)
    try:
        target = target_of(args)
        if args.command == "hub" and args.hub_command == "join":
            prepare_join(args)
        if args.inventory is not None:
            return run_inventory(args)
        return asyncio.run(run_on(target, args, PrintOutput(args.json)))
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        # Every connection is closed by now, and with it its ssh; a job already submitted goes on.
        print("rastosctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SdBusBaseError, RastosError) as error:
        status, message = failure(error, target)
        print(f"rastosctl: {message}", file=sys.stderr)
        return status


def failure(error: SdBusBaseError | RastosError, target: Target) -> tuple[int, str]:
    """The exit status and the message for an error a command ended with."""
    if isinstance(error, Unreachable):
        return EXIT_BUS_ERROR, str(error)
    if isinstance(error, RastosError):
        return EXIT_USAGE, str(error)
    if isinstance(error, DbusServiceUnknownError | DbusNameHasNoOwnerError):
        return EXIT_BUS_ERROR, f"{UNREACHABLE.format(bus=target)} (no one owns {BUS_NAME} on that bus)"
    if isinstance(error, DbusAccessDeniedError):
        return EXIT_BUS_ERROR, f"{error.dbus_error_name}: {access_denied(error.args[0] if error.args else '', target)}"
    if isinstance(error, DbusFailedError):
        return EXIT_BUS_ERROR, f"{error.dbus_error_name}: {error.args[0] if error.args else ''}"
    if isinstance(error, SdBusLibraryError):  # sd-bus could not connect: its text names a C file and an errno
        found = re.search(r"error number: (\d+)", str(error))
        reason = os.strerror(int(found[1])) if found else str(error)
        return EXIT_BUS_ERROR, f"{UNREACHABLE.format(bus=target)} (cannot connect to the bus: {reason})"
    return EXIT_BUS_ERROR, str(error)


def access_denied(message: str, target: Target) -> str:
    """The daemon's own refusal says what needs root; the bus policy of an older host, which refused
    mutating calls itself, names a rule and a member ("Rejected send message, 1 matched rules;
    type=..."), so say that in the daemon's words."""
    if not message.startswith("Rejected send message"):
        return message
    found = re.search(r'member="([^"]+)"', message)
    method = found[1] if found else "this call"
    # The group is the daemon's setting: this host's file says it only for this host's daemon.
    group = f"group {admin_group()!r}" if target.via is Via.LOCAL else "the group admin_group names there"
    if method == "ComplianceScan":
        return f"ComplianceScan reads /etc/shadow and users' keys: only root or members of {group} may call it"
    return f"{method} changes the host: only root or members of {group} may call it (the bus refused it)"


def job_changed(document: dict[str, Any]) -> bool:
    """A step changed the host, or in a dry run planned a change."""
    return any(
        step["state"] == "changed" or (step["state"] == "planned" and (step.get("result") or {}).get("changes"))
        for step in document.get("steps", [])
    )


def admin_group() -> str:
    try:
        return load_config(None).admin_group
    except RastosError:  # unreadable or invalid: the daemon would not start on it either
        return DaemonConfig.admin_group


if __name__ == "__main__":  # `python -m daemon.ctl`: how rastos-hub runs this installation's rastosctl
    sys.exit(main(sys.argv[1:]))
