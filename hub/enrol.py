"""`rastos-hub host enrol [USER@]HOST[:PORT] --hub-url URL`: a running host made one of the hub's.

1. rastosd there is reached first (`rastosctl -H DEST status`): a host that cannot be reached is
   refused before anything is made on the hub.
2. The host is added (a new token), or with --rotate given a new token, the one before kept aside.
3. rastosd there takes the token, the hub's URL and CA (`rastosctl -H DEST hub join`, its method
   org.rastos.Daemon1.Hub.Join) and restarts its link on them. The token goes to rastosctl on its
   standard input and from there over the bus: it is in no argument list and no log. If the host
   refuses (a user who may not change it, a URL it finds wrong), the hub is put back as it was: the
   host removed, or its token before restored.
4. It waits until the agent there is connected (`rastosctl -H DEST hub status --wait`) and, for a
   host new to the hub, until the hub has stored the agent's first report; if not within --timeout,
   the host stays enrolled (its agent goes on trying) and the agent's own reason is told.

rastosctl is this installation's (`python -m daemon.ctl`), run as a program: the hub does not import
the daemon (tests/test_architecture.py), and -H's whole path is rastosctl's (its ssh, its errors).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.store import Store
from rastos.errors import RastosError
from rastos.hub_settings import HubUrlProblem, agent_urls, check_ca
from rastos.process import run

CTL = [sys.executable, "-m", "daemon.ctl"]
POLL = 0.2


@dataclass(frozen=True)
class Enrolment:
    destination: str  # [USER@]HOST[:PORT], as rastosctl -H takes it
    name: str
    groups: list[str]
    agent_url: str  # the hubs' agent sockets, separated by spaces when there are several
    ca: Path | None
    timeout: int
    connect_timeout: int
    rotate: bool


def plan_from(args: argparse.Namespace) -> Enrolment:
    """The enrolment the command line asks for, every option checked before anything is reached."""
    from hub.api import NEW_HOST, validate

    name = args.name or default_name(args.destination)
    if name is None:
        raise RastosError(f"--name: needed: {args.destination} is an address, which names no host on the hub")
    groups = list(dict.fromkeys(args.group))
    validate(NEW_HOST, {"name": name, "groups": groups})
    try:
        hub_url = agent_urls(args.hub_url)
    except HubUrlProblem as error:
        raise RastosError(f"--hub-url{error.at}: {error.problem}") from None
    if args.ca is not None:
        try:
            check_ca(args.ca.read_text(errors="replace"))
        except OSError as error:
            raise RastosError(f"--ca {args.ca}: {error.strerror}") from None
        except ValueError as error:
            raise RastosError(f"--ca {args.ca}: {error}") from None
        if not hub_url.startswith("wss://"):
            raise RastosError(f"--ca: a CA is for a wss:// hub (TLS), and --hub-url is {hub_url}")
    for option, value in (("--timeout", args.timeout), ("--connect-timeout", args.connect_timeout)):
        if not 1 <= value <= 3600:
            raise RastosError(f"{option}: must be from 1 to 3600 seconds, got {value}")
    return Enrolment(args.destination, name, groups, hub_url, args.ca, args.timeout, args.connect_timeout, args.rotate)


def default_name(destination: str) -> str | None:
    """The host's name on the hub from its address: the first label of a host name (web-1 of
    root@web-1.example.org:22); None for an address, which names no host."""
    host = destination.rpartition("@")[2]
    if host.startswith("["):
        return None
    host = host.partition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.split(".")[0].lower()
    return None


class Enrol:
    def __init__(self, store: Store, plan: Enrolment, say: Callable[[str], None]) -> None:
        self.store = store
        self.plan = plan
        self.say = say

    async def __call__(self) -> None:
        plan = self.plan
        try:
            status = await self.rastosctl("status")
        except RastosError as error:
            raise RastosError(f"{plan.name}: cannot reach rastosd on {plan.destination}: {error}; nothing was made "
                              "on the hub") from None  # fmt: skip
        self.say(f"{plan.name}: rastosd {status['version']} answers on {plan.destination} "
                 f"(host name {status['hostname']})")  # fmt: skip
        token, undo, new = await self.token()
        try:
            urls = [option for url in plan.agent_url.split() for option in ("--url", url)]
            joined = await self.rastosctl("hub", "join", *urls,
                                          *(["--ca", str(plan.ca)] if plan.ca else []), token=token)  # fmt: skip
        except RastosError as error:
            told = await undo()
            raise RastosError(
                f"{plan.name}: rastosd on {plan.destination} did not take the token: {error}; {told}"
            ) from None
        written = joined["joined"]
        self.say(f"{plan.name}: rastosd there wrote its token to {written['token_file']} and the hub's URL "
                 f"{written['url']}{' and CA' if written['ca_file'] else ''} to {written['config_file']}")  # fmt: skip
        await self.wait_online(first=new)

    async def token(self) -> tuple[str, Callable[[], Awaitable[str]], bool]:
        """The host's new token, what puts the hub back as it was if the host never takes it, and
        whether the host is new to the hub."""
        plan = self.plan
        row = await self.store.host(plan.name)
        if row is None:
            token, _ = await self.store.add_host(plan.name, plan.groups, "cli")
            self.say(f"{plan.name}: added to the hub (groups {', '.join(plan.groups) or 'none'})")

            async def remove() -> str:
                await self.store.remove_host(plan.name, "cli")
                return f"host {plan.name} was removed from the hub again: nothing of it is left there"

            return token, remove, True
        if not plan.rotate:
            raise RastosError(f"{plan.name}: the hub has a host of that name already",
                              hint="--rotate gives it a new token, installed the same way; "
                                   "or choose another name with --name")  # fmt: skip
        if plan.groups and sorted(plan.groups) != sorted(row["groups"]):
            raise RastosError(f"{plan.name}: is in groups {', '.join(row['groups']) or 'none'} on the hub: --rotate "
                              "keeps a host's groups (leave --group out)")  # fmt: skip
        token, previous = await self.store.replace_host_token(plan.name, "cli")
        self.say(f"{plan.name}: a new token on the hub; the one before ends now")

        async def restore() -> str:
            await self.store.restore_host_token(plan.name, previous, "cli")
            return f"{plan.name}'s token on the hub is the one before again"

        return token, restore, False

    async def wait_online(self, *, first: bool) -> None:
        plan = self.plan
        started = time.monotonic()
        self.say(f"{plan.name}: waiting up to {plan.timeout} s for its agent to connect")
        try:
            status = await self.rastosctl("hub", "status", "--wait", str(plan.timeout))
        except AgentNotConnected as error:
            raise RastosError(
                f"{plan.name}: enrolled, but the agent did not connect within {plan.timeout} s: check the URL the "
                f"host reaches the hub at ({plan.agent_url}); the agent says: {error.status['state']}: "
                f"{error.status['error']}",
                hint=f"the host stays on the hub and its agent goes on trying; rastosctl -H {plan.destination} hub "
                "status says how it goes",
            ) from None
        if first:  # the hub's own record: the agent's report stored under the new host
            while (row := await self.store.host(plan.name)) is not None and row["last_seen"] is None:
                if time.monotonic() - started > plan.timeout:
                    raise RastosError(f"{plan.name}: its agent connected ({status['url']}), but the hub stored no "
                                      f"report from it within {plan.timeout} s")  # fmt: skip
                await asyncio.sleep(POLL)
        self.say(f"{plan.name}: online on the hub (its agent connected to {status['url']})")

    async def rastosctl(self, *command: str, token: str | None = None) -> dict[str, Any]:
        """rastosctl -H DEST --json COMMAND; its JSON, or RastosError with its own words."""
        argv = [*CTL, "-H", self.plan.destination, "--connect-timeout", str(self.plan.connect_timeout), "--json",
                *command]  # fmt: skip
        result = await asyncio.to_thread(run, argv, check=False, capture=True, input=token)
        if result.returncode == EXIT_NOT_CONNECTED and command[:2] == ("hub", "status"):
            raise AgentNotConnected(json.loads(result.stdout))
        if result.returncode != 0:
            # Named by the messages here already: rastosctl's own "DEST: " goes.
            words = said(result.stderr).removeprefix(f"{self.plan.destination}: ")
            raise RastosError(words or f"rastosctl exited with status {result.returncode}")
        document: dict[str, Any] = json.loads(result.stdout)
        return document


EXIT_NOT_CONNECTED = 5  # rastosctl's, for hub status --wait


class AgentNotConnected(Exception):
    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status.get("state"))
        self.status = status


def said(stderr: str) -> str:
    """What rastosctl said of a failure, without its name."""
    lines = [line.removeprefix("rastosctl: ") for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines)
