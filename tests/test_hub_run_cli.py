"""`rastos-hub run` against a real hub: the CLI as its own process, talking HTTP and WebSocket to
`rastos-hub serve`, with simulated agents (the real protocol over real WebSockets) that carry out the
commands they are sent as the test says: done, failed, or held until released or cancelled. Of the
refusals, most run main() in the test's process: they differ only in what it checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import unittest.mock
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.run_params import OpLibrary, op_step
from hub.run_view import Follower
from hub.runs_api import published_ops
from ops.declared import load_workflow
from rastos.errors import RastosError
from tests.hub_fixtures import CHECKOUT, HUB_CLI, Hub, Pki, _serving, call_main, free_port
from tests.hub_fixtures import hub as hub

FAILURE = "a directory is in the way"


class Agent:
    """One host's agent: carries out each command by `outcome` (done, failed, or held until `release`
    or the hub's cancel) and reports queued, running and its end with a result as rastosd's has."""

    def __init__(self, hub: Hub, name: str, token: str, session: aiohttp.ClientSession, outcome: str) -> None:
        self.hub, self.name, self.token, self.session, self.outcome = hub, name, token, session, outcome
        self.commands: dict[str, dict[str, Any]] = {}  # id: the command as received
        self.cancels: list[str] = []
        self.release = asyncio.Event()
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self._cancelled: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        self.socket = await self.session.ws_connect(self.hub.agent_url, headers=headers)
        assert (await self.socket.receive_json(timeout=10))["type"] == "welcome"
        self._spawn(self._read(self.socket))
        await self.socket.send_json({"type": "facts", "facts": {"hostname": self.name}})

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for message in socket:
            frame = json.loads(message.data)
            if frame["type"] == "command" and frame["command"]["id"] not in self.commands:
                self.commands[frame["command"]["id"]] = frame["command"]
                self._cancelled[frame["command"]["id"]] = asyncio.Event()
                self._spawn(self._carry_out(frame["command"], len(self.commands)))
            elif frame["type"] == "cancel":
                self.cancels.append(frame["command"])
                self._cancelled[frame["command"]].set()

    async def _status(self, command: str, state: str, job: int, result: dict[str, Any] | None = None) -> None:
        assert self.socket is not None
        await self.socket.send_json({"type": "command_status", "command": command, "state": state, "job": job,
                                     "result": result})  # fmt: skip

    async def _carry_out(self, command: dict[str, Any], job: int) -> None:
        ops = [step["op"] for step in command["steps"]]
        await self._status(command["id"], "queued", job)
        await self._status(command["id"], "running", job)
        cancelled = self._cancelled[command["id"]]
        if self.outcome == "held":
            await asyncio.wait([asyncio.create_task(e.wait()) for e in (self.release, cancelled)],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if cancelled.is_set():
            steps = [{"op": op, "state": "skipped"} for op in ops]
            await self._status(command["id"], "cancelled", job, {"steps": steps, "error": "cancelled before step 1"})
        elif self.outcome == "failed":
            steps = [{"op": ops[0], "state": "failed", "error": FAILURE, "output": [f"tried {ops[0]}"]}]
            steps += [{"op": op, "state": "skipped"} for op in ops[1:]]
            error = f"step 1 ({ops[0]}) failed: {FAILURE}"
            await self._status(command["id"], "failed", job, {"steps": steps, "error": error, "state": "failed"})
        else:
            steps = [{"op": op, "state": "changed", "output": [f"{op} applied on {self.name}"]} for op in ops]
            await self._status(command["id"], "done", job, {"steps": steps, "state": "done"})


@dataclass
class Agents:
    hub: Hub
    session: aiohttp.ClientSession
    agents: dict[str, Agent] = field(default_factory=dict)

    async def add(self, name: str, outcome: str = "done", groups: tuple[str, ...] = (), online: bool = True) -> Agent:
        token = (await api(self.hub, "POST", "/api/v1/hosts", {"name": name, "groups": list(groups)}))["token"]
        agent = self.agents[name] = Agent(self.hub, name, token, self.session, outcome)
        if online:
            await agent.connect()
        return agent

    def steps(self, name: str) -> list[list[dict[str, Any]]]:
        """The steps of each command the agent was sent."""
        return [command["steps"] for command in self.agents[name].commands.values()]


def scenario(hub: Hub, body: Callable[[Agents], Coroutine[Any, Any, None]]) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            agents = Agents(hub, session)
            try:
                await body(agents)
            finally:
                for agent in agents.agents.values():
                    await agent.close()

    asyncio.run(run())


async def api(hub: Hub, method: str, path: str, body: object = None) -> Any:
    return await asyncio.to_thread(hub.api, method, path, body)


# The CLI, as its own process


@dataclass(frozen=True)
class Finished:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]


def environment(hub: Hub, **extra: str) -> dict[str, str]:
    """This process's environment without any hub setting of its own, with the test hub's URL and token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RASTOS_HUB_")}
    return {**env, "RASTOS_HUB_URL": hub.url, "RASTOS_HUB_TOKEN": hub.admin_token, **extra}


