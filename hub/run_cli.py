"""`rastos-hub run`: start, list, show, cancel and follow runs on a running hub, over its REST API and
its run stream (hub/client.py), from any machine that reaches it.

Exit status: 0; 1 when the hub cannot be reached or refuses (a token, a run that is not there, a
target no host matches); 2 for bad arguments, found before anything is sent (a parameter the op does
not have, a value of the wrong type); 3 when a followed run ends other than complete (a host failed,
or the run was cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hub.client import DEFAULT_HUB, TOKEN_ENV, URL_ENV, HubClient, UsageError, address_from
from hub.run_params import OpLibrary, Step, op_step, pipeline_steps, workflow_steps
from hub.run_view import Follower, run_text, runs_table, steps_text, tally
from rastos.errors import RastosError

COMPLIANCE_ACTIONS = ("scan", "remediate")  # as hub/protocol.py's RUN_COMPLIANCE takes them
CHECK_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
RUN_ENDED_BADLY = 3
INTERRUPTED = 130  # as a shell says a command ended by Ctrl-C
Action = Callable[[HubClient, argparse.Namespace], Awaitable[int]]


def add_commands(commands: Any) -> None:
    """The `run` command and its actions, on rastos-hub's parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--hub", metavar="URL", help=f"the hub's http(s):// URL (default ${URL_ENV}, else {DEFAULT_HUB})"
    )
    common.add_argument("--token-file", type=Path, metavar="FILE",
                        help=f"a file whose first line is an admin token (default: ${TOKEN_ENV}); "
                             "never the token itself on the command line")  # fmt: skip
    common.add_argument("--ca", type=Path, metavar="FILE", help="PEM certificate(s) a https:// hub is verified with")
    common.add_argument("--json", action="store_true", help="JSON out: one document, or JSON lines when following")
    run = commands.add_parser("run", help="start, list, show, cancel and follow runs on a running hub (its API)")
    actions = run.add_subparsers(required=True, metavar="ACTION")

    start = actions.add_parser("start", parents=[common], help="run an op, a pipeline or a workflow on hosts")
    where = start.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", action="extend", nargs="+", metavar="HOST", help="these hosts (repeatable)")
    where.add_argument("--group", action="extend", nargs="+", metavar="GROUP", help="the hosts of these groups")
    where.add_argument("--all", action="store_true", help="every host")
    what = start.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--op",
        nargs="+",
        metavar=("NAME", "KEY=VALUE"),
        help="one op and its parameters, typed by its schema (port=22 is an integer for an integer parameter; "
        "a list: the key once per item; a map: KEY=NAME=VALUE once per entry)",
    )
    what.add_argument("--pipeline", type=Path, metavar="FILE",
                      help='steps: a JSON list of {"op", "params"}, or TOML with a [[step]] table each')  # fmt: skip
    what.add_argument("--workflow", metavar="NAME", help="a workflow (ops/workflows, /etc/rastos/workflows here)")
    what.add_argument("--compliance", choices=COMPLIANCE_ACTIONS,
                      help="scan each host against its compliance checks, or remediate: fix the failed ones an "
                           "op can fix (as one job), then scan again")  # fmt: skip
    start.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a workflow's variable")
    start.add_argument("--check", action="append", default=[], metavar="ID",
                       help="--compliance remediate: only this failed check (repeatable; default: all)")  # fmt: skip
    start.add_argument("--dry-run", action="store_true", help="plan every step, change nothing")
    start.add_argument("--no-snapshot", action="store_true", help="take no pre/post snapshots")
    start.add_argument("--restore-on-failure", action="store_true", help="put changed files back if a step fails")
    start.add_argument("--parallelism", type=int, default=10, metavar="N", help="hosts at once (default 10)")
    start.add_argument("--follow", action="store_true", help="then follow it to its end, as `run follow`")
    start.set_defaults(action=_command(_start), over_api=True)

    actions.add_parser("list", parents=[common], help="the runs the hub keeps, oldest first").set_defaults(
        action=_command(_list), over_api=True
    )
    for name, helptext, action in (
        ("show", "one run, each host's command with its steps and output", _show),
        ("cancel", "cancel a run: pending commands end, running ones are asked to", _cancel),
        ("follow", "each host's progress until the run ends; exit 3 unless it ended complete", _follow),
    ):
        parser = actions.add_parser(name, parents=[common], help=helptext)
        parser.add_argument("id", metavar="ID", help="the run's id")
        parser.set_defaults(action=_command(action), over_api=True)


