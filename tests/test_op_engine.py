"""The op engine beyond single ops: order between ops, dry runs planned in sequence on a shadow,
follow-ups recorded before the writes they follow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from daemon.errors import InvalidParams
from daemon.followups import JobFollowUps, run_owed
from daemon.store import StateStore
from ops.actions import SYSTEMD_RUNNING, FollowUp, WriteFile
from ops.base import Plan, execute
from ops.order import OrderCycle, check_declarations, check_order, sorted_order
from ops.shadow import shadow
from ops.steps import parse_steps
from ops.target import Target
from tests.daemon_fixtures import JOB, MANAGER, Rastosd, require_root
from tests.op_tree import tree_digest


def mounts() -> list[str]:
    return sorted(line.split(" ", 4)[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_order_declarations_with_a_cycle_are_refused_naming_the_ops() -> None:
    check_declarations({"firewall": ["network"], "network": []})
    with pytest.raises(OrderCycle, match=r"cycle: .*firewall.*network|cycle: .*network.*firewall"):
        check_declarations({"firewall": ["network"], "network": ["firewall"]})


def test_a_written_pipeline_keeps_its_order_and_a_wrong_one_is_refused() -> None:
    after = {"firewall": ("network",), "ssh": ("user",)}
    check_order(["network", "user", "firewall", "ssh"], after)
    with pytest.raises(InvalidParams) as refused:
        check_order(["user", "firewall", "motd", "network"], after)
    assert str(refused.value) == "steps[1].op: firewall must come after network (step 4): move it after that step"


def test_generated_steps_are_sorted_stably() -> None:
    after = {"firewall": ("network",), "ssh": ("user",)}
    names = ["ssh", "firewall", "motd", "network", "user"]
    assert [names[i] for i in sorted_order(names, after)] == ["motd", "network", "firewall", "user", "ssh"]
    assert sorted_order(["a", "b", "c"], {}) == [0, 1, 2], "no rule: the written order"


def test_motd_before_hostname_is_refused_by_the_registry(tmp_path: Path) -> None:
    steps = [{"op": "motd", "params": {"text": "hello"}}, {"op": "hostname", "params": {"hostname": "web-1"}}]
    with pytest.raises(InvalidParams, match=r"^steps\[0\]\.op: motd must come after hostname \(step 2\)"):
        parse_steps(Target(tmp_path), json.dumps(steps))


@pytest.mark.root
def test_a_shadow_shows_the_root_and_its_submounts_and_keeps_them_unchanged(rastosd: Rastosd) -> None:
    require_root()
    root, elsewhere = rastosd.scratch.root, rastosd.scratch.top / "home-volume"
    elsewhere.mkdir()
    (elsewhere / "alice").mkdir()
    (elsewhere / "alice/notes").write_text("mine\n")
    subprocess.run(["mount", "--bind", elsewhere, root / "home"], check=True)  # /home: a mount of its own
    try:
        before, mounted = tree_digest(root), mounts()
        with shadow(Target(root)) as view:
            assert view.simulated and view.root != root
            assert (view.root / "etc/hostname").read_text() == "rastos\n"
            assert (view.root / "home/alice/notes").read_text() == "mine\n", "the submount is in the shadow"
            (view.root / "etc/hostname").write_text("changed\n")
            (view.root / "home/alice/notes").write_text("changed\n")
            (view.root / "etc/new").write_text("new\n")
            assert (view.root / "etc/hostname").read_text() == "changed\n"
        assert tree_digest(root) == before, "nothing written through the shadow reached the root or /home"
        assert mounts() == mounted, "every shadow mount is gone"
    finally:
        subprocess.run(["umount", root / "home"], check=True)


@pytest.mark.root
def test_a_dry_run_plans_each_step_against_what_the_earlier_steps_leave(rastosd: Rastosd) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx deploy@ci"
    steps = [
        {"op": "user", "params": {"name": "deploy"}},
        {"op": "user", "params": {"name": "deploy", "authorized_keys": [key]}},
        {"op": "hostname", "params": {"hostname": "web-1"}},
        {"op": "hostname", "params": {"hostname": "web-1"}},
    ]
    root = rastosd.scratch.root
    before, mounted = tree_digest(root), mounts()
    path = rastosd.call(MANAGER, "RunPipeline", "st", json.dumps(steps), "1")[0]
    assert rastosd.wait_job(path) == "done"
    result = json.loads(rastosd.get(JOB, "Result", path))
    assert result["planned_in_sequence"] is True
    first, second, third, fourth = ([c["subject"] for c in s["changes"]] for s in result["steps"])
    assert first == ["user deploy"], "the account is created by step 1"
    # Step 2 sees the account step 1 made: no second useradd, only the keys in its home.
    assert second == ["/home/deploy/.ssh", "/home/deploy/.ssh/authorized_keys"]
    assert third == ["/etc/hostname", "/etc/hosts"] and fourth == [], "step 4 has nothing left to do"
    assert tree_digest(root) == before, "the dry run left the root byte-identical"
    assert mounts() == mounted, "and no mount behind"
    assert not (root / "home/deploy").exists()

    # The same steps applied for real do what the dry run said, step for step.
    path = rastosd.call(MANAGER, "RunPipeline", "st", json.dumps(steps), "0")[0]
    assert rastosd.wait_job(path) == "done"
    applied = json.loads(rastosd.get(JOB, "Result", path))
    assert [[c["subject"] for c in s.get("changes", [])] for s in applied["steps"]] == [first, second, third, fourth]
    assert [s["state"] for s in applied["steps"]] == ["changed", "changed", "changed", "unchanged"]


def test_follow_ups_are_recorded_before_the_writes_and_settled_after(tmp_path: Path) -> None:
    """On this host systemd is not init, so the follow-up is settled as skipped, after the file it
    follows was written. (The VM test runs one for real.)"""
    store = StateStore(tmp_path / "state.db")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    target = Target(root, runtime=True)
    seen: list[list[tuple[int, int | None, str, str]]] = []

    class Watching(JobFollowUps):
        def before_follow_ups(self) -> None:
            seen.append(store.owed_follow_ups())
            assert (root / "etc/demo.conf").exists(), "the writes come before the follow-ups"

    follow_up = FollowUp("reload", "rastos-demo.service")
    plan = Plan("demo", (WriteFile("/etc/demo.conf", "x\n", None), follow_up, follow_up))
    assert not SYSTEMD_RUNNING.exists(), "this test knows the outcome on a host without systemd as init"
    execute(plan, target, lambda line: None, Watching(store, 7))
    assert seen == [[(1, 7, "reload", "rastos-demo.service")]], "recorded once, owed while the files were written"
    assert store.owed_follow_ups() == []
    event = store.events(0, 10)[-1]
    assert event.method == "FollowUp" and event.job_id == 7
    assert event.detail["outcome"] == "skipped: systemd is not running here"


def test_follow_ups_a_crash_left_owed_are_settled_at_the_next_start(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.add_follow_ups(3, [("reload", "ssh.service")])
    store.close()
    reopened = StateStore(tmp_path / "state.db")
    lines = run_owed(reopened, Target(tmp_path / "scratch"))
    assert lines == ["follow-up of job 3 owed since a crash: systemctl reload ssh.service: "
                     "not run: the target is not the running system"]  # fmt: skip
    assert reopened.owed_follow_ups() == []
    assert run_owed(reopened, Target(tmp_path / "scratch")) == [], "settled once"


def test_a_shadow_plans_runtime_actions_without_making_them(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "etc").mkdir()
    with shadow(Target(tmp_path, runtime=True)) as view:
        assert view.live and not view.acts_at_runtime
        plan = Plan("demo", (WriteFile("/etc/x", "1\n", None), FollowUp("reload", "nothing.service")))
        execute(plan, view, lambda line: None)  # no systemctl runs: it would fail on this host
        assert (view.root / "etc/x").read_text() == "1\n"
    assert not (tmp_path / "etc/x").exists()