class Cli:
    """A running `rastos-hub` whose output is read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []

    @classmethod
    async def start(cls, hub: Hub, *args: str, env: dict[str, str] | None = None) -> Cli:
        process = await asyncio.create_subprocess_exec(
            *HUB_CLI, *args, cwd=CHECKOUT, env=env or environment(hub),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(process)

    async def until(self, pattern: str, timeout: float = 30) -> str:
        """Read its output up to a line matching `pattern`, and return that line."""
        for line in self.out:
            if re.search(pattern, line):
                return line
        assert self.process.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.process.stdout.readline(), timeout)).decode()
            assert line, f"it ended without a line matching {pattern!r}:\n{''.join(self.out)}"
            self.out.append(line)
            if re.search(pattern, line):
                return line

    async def finish(self, timeout: float = 60) -> Finished:
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        return Finished(await self.process.wait(), "".join(self.out) + out.decode(), err.decode())


async def rastos_hub(hub: Hub, *args: str, env: dict[str, str] | None = None) -> Finished:
    return await (await Cli.start(hub, *args, env=env)).finish()


def now(hub: Hub, *args: str, env: dict[str, str] | None = None) -> Finished:
    """`rastos-hub ARGS` run to its end, outside any scenario."""
    return asyncio.run(rastos_hub(hub, *args, env=env))


def runs(hub: Hub) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = hub.api("GET", "/api/v1/runs")
    return found


# Starting and following


def test_an_op_on_two_hosts_is_followed_live_to_each_hosts_result(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        good, bad = await agents.add("good", "held"), await agents.add("bad", "failed")
        follow = await Cli.start(hub, "run", "start", "--host", "good", "bad", "--op", "user", "name=deploy",
                                 "uid=1500", "groups=wheel", "groups=docker", "--follow")  # fmt: skip
        started = await follow.until(r"^run [0-9a-f]{32} started: user on 2 host")
        await follow.until(r"^good: running \(job 1\)")  # live, while good's job is still at work
        await follow.until(r"^bad: failed \(job 1\): step 1 \(user\) failed: " + FAILURE)
        good.release.set()
        finished = await follow.finish()
        assert finished.status == 3, "a host failed: the exit status says so"
        run_id = started.split()[1]
        assert finished.out.endswith(f"run {run_id}: partial (1 done, 1 failed)\n")
        assert "good: done (job 1)\n  1. user: changed\n       user applied on good\n" in finished.out
        assert f"  1. user: failed: {FAILURE}\n       tried user\n" in finished.out
        # Typed by the op's schema: uid an integer, groups a list of the values given one by one.
        params = {"name": "deploy", "uid": 1500, "groups": ["wheel", "docker"]}
        assert agents.steps("good") == agents.steps("bad") == [[{"op": "user", "params": params}]]
        assert bad.cancels == [] and good.cancels == []

    scenario(hub, body)


def test_follow_as_json_lines_ends_with_the_run_and_exits_0_when_every_host_is_done(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        one, two = await agents.add("one", "held"), await agents.add("two", "held")
        started = (await rastos_hub(hub, "run", "start", "--all", "--op", "motd", "text=hello", "--json")).json()
        assert started["target"] == {"all": True} and [c["host"] for c in started["commands"]] == ["one", "two"]
        follow = await Cli.start(hub, "run", "follow", started["id"], "--json")
        await follow.until(r'"host": "one", .*"state": "running"')
        await follow.until(r'"host": "two", .*"state": "running"')
        one.release.set()
        two.release.set()
        finished = await follow.finish()
        assert finished.status == 0, finished.err
        lines = finished.lines()
        assert lines[-1]["type"] == "end" and lines[-1]["run"]["state"] == "complete"
        assert lines[-1]["run"]["id"] == started["id"]
        ends = {line["host"]: line for line in lines if line["type"] == "command" and line["state"] == "done"}
        assert sorted(ends) == ["one", "two"], "each host's end, once"
        assert ends["one"]["result"]["steps"] == [{"op": "motd", "state": "changed", "output": ["motd applied on one"]}]
        assert all(line["type"] == "command" for line in lines[:-1])

    scenario(hub, body)


def test_a_pipeline_from_a_json_or_toml_file_runs_as_written(hub: Hub, tmp_path: Path) -> None:
    steps = [
        {"op": "motd", "params": {"text": "managed"}},
        {"op": "sysctl", "params": {"settings": {"vm.swappiness": "10"}}},
    ]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    toml = ['[[step]]', 'op = "motd"', 'params = { text = "managed" }',
            '[[step]]', 'op = "sysctl"', 'params = { settings = { "vm.swappiness" = "10" } }']  # fmt: skip
    (tmp_path / "steps.toml").write_text("\n".join(toml) + "\n")

    async def body(agents: Agents) -> None:
        await agents.add("web-1")
        for file in ("steps.json", "steps.toml"):
            finished = await rastos_hub(hub, "run", "start", "--host", "web-1", "--pipeline", str(tmp_path / file),
                                        "--dry-run", "--follow")  # fmt: skip
            assert finished.status == 0, finished.err
            assert "web-1: done (job" in finished.out and "  2. sysctl: changed" in finished.out
        assert [command["steps"] for command in agents.agents["web-1"].commands.values()] == [steps, steps]
        assert {command["flags"] for command in agents.agents["web-1"].commands.values()} == {1}, "--dry-run"

    scenario(hub, body)
    (tmp_path / "bad.json").write_text(json.dumps([{"op": "motd", "params": {"text": "x", "colour": "red"}}]))
    refused = now(hub, "run", "start", "--all", "--pipeline", str(tmp_path / "bad.json"))
    assert refused.status == 2
    assert f"{tmp_path / 'bad.json'}: steps[0].params: Additional properties are not allowed ('colour'" in refused.err
    assert len(runs(hub)) == 2, "the refused pipeline made no run"


def test_a_workflow_runs_its_steps_with_variables_typed_by_the_params_they_fill(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        await agents.add("edge")
        finished = await rastos_hub(hub, "run", "start", "--host", "edge", "--workflow", "security",
                                    "--var", "ssh_port=2222", "--var", "allow_tcp=80", "--var", "allow_tcp=443",
                                    "--follow")  # fmt: skip
        assert finished.status == 0, finished.err
        expected = load_workflow("security").steps_for({"ssh_port": 2222, "allow_tcp": ["80", "443"]})
        assert agents.steps("edge") == [expected]
        assert expected[1]["params"]["port"] == 2222, "an integer, as ssh.port is"

    scenario(hub, body)
    cases = [
        (["--var", "ssh_port=high"], "--var ssh_port (ssh.port): must be an integer, got 'high'"),
        (["--var", "colour=red"], "--var colour: workflow security has no such variable"),
    ]
    for extra, expected in cases:
        refused = now(hub, "run", "start", "--all", "--workflow", "security", *extra)
        assert refused.status == 2 and expected in refused.err, refused.err
    refused = now(hub, "run", "start", "--all", "--workflow", "nosuch")
    assert refused.status == 2 and "--workflow: no workflow named 'nosuch'" in refused.err
    assert len(runs(hub)) == 1


def test_a_running_run_is_cancelled_and_its_follower_says_so(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        busy = await agents.add("busy", "held")
        await agents.add("away", online=False)
        follow = await Cli.start(hub, "run", "start", "--all", "--op", "motd", "text=x", "--follow")
        run_id = (await follow.until(r"^run [0-9a-f]{32} started")).split()[1]
        await follow.until(r"^busy: running")
        cancelled = await rastos_hub(hub, "run", "cancel", run_id)
        assert cancelled.status == 0, cancelled.err
        assert cancelled.out.startswith(f"run {run_id}: cancel requested; the hosts still running are asked to stop")
        finished = await follow.finish()
        assert finished.status == 3
        assert (
            "away: cancelled\n" in finished.out and "busy: cancelled (job 1): cancelled before step 1" in finished.out
        )
        assert finished.out.endswith(f"run {run_id}: cancelled (2 cancelled)\n")
        assert busy.cancels == list(busy.commands)
        again = await rastos_hub(hub, "run", "cancel", run_id)
        assert again.status == 1 and f"run: {run_id} is cancelled already" in again.err

    scenario(hub, body)


def test_list_and_show_as_json_and_as_text(hub: Hub) -> None:
    for name in ("a", "b"):
        hub.api("POST", "/api/v1/hosts", {"name": name, "groups": ["web"]})
    first = now(hub, "run", "start", "--host", "a", "--op", "motd", "text=one", "--json").json()
    second = now(hub, "run", "start", "--group", "web", "--op", "hostname", "hostname=b", "--json").json()
    listed = now(hub, "run", "list", "--json")
    assert listed.status == 0
    assert [(run["id"], run["state"]) for run in listed.json()] == [(first["id"], "running"), (second["id"], "running")]
    shown = now(hub, "run", "show", second["id"], "--json")
    assert shown.status == 0 and shown.json() == hub.api("GET", f"/api/v1/runs/{second['id']}")
    assert shown.json()["steps"] == [{"op": "hostname", "params": {"hostname": "b"}}]
    table = now(hub, "run", "list").out.splitlines()
    assert table[0].split() == ["ID", "STATE", "CREATED", "BY", "TARGET", "STEPS", "HOSTS"]
    assert table[2].startswith(second["id"]) and "group web" in table[2] and table[2].endswith("2 pending")
    text = now(hub, "run", "show", first["id"]).out
    assert f"run {first['id']}\nstate:       running\n" in text and "\n  a: pending\n" in text


def test_all_and_group_targeting(hub: Hub) -> None:
    for name, group in (("a", "web"), ("b", "web"), ("c", "db")):
        hub.api("POST", "/api/v1/hosts", {"name": name, "groups": [group]})

    def started(*target: str) -> tuple[dict[str, Any], list[str]]:
        run = now(hub, "run", "start", *target, "--op", "motd", "text=x", "--json").json()
        return run["target"], [command["host"] for command in run["commands"]]

    assert started("--group", "web") == ({"group": "web"}, ["a", "b"])
    assert started("--group", "web", "--group", "db") == ({"hosts": ["a", "b", "c"]}, ["a", "b", "c"])
    assert started("--all") == ({"all": True}, ["a", "b", "c"])
    assert started("--host", "c", "--host", "a") == ({"hosts": ["c", "a"]}, ["c", "a"])


# Errors


def test_each_error_is_said_with_its_exit_status_and_nothing_is_sent(hub: Hub, tmp_path: Path) -> None:
    hub.api("POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})
    op = ["--op", "motd", "text=x"]
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["run", "list"], {"RASTOS_HUB_URL": f"http://127.0.0.1:{free_port()}"}, 1,
         "rastos-hub: hub: cannot reach http://127.0.0.1:{port}: Connection refused\nhint: is `rastos-hub serve`"),
        (["run", "list"], {"RASTOS_HUB_TOKEN": "not-the-token"}, 1,
         "rastos-hub: hub: the token was refused (401): authorization: no valid admin token\n"
         "hint: an admin token: `rastos-hub admin add NAME`"),
        (["run", "list"], {"RASTOS_HUB_TOKEN": ""}, 2, "rastos-hub: no admin token: set RASTOS_HUB_TOKEN or give"),
        (["run", "list", "--token-file", str(tmp_path / "none")], {}, 2,
         f"rastos-hub: --token-file: cannot read {tmp_path / 'none'}: No such file or directory"),
        (["run", "list", "--hub", "ftp://hub"], {}, 2, "rastos-hub: --hub: 'ftp://hub' is not an http:// or https://"),
        (["run", "show", "0123abcd"], {}, 1,
         "rastos-hub: id: no run '0123abcd'\nhint: `rastos-hub run list` shows the runs the hub keeps"),
        (["run", "follow", "0123abcd"], {}, 1, "rastos-hub: id: no run '0123abcd'"),
        (["run", "cancel", "0123abcd"], {}, 1, "rastos-hub: run: no run '0123abcd'"),
        (["run", "show", "../hosts"], {}, 2, "rastos-hub: ID: '../hosts' is not a run's id"),
        (["run", "start", "--host", "ghost", *op], {}, 1, "rastos-hub: target.hosts: no host named 'ghost'"),
        (["run", "start", "--group", "db", *op], {}, 1, "rastos-hub: target.group: no host is in group 'db'"),
        (["run", "start", "--group", "web", "--group", "db", *op], {}, 1,
         "rastos-hub: --group db: no host is in group 'db'"),
        (["run", "start", "--all", "--op", "user", "name=a", "uid=1.5"], {}, 2,
         "rastos-hub: --op user: uid: must be an integer, got '1.5'"),
        (["run", "start", "--all", "--op", "user", "name=a", "locked=maybe"], {}, 2,
         "rastos-hub: --op user: locked: must be true or false, got 'maybe'"),
        (["run", "start", "--all", "--op", "motd", "txt=x"], {}, 2,
         "rastos-hub: --op motd: txt: motd has no such parameter\nhint: its parameters: text, dynamic"),
        (["run", "start", "--all", "--op", "user", "uid=7"], {}, 2,
         "rastos-hub: --op user: 'name' is a required property"),
        (["run", "start", "--all", "--op", "user", "name=a", "uid=-5"], {}, 2,
         "rastos-hub: --op user: uid: -5 is less than the minimum of 1"),
        (["run", "start", "--all", "--op", "nosuch"], {}, 2, "rastos-hub: --op: the hub knows no op 'nosuch'"),
        (["run", "start", "--all", *op, "--var", "a=1"], {}, 2, "rastos-hub: --var: only with --workflow"),
    ]  # fmt: skip
    for number, (args, env, status, expected) in enumerate(cases):
        given = environment(hub, **env)
        port = given["RASTOS_HUB_URL"].rpartition(":")[2]
        # The first three (each way the hub or its token fails, exit statuses 1 and 2) as processes of
        # their own; the rest, which differ only in what main() checks, in this process.
        finished = now(hub, *args, env=given) if number < 3 else in_process(*args, env=given)
        assert (finished.status, finished.out) == (status, ""), (args, finished)
        assert finished.err.startswith(expected.replace("{port}", port)), (args, finished.err)
    assert runs(hub) == [], "nothing refused made a run"


def in_process(*args: str, env: dict[str, str]) -> Finished:
    """`rastos-hub ARGS` run to its end by main() in this process (call_main), in environment `env`."""
    with unittest.mock.patch.dict(os.environ, env, clear=True):
        done = call_main(list(args))
    return Finished(done.returncode, done.stdout, done.stderr)


def test_the_token_is_never_in_argv_output_or_a_log(hub: Hub, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(hub.admin_token + "\n")
    env = {key: value for key, value in environment(hub).items() if key != "RASTOS_HUB_TOKEN"}

    async def body(agents: Agents) -> None:
        agent = await agents.add("one", "held")
        follow = await Cli.start(hub, "--debug", "run", "start", "--all", "--op", "motd", "text=x", "--follow",
                                 "--token-file", str(token_file), env=env)  # fmt: skip
        await follow.until("^one: running")
        argv = Path(f"/proc/{follow.process.pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{follow.process.pid}/environ").read_bytes()
        assert str(token_file).encode() in argv, "the process is the one given the file"
        assert not any(hub.admin_token.encode() in part for part in argv)
        assert hub.admin_token.encode() not in environ, "from a file, not even in its environment"
        agent.release.set()
        finished = await follow.finish()
        assert finished.status == 0 and "one: done" in finished.out
        for text in (finished.out, finished.err):
            assert hub.admin_token not in text
        assert "GET http://127.0.0.1" in finished.err, "--debug logged its requests, without the token"
        refused = await rastos_hub(hub, "--debug", "run", "list", env=environment(hub, RASTOS_HUB_TOKEN="wrong-1234"))
        assert refused.status == 1 and "wrong-1234" not in refused.out + refused.err

    scenario(hub, body)
    assert hub.admin_token not in hub.log.read_text()


def test_a_follower_reconnects_when_the_hub_restarts_and_sees_the_run_to_its_end(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        agent = await agents.add("one", "held")
        follow = await Cli.start(hub, "run", "start", "--all", "--op", "motd", "text=x", "--follow")
        await follow.until("^one: running")
        await asyncio.to_thread(hub.stop)  # the follower is told 1001, going away, and opens it again
        await asyncio.to_thread(hub.start)
        await agent.connect()
        agent.release.set()
        finished = await follow.finish()
        assert finished.status == 0, finished.err
        assert finished.out.count("one: running (job 1)") == 1, "what it said before the restart is not said again"
        assert "one: done (job 1)" in finished.out

    scenario(hub, body)


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[Hub]:
    yield from _serving(Hub(tmp_path / "hub", tls=Pki.make(tmp_path / "pki")))


def test_a_tls_hub_is_verified_with_ca_and_followed_over_wss(tls_hub: Hub) -> None:
    hub = tls_hub
    assert hub.tls is not None
    hub.api("POST", "/api/v1/hosts", {"name": "away"})
    refused = now(hub, "run", "list")
    assert refused.status == 1
    assert refused.err.startswith(f"rastos-hub: hub: {hub.url}: its TLS certificate is not trusted: ")
    assert "hint: give the certificate of the CA that issued it: --ca FILE" in refused.err
    ca = ["--ca", str(hub.tls.ca)]
    run = now(hub, "run", "start", "--all", "--op", "motd", "text=x", "--json", *ca).json()
    assert now(hub, "run", "cancel", run["id"], *ca).status == 0
    followed = now(hub, "run", "follow", run["id"], *ca)
    assert followed.status == 3 and followed.out == f"away: cancelled\nrun {run['id']}: cancelled (1 cancelled)\n"


# Typing parameters: the hub's published schemas, without a hub


def test_values_are_typed_by_the_schema_of_the_parameter_they_fill() -> None:
    library = OpLibrary.from_json(published_ops())
    assert op_step(library, "sysctl", ["settings=vm.swappiness=10", "settings=net.ipv4.ip_forward=1"]) == {
        "op": "sysctl", "params": {"settings": {"vm.swappiness": "10", "net.ipv4.ip_forward": "1"}}}  # fmt: skip
    assert op_step(library, "user", ["name=a", "groups=[\"x\", \"y\"]", "locked=yes"])["params"] == {
        "name": "a", "groups": ["x", "y"], "locked": True}  # fmt: skip
    assert op_step(library, "motd", ["text=22"])["params"] == {"text": "22"}, "a string stays a string"
    assert op_step(library, "user", ["name=a", "groups="])["params"] == {"name": "a", "groups": []}
    for arguments, expected in (
        (["text=a", "text=b"], "--op motd: text: given 2 times; it takes one value"),
        (["text"], "--op motd: 'text': write KEY=VALUE"),
    ):
        with pytest.raises(RastosError) as refused:
            op_step(library, "motd", arguments)
        assert refused.value.message == expected
    with pytest.raises(RastosError) as refused:
        op_step(library, "sysctl", ["settings=vm.swappiness"])
    assert refused.value.message == "--op sysctl: settings: 'vm.swappiness': write settings=NAME=VALUE or a JSON object"


def test_a_follower_says_each_change_once_however_often_the_whole_run_comes_again() -> None:
    """A stream opened again starts with the whole run: what was said of it before is not said twice."""
    said: list[str] = []
    follower = Follower(said.append)
    command = {"id": "c1", "host": "one", "state": "running", "job_id": 4, "result": None}
    run = {"id": "r1", "state": "running", "commands": [command]}
    assert not follower.take({"type": "run", "run": run})
    assert not follower.take({"type": "run", "run": run})
    done = {**command, "state": "done", "result": {"steps": [{"op": "motd", "state": "unchanged"}]}}
    assert not follower.take({"type": "command", "command": done})
    assert follower.take({"type": "end", "run": {**run, "state": "complete", "commands": [done]}})
    assert said == ["one: running (job 4)", "one: done (job 4)", "  1. motd: unchanged", "run r1: complete (1 done)"]