def _command(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        address = address_from(args.hub, args.token_file, args.ca)

        async def session() -> int:
            async with HubClient(address) as hub:
                return await action(hub, args)

        try:
            return asyncio.run(session())
        except KeyboardInterrupt:
            print("rastos-hub: interrupted; a run started goes on on the hub (rastos-hub run list)", file=sys.stderr)
            return INTERRUPTED

    return run


def _emit(args: argparse.Namespace, document: Any, text: str) -> None:
    print(json.dumps(document, indent=1) if args.json else text, flush=True)


async def _start(hub: HubClient, args: argparse.Namespace) -> int:
    if args.var and args.workflow is None:
        raise UsageError("--var: only with --workflow")
    if args.check and args.compliance != "remediate":
        raise UsageError("--check: only with --compliance remediate (a scan runs every check)")
    for check in args.check:
        if not CHECK_ID.fullmatch(check):
            raise UsageError(f"--check: {check[:80]!r} is not a check's id (lower case, digits and -)")
    body: dict[str, Any] = {"target": await _target(hub, args), "flags": _flags(args),
                            "parallelism": args.parallelism}  # fmt: skip
    if args.compliance is not None:
        body["compliance"] = {"action": args.compliance, "checks": list(dict.fromkeys(args.check))}
    else:
        body["steps"] = _steps(OpLibrary.from_json(await hub.get("/api/v1/ops")), args)
    run = await hub.post("/api/v1/runs", body)
    started = f"run {run['id']} started: {steps_text(run)} on {len(run['commands'])} host(s)"
    if not args.follow:
        _emit(args, run, f"{started}\nfollow it: rastos-hub run follow {run['id']}")
        return 0
    if args.json:
        print(json.dumps({"type": "started", "run": run}), flush=True)
    else:
        print(started, flush=True)
    return await _follow_run(hub, args, run["id"])


async def _target(hub: HubClient, args: argparse.Namespace) -> dict[str, Any]:
    if args.all:
        return {"all": True}
    if args.host:
        return {"hosts": list(dict.fromkeys(args.host))}
    groups = list(dict.fromkeys(args.group))
    if len(groups) == 1:
        return {"group": groups[0]}
    # The hub takes one group: several are the union of their hosts, named here.
    hosts = await hub.get("/api/v1/hosts")
    names: list[str] = []
    for group in groups:
        members = sorted(host["name"] for host in hosts if group in host["groups"])
        if not members:
            raise RastosError(f"--group {group}: no host is in group {group!r}")
        names += [name for name in members if name not in names]
    return {"hosts": names}


def _steps(library: OpLibrary, args: argparse.Namespace) -> list[Step]:
    if args.op is not None:
        return [op_step(library, args.op[0], args.op[1:])]
    if args.pipeline is not None:
        return pipeline_steps(library, args.pipeline)
    return workflow_steps(library, args.workflow, args.var)


def _flags(args: argparse.Namespace) -> int:
    return (1 if args.dry_run else 0) | (2 if args.no_snapshot else 0) | (4 if args.restore_on_failure else 0)


async def _list(hub: HubClient, args: argparse.Namespace) -> int:
    runs = sorted(await hub.get("/api/v1/runs"), key=lambda run: run["created"])
    _emit(args, runs, runs_table(runs))
    return 0


async def _show(hub: HubClient, args: argparse.Namespace) -> int:
    run = await hub.get(f"/api/v1/runs/{_run_id(args.id)}")
    _emit(args, run, run_text(run))
    return 0


async def _cancel(hub: HubClient, args: argparse.Namespace) -> int:
    run = await hub.post(f"/api/v1/runs/{_run_id(args.id)}/cancel")
    if run["state"] == "cancelled":
        text = f"run {run['id']}: cancelled ({tally(run)})"
    else:
        text = f"run {run['id']}: cancel requested; the hosts still running are asked to stop ({tally(run)})"
    _emit(args, run, text)
    return 0


async def _follow(hub: HubClient, args: argparse.Namespace) -> int:
    return await _follow_run(hub, args, _run_id(args.id))


async def _follow_run(hub: HubClient, args: argparse.Namespace, run_id: str) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    def as_json(document: dict[str, Any]) -> None:
        print(json.dumps(document), flush=True)

    follower = Follower(say, as_json if args.json else None)
    async for message in hub.follow(run_id):
        if follower.take(message):
            break
    return 0 if follower.run.get("state") == "complete" else RUN_ENDED_BADLY


def _run_id(text: str) -> str:
    """An id as the hub makes them (hex); anything else could not name a run, nor belongs in a URL."""
    if not 1 <= len(text) <= 64 or not all(c in "0123456789abcdef" for c in text.lower()):
        raise UsageError(f"ID: {text[:80]!r} is not a run's id (hex digits, as `rastos-hub run list` shows them)")
    return text.lower()
