"""Step output while a run executes: a real rastosd's job printing lines that reach the hub before
the step ends; the hub relaying an agent's `output` frames to a run's stream and to `rastos-hub run
follow` (its own process; text and JSON lines); what an agent may send (refused frames, a flood cut
off or trimmed, each logged); the hub's memory for output bounded per host, run and hub; and the
runs' view in headless Chromium, whose panes grow before the run ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.sync_api import Browser, expect

from daemon.hub_output import OUTPUT_INTERVAL, OutputForwarder
from hub.live_output import HOST_BYTES, HOST_LINES, LINE_OVERHEAD, RUN_BYTES, TOTAL_BYTES, LiveOutput
from hub.protocol import OUTPUT_FRAME_LINES, OUTPUT_LINE_CHARS
from hub.run_view import Follower
from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_fleet import fleet as fleet
from tests.test_hub_hostile import exchange
from tests.test_hub_rollouts import eventually
from tests.test_hub_run_cli import Agents, Cli, scenario
from tests.test_hub_ui import browser as browser
from tests.test_hub_ui_fleet import agents, logged_in, screenshots


def output(command: str, step: int, first: int, lines: list[str]) -> dict[str, Any]:
    return {"type": "output", "command": command, "step": step, "first": first, "lines": lines}


def stream_url(hub: Hub, run_id: str) -> str:
    return hub.url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/stream"


async def started_on(hub: Hub, agents: Agents, host: str, *steps: str) -> tuple[str, str]:
    """A run of motd steps (one per text) on `host`, whose held agent has its command: (run, command)."""
    body = {"target": {"hosts": [host]}, "steps": [{"op": "motd", "params": {"text": text}} for text in steps]}
    run = await asyncio.to_thread(hub.api, "POST", "/api/v1/runs", body)
    agent = agents.agents[host]
    await eventually(lambda: agent.commands, f"{host} has its command")
    return run["id"], next(iter(agent.commands))


# The agent: a real rastosd


@pytest.mark.root
def test_a_real_rastosd_forwards_a_steps_lines_before_the_step_ends(hub: Hub, fleet: Fleet, tmp_path: Path) -> None:
    # useradd, as the user op runs it, behind a program that prints two lines and waits to be let go:
    # the step is under way, its lines printed, for as long as the test says.
    release, bin_dir = tmp_path / "release", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "useradd").write_text(
        "#!/bin/sh\necho 'preparing the account'\necho 'checking the groups'\n"
        f'while [ ! -e {release} ]; do sleep 0.05; done\nexec /usr/sbin/useradd "$@"\n'
    )
    (bin_dir / "useradd").chmod(0o755)
    agent = fleet.add("web-1", start=False)
    agent.env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    agent.start()
    hub.wait_state(online("web-1"), "the agent online")
    steps = [{"op": "motd", "params": {"text": "live"}}, {"op": "user", "params": {"name": "deploy"}}]
    run = hub.api("POST", "/api/v1/runs", {"target": {"hosts": ["web-1"]}, "steps": steps})

    async def follow() -> tuple[dict[int, list[str]], dict[str, Any]]:
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        lines: dict[int, list[str]] = {}
        first_of_step: dict[int, list[str]] = {}
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.ws_connect(stream_url(hub, run["id"])) as ws,
        ):
            while "checking the groups" not in lines.get(1, []):
                message = await ws.receive_json(timeout=60)
                assert message["type"] != "end", f"the run ended before its step's lines came: {lines}"
                if message["type"] == "output":
                    assert message["host"] == "web-1" and message["first"] == len(lines.get(message["step"], []))
                    lines.setdefault(message["step"], []).extend(message["lines"])
                    first_of_step.setdefault(message["step"], message["lines"])
            # Printed together, they came together: one batch, not a frame a line.
            assert first_of_step[1] == ["preparing the account", "checking the groups"], first_of_step
            # The step has printed, and not ended: the daemon's job still runs it.
            assert hub.api("GET", f"/api/v1/runs/{run['id']}")["commands"][0]["state"] == "running"
            release.touch()
            while (message := await ws.receive_json(timeout=60))["type"] != "end":
                if message["type"] == "output":
                    lines.setdefault(message["step"], []).extend(message["lines"])
            return lines, message["run"]

    lines, ended = asyncio.run(follow())
    assert ended["state"] == "complete", ended
    assert "wrote /etc/motd" in lines[0]
    assert lines[1][:2] == ["preparing the account", "checking the groups"]
    assert lines[1][-1] == "ran useradd for user deploy", "the rest of the step's lines follow it"
    # The stored run keeps the step's output as the job's end carries it.
    stored = ended["commands"][0]["result"]["steps"][1]["output"]
    assert stored[:2] == ["preparing the account", "checking the groups"], stored


def test_the_agent_batches_a_chatty_steps_lines_and_numbers_what_it_skips() -> None:
    frames: list[dict[str, Any]] = []

    async def chatter() -> None:
        forwarder = OutputForwarder(frames.append, lambda: 0)
        for number in range(1200):  # far more than an interval forwards
            forwarder.line("c1", 0, f"line {number}", live=True)
        assert frames == [], "nothing before the interval is up"
        await asyncio.sleep(OUTPUT_INTERVAL * 2)
        forwarder.line("c1", 0, "x" * 5000, live=True)
        forwarder.line("c1", 1, "printed while the link was down", live=False)
        forwarder.line("c1", 1, "next step", live=True)
        forwarder.finished("c1")  # the job's end: what waits goes at once

    asyncio.run(chatter())
    assert [(f["step"], f["first"], len(f["lines"])) for f in frames] == [
        (0, 0, OUTPUT_FRAME_LINES), (0, 1200, 1), (1, 1, 1)]  # fmt: skip
    assert frames[0]["lines"][-1] == f"line {OUTPUT_FRAME_LINES - 1}"
    assert frames[1]["lines"] == ["x" * 1000 + " (line cut)"]
    assert all(len(line) <= OUTPUT_LINE_CHARS for frame in frames for line in frame["lines"]), "the hub takes each"
    assert all(set(frame) == {"type", "command", "step", "first", "lines"} for frame in frames)


# The hub's relay, with simulated agents


def test_output_is_relayed_live_to_a_runs_stream_and_to_run_follow(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        agent = await agents.add("web-1", "held")
        run_id, command = await started_on(hub, agents, "web-1", "one", "two")
        text = await Cli.start(hub, "run", "follow", run_id)
        lines = await Cli.start(hub, "run", "follow", run_id, "--json")
        await text.until(r"^web-1: running")
        await lines.until(r'"type": "command"')
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        async with agents.session.ws_connect(stream_url(hub, run_id), headers=headers) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "run"
            assert agent.socket is not None
            await agent.socket.send_json(output(command, 0, 0, ["first line", "<b>second</b> line"]))
            relayed = await ws.receive_json(timeout=10)
            assert relayed == {"type": "output", "host": "web-1", "command": command, "step": 0, "first": 0,
                               "lines": ["first line", "<b>second</b> line"]}  # fmt: skip
            await text.until(r"^web-1 \[1 motd\] <b>second</b> line$")
            # Sent again (an agent's repeat) it is not relayed twice; a jump in numbers is lines not sent.
            await agent.socket.send_json(output(command, 0, 0, ["first line", "<b>second</b> line", "third"]))
            await agent.socket.send_json(output(command, 1, 4, ["after a gap"]))
            assert (await ws.receive_json(timeout=10))["lines"] == ["third"]
            assert (await ws.receive_json(timeout=10))["first"] == 4
            await text.until(r"^web-1 \[2 motd\] after a gap$")
            # A follower that comes now is sent what the hub kept, from the start.
            async with agents.session.ws_connect(stream_url(hub, run_id), headers=headers) as late:
                assert (await late.receive_json(timeout=10))["type"] == "run"
                kept = [await late.receive_json(timeout=10) for _ in range(2)]
                assert [(m["step"], m["first"], m["lines"]) for m in kept] == [
                    (0, 0, ["first line", "<b>second</b> line", "third"]), (1, 4, ["after a gap"])]  # fmt: skip
            agent.release.set()
            while (await ws.receive_json(timeout=10))["type"] != "end":
                pass
        finished, followed = await text.finish(), await lines.finish()
        assert finished.status == followed.status == 0, (finished.err, followed.err)
        assert finished.out.count("web-1 [1 motd] first line\n") == 1
        assert "web-1 [1 motd] third\n" in finished.out
        assert "web-1 [2 motd] ... (4 lines not shown)\nweb-1 [2 motd] after a gap\n" in finished.out
        # At the end, each step's state; its output was said as it came, so it is not said again.
        assert "web-1: done (job 1)\n  1. motd: changed\n  2. motd: changed\nrun " in finished.out
        said = [line for line in followed.lines() if line["type"] == "output"]
        assert [(line["step"], line["first"], line["lines"]) for line in said] == [
            (0, 0, ["first line", "<b>second</b> line"]), (0, 2, ["third"]), (1, 4, ["after a gap"])]  # fmt: skip
        assert all(line["host"] == "web-1" and line["command"] == command for line in said)
        assert followed.lines()[-1]["type"] == "end"

    scenario(hub, body)


def test_a_follower_says_each_line_once_and_a_gap_as_such_however_often_the_stream_is_opened() -> None:
    said: list[str] = []
    follower = Follower(said.append)
    command = {"id": "c1", "host": "one", "state": "running", "job_id": 4, "result": None}
    run = {"id": "r1", "state": "running", "steps": [{"op": "motd"}, {"op": "user"}], "commands": [command]}
    follower.take({"type": "run", "run": run})
    chunk = {"type": "output", "host": "one", "command": "c1", "step": 1, "first": 0, "lines": ["a", "b"]}
    follower.take(chunk)
    follower.take({"type": "run", "run": run})  # opened again: the hub sends what it kept again
    follower.take({**chunk, "lines": ["a", "b", "c"]})
    follower.take({**chunk, "first": 10, "lines": ["k"]})
    steps = [{"op": "motd", "state": "unchanged", "output": ["m"]}, {"op": "user", "state": "changed", "output": ["c"]}]
    done = {**command, "state": "done", "result": {"steps": steps}}
    follower.take({"type": "end", "run": {**run, "state": "complete", "commands": [done]}})
    assert said == ["one: running (job 4)", "one [2 user] a", "one [2 user] b", "one [2 user] c",
                    "one [2 user] ... (7 lines not shown)", "one [2 user] k", "one: done (job 4)",
                    "  1. motd: unchanged", "       m", "  2. user: changed", "run r1: complete (1 done)"]  # fmt: skip


# What an agent may send


async def flooded(hub: Hub, token: str, frames: list[str]) -> list[dict[str, Any]]:
    """Send every frame on one agent link as fast as it goes (the hub may close it meanwhile); the
    errors the hub answered with before it closed."""
    errors = []
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.ws_connect(hub.agent_url, headers=headers) as link:
            assert (await link.receive_json(timeout=10))["type"] == "welcome"
            with contextlib.suppress(ConnectionError, RuntimeError):
                for frame in frames:
                    await link.send_str(frame)
            while (message := await link.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT:
                if (answer := json.loads(message.data))["type"] == "error":
                    errors.append(answer)
    return errors


def test_bad_output_frames_are_refused_a_flood_is_cut_off_and_too_many_lines_are_dropped(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        agent = await agents.add("web-1", "held")
        _, command = await started_on(hub, agents, "web-1", "one")
        await agent.close()
        token = agent.token
        for frame, error in (
            (output(command, 0, 0, ["x"] * (OUTPUT_FRAME_LINES + 1)), "output.lines: ["),
            (output(command, 0, 0, ["x" * (OUTPUT_LINE_CHARS + 1)]), "output.lines[0]: 'xxx"),
            (output(command, 0, -1, ["x"]), "output.first: -1 is less than the minimum of 0"),
            ({**output(command, 0, 0, ["x"]), "host": "db-1"}, "output: Additional properties are not allowed"),
            (output(command, 3, 0, ["x"]), "output.step: 3 is not a step of the run (it has 1)"),
        ):
            answers = await exchange(hub, token, json.dumps(frame))
            assert len(answers) == 1 and answers[0]["type"] == "error", answers
            assert answers[0]["message"].startswith(error), answers
        # Output of a command not its own in flight is dropped, and the link goes on.
        answers = await exchange(hub, token, *[json.dumps(output("0" * 32, 0, n, ["x"])) for n in range(3)])
        assert answers == [{"type": "ack", "last_event": 0}], answers
        # Lines faster than the pace are dropped (and said so in the log); the link goes on.
        many = [json.dumps(output(command, 0, n * 500, [f"line {n}.{i}" for i in range(500)])) for n in range(30)]
        assert (await exchange(hub, token, *many))[-1]["type"] == "ack"
        # Frames faster than the pace: the agent is cut off.
        flood = [json.dumps(output(command, 0, 20000 + n, ["x"])) for n in range(1000)]
        answers = await flooded(hub, token, flood)
        assert answers == [{"type": "error", "message": "output: more than 50 frames a second (bursts of 200); "
                                                        "the hub closes this connection"}], answers  # fmt: skip

    scenario(hub, body)
    log = hub.log.read_text()
    assert "agent web-1 sends output faster than 2500 lines a second: " in log and " lines dropped, not relayed" in log
    assert log.count("agent web-1 sent output of command 000000") == 1
    assert "agent web-1 sent a bad message: output: more than 50 frames a second" in log


FLOOD_HOSTS, FLOOD_FRAMES = 4, 40  # each host 40 frames of 500 lines of 1,000 characters: 84 MB in all
FLOOD_GROWTH = 32 << 20  # what the hub's resident memory may grow by (8 MiB seen), for 84 MB sent, ~1 MB kept


def test_a_flood_of_output_with_followers_that_never_read_leaves_the_hubs_memory_bounded(hub: Hub) -> None:
    async def body(agents: Agents) -> None:
        runs = []
        for host in range(FLOOD_HOSTS):
            await agents.add(f"h{host}", "held")
            runs.append(await started_on(hub, agents, f"h{host}", "x"))
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        stuck = [await agents.session.ws_connect(stream_url(hub, run_id), headers=headers) for run_id, _ in runs]
        before = hub.memory()
        line = "z" * 1000

        frames = [[json.dumps(output(runs[host][1], 0, n * 500, [line] * 500)) for n in range(FLOOD_FRAMES)]
                  for host in range(FLOOD_HOSTS)]  # fmt: skip
        for agent in agents.agents.values():
            await agent.close()  # its command stays in flight; its frames come on a link read below
        # Each host's frames, then a probe whose ack says the hub has read every frame before it.
        answers = await asyncio.gather(*(exchange(hub, agents.agents[f"h{host}"].token, *frames[host])
                                         for host in range(FLOOD_HOSTS)))  # fmt: skip
        assert answers == [[{"type": "ack", "last_event": 0}]] * FLOOD_HOSTS, answers
        after = hub.memory()
        print(f"output flood: RSS {before['VmRSS'] >> 20} -> {after['VmRSS'] >> 20} MiB, peak {after['VmHWM'] >> 20}")
        assert after["VmRSS"] - before["VmRSS"] < FLOOD_GROWTH, (before, after)
        # A follower that reads now gets what is kept: the newest lines, after a gap.
        async with agents.session.ws_connect(stream_url(hub, runs[0][0]), headers=headers) as late:
            assert (await late.receive_json(timeout=10))["type"] == "run"
            kept = await late.receive_json(timeout=10)
            assert kept["type"] == "output" and kept["first"] > 0 and len(kept["lines"]) <= HOST_LINES
        for socket in stuck:
            await socket.close()

    scenario(hub, body)
    assert hub.log.read_text().count("lines dropped, not relayed") >= FLOOD_HOSTS


def test_the_hubs_memory_for_output_is_bounded_per_host_per_run_and_in_all() -> None:
    live = LiveOutput()
    line = "y" * 1000
    for first in range(0, 3000, 500):
        live.add("r1", "one", "c1", first // 1000, first, [line] * 500, 500)
    kept = live.runs["r1"]["one"]
    assert kept.lines <= HOST_LINES and sum(len(k) for k in kept.steps.values()) == kept.lines
    fit = HOST_BYTES // (len(line) + LINE_OVERHEAD)
    assert [len(kept.steps[step]) for step in (0, 1, 2)] == [0, 0, fit], "the oldest steps' lines go first"
    watch = live.watch("r1", asyncio.Queue())
    pulled = live.pull(watch)
    assert [(m["step"], m["first"], len(m["lines"])) for m in pulled] == [(2, 3000 - fit, fit)], "the gap shows"
    assert live.pull(watch) == [], "nothing twice"
    for host in range(40):  # 40 hosts of ~256 KiB: more than a run keeps
        live.add("r2", f"h{host}", f"c{host}", 0, 0, [line] * 250, 250)
    assert live.run_bytes["r2"] <= RUN_BYTES and len(live.runs["r2"]) == 40
    for number in range(3, 20):
        for host in range(20):
            live.add(f"r{number}", f"h{host}", "c", 0, 0, [line] * 250, 250)
    assert live.total <= TOTAL_BYTES
    assert live.total == sum(live.run_bytes.values())
    assert live.total == sum(o.bytes for hosts in live.runs.values() for o in hosts.values())
    for run in list(live.runs):
        live.forget(run)
    assert live.total == 0 and not live.runs


# The runs' view


@pytest.mark.root
def test_output_grows_live_in_the_runs_view_before_the_run_ends(hub: Hub, browser: Browser, tmp_path: Path) -> None:
    with agents(hub) as fleet:
        web1 = fleet.add("web-1", ["web"])
        page, errors = logged_in(hub, browser, hub.admin_token)
        steps = [
            {"op": "motd", "params": {"text": "x"}},
            {"op": "sysctl", "params": {"settings": {"vm.swappiness": "10"}}},
        ]
        run_id = hub.api("POST", "/api/v1/runs", {"target": {"hosts": ["web-1"]}, "steps": steps})["id"]
        fleet.run(eventually(lambda: web1.commands, "web-1 has its command"))
        command = web1.commands[-1]["id"]
        fleet.run(web1.status("running", 3))
        run = page.locator(f'#runs .run[data-run="{run_id}"]')
        expect(run.locator(".badge").first).to_have_text("running")

        fleet.run(web1.send(output(command, 0, 0, ["<b>not bold</b>", "line 1"])))
        pane = run.locator('.output-step[data-step="0"] pre')
        expect(pane).to_have_text("<b>not bold</b>\nline 1\n")
        expect(run.locator(".output-row b")).to_have_count(0)  # a host's words are text, never markup
        expect(run.locator(".output-step .output-title")).to_have_text("1. motd")
        expect(run.locator(".output summary")).to_have_text("output (live)")

        # Many lines: the pane follows the newest.
        fleet.run(web1.send(output(command, 0, 2, [f"line {n}" for n in range(2, 200)])))
        expect(pane).to_contain_text("line 199")
        assert pane.evaluate("p => p.scrollHeight - p.scrollTop - p.clientHeight") < 8, "at its newest line"
        # Scrolled up by its reader, it stays where it is while lines come (and the fleet redraws).
        pane.evaluate(
            "p => new Promise((done) => { p.addEventListener('scroll', done, { once: true }); p.scrollTop = 40; })"
        )
        fleet.run(web1.send(output(command, 0, 200, [f"line {n}" for n in range(200, 260)])))
        fleet.run(web1.status("running", 3, {"steps": [{"op": "motd", "state": "changed"}]}))
        expect(pane).to_contain_text("line 259")
        expect(run.locator('tr[data-host="web-1"] .progress')).to_have_text(" 1/2")
        assert pane.evaluate("p => p.scrollTop") == 40, "where its reader left it"
        # The next step's lines, after some that never came: a pane of its own, with the gap said.
        fleet.run(web1.send(output(command, 1, 10, ["after a gap"])))
        second = run.locator('.output-step[data-step="1"] pre')
        expect(second).to_have_text("… 10 lines not shown\nafter a gap\n")
        expect(run.locator(".badge").first).to_have_text("running")
        screenshots(page, tmp_path, "run-output-live")

        # The run ends: the panes keep what they showed.
        ended = [{"op": "motd", "state": "changed", "output": ["line 259"]},
                 {"op": "sysctl", "state": "changed", "output": ["after a gap"]}]  # fmt: skip
        result = {"steps": ended, "state": "done"}
        fleet.run(web1.status("done", 3, result))
        expect(run.locator(".badge").first).to_have_text("complete")
        expect(pane).to_contain_text("not bold")
        expect(run.locator(".output summary")).to_have_text("output")
        expect(pane).to_contain_text("line 259")
        screenshots(page, tmp_path, "run-output-ended")
        assert errors == [], errors
        page.close()
