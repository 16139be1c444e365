"""rastosd on a private system-like bus, driven by busctl (an independent client) and rastosctl."""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from daemon.boot import BootEntries, entry_id
from daemon.failpoints import SNAPSHOT_POINTS as FAILPOINTS
from daemon.failpoints import VARIABLE as FAILPOINT_VARIABLE
from ops import OP_CLASSES
from tests.daemon_fixtures import (
    ADMIN_GROUP,
    ADMIN_USER,
    BUS_NAME,
    CHECKOUT,
    JOB,
    MANAGER,
    PERMISSIVE_POLICY,
    PLAIN_USER,
    ROOT_PATH,
    SNAPSHOTS,
    PrivateBus,
    Rastosd,
    ScratchRoot,
    ensure_test_users,
    fill,
    private_bus,
    small_esp,
)

pytestmark = pytest.mark.root
UPDATES = "org.rastos.Daemon1.Updates"
HUB = "org.rastos.Daemon1.Hub"
CONTRACT = CHECKOUT / "daemon" / "bus" / "org.rastos.Daemon1.xml"
STANDARD = {
    "org.freedesktop.DBus.Peer",
    "org.freedesktop.DBus.Introspectable",
    "org.freedesktop.DBus.Properties",
    "org.freedesktop.DBus.ObjectManager",
}


def interfaces(xml: str) -> dict[str | None, Any]:
    """Interface -> its members with signatures, argument names and annotations (sd-bus's own
    Privileged annotation aside), so two introspections compare member by member."""
    result: dict[str | None, Any] = {}
    for interface in ET.fromstring(xml).findall("interface"):
        members = []
        for member in interface:
            args = tuple((a.get("name"), a.get("type"), a.get("direction")) for a in member.findall("arg"))
            notes = tuple(
                (n.get("name"), n.get("value"))
                for n in member.findall("annotation")
                if n.get("name") != "org.freedesktop.systemd1.Privileged"
            )
            members.append((member.tag, member.get("name"), member.get("type"), member.get("access"), args, notes))
        result[interface.get("name")] = sorted(members, key=str)
    return result


def apply(daemon: Rastosd, op: str, params: dict[str, Any], flags: int = 0) -> tuple[str, str]:
    path: str = daemon.call(MANAGER, "Apply", "sst", op, json.dumps(params), str(flags))[0]
    return path, daemon.wait_job(path)


def test_exports_exactly_the_interface_in_the_repository(rastosd: Rastosd) -> None:
    contract = interfaces(CONTRACT.read_text())
    root = interfaces(rastosd.busctl("introspect", "--xml-interface", BUS_NAME, ROOT_PATH).stdout)
    assert set(root) == STANDARD | {MANAGER, SNAPSHOTS, UPDATES, HUB}
    assert {name: root[name] for name in (MANAGER, SNAPSHOTS, UPDATES, HUB)} == {
        name: contract[name] for name in (MANAGER, SNAPSHOTS, UPDATES, HUB)
    }
    path, _ = apply(rastosd, "motd", {"text": "contract"})
    job = interfaces(rastosd.busctl("introspect", "--xml-interface", BUS_NAME, path).stdout)
    assert job[JOB] == contract[JOB]


def test_properties_and_read_only_methods(rastosd: Rastosd) -> None:
    assert rastosd.get(MANAGER, "Version") == "0.1.0"
    assert rastosd.get(MANAGER, "Hostname") == "rastos"
    boot = rastosd.get(MANAGER, "BootState")
    assert boot["root"] == "@" and boot["kind"] == "deployment" and boot["snapshot"] == ""
    assert boot["image_version"] == "", "this scratch root has no /usr/lib/rastos/image.json"
    ops = {name: json.loads(schema) for name, _, schema in rastosd.call(MANAGER, "ListOps")[0]}
    assert {"hostname", "sysctl", "motd", "user"} <= set(ops)
    assert ops["hostname"]["required"] == ["hostname"]
    plan = json.loads(rastosd.call(MANAGER, "Plan", "ss", "hostname", '{"hostname": "web-1"}')[0])
    assert plan["changed"] and {c["subject"] for c in plan["changes"]} == {"/etc/hostname", "/etc/hosts"}
    assert (rastosd.scratch.root / "etc/hostname").read_text() == "rastos\n", "Plan changed nothing"
    managed = json.loads(rastosd.busctl("call", BUS_NAME, ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                                        "GetManagedObjects").stdout)  # fmt: skip
    assert managed["data"] == [{}]


def test_apply_changes_the_root_leaves_snapshots_and_is_idempotent(rastosd: Rastosd) -> None:
    path, state = apply(rastosd, "hostname", {"hostname": "web-1"})
    assert state == "done"
    root = rastosd.scratch.root
    assert (root / "etc/hostname").read_text() == "web-1\n"
    assert "127.0.1.1\tweb-1" in (root / "etc/hosts").read_text()
    result = json.loads(rastosd.get(JOB, "Result", path))
    assert result["steps"][0]["state"] == "changed"
    pre, post = result["snapshots"]["pre"], result["snapshots"]["post"]
    pre_dir = rastosd.scratch.snapshots / str(pre) / "snapshot"
    assert btrfsutil.is_subvolume(pre_dir) and btrfsutil.get_subvolume_read_only(pre_dir)
    assert (pre_dir / "etc/hostname").read_text() == "rastos\n", "the pre snapshot holds the state before"
    assert (rastosd.scratch.snapshots / str(post) / "snapshot/etc/hostname").read_text() == "web-1\n"
    listed = {row[0]: row for row in rastosd.call(SNAPSHOTS, "List")[0]}
    assert listed[pre][3] == "pre" and listed[post][3] == "post" and listed[post][5] == pre
    assert rastosd.get(MANAGER, "Hostname") == "web-1"

    path, state = apply(rastosd, "hostname", {"hostname": "web-1"})
    again = json.loads(rastosd.get(JOB, "Result", path))
    assert state == "done" and again["steps"][0]["state"] == "unchanged"
    assert "snapshots" not in again, "nothing changed, so no snapshot was taken"


def test_pipeline_stops_at_the_failing_step_and_restores_files(rastosd: Rastosd) -> None:
    steps = [
        {"op": "motd", "params": {"text": "first"}},
        {"op": "user", "params": {"name": "svc", "groups": ["users"], "uid": 0 + 1500}},
        {"op": "user", "params": {"name": "clash", "uid": 1500}},  # the uid is taken: useradd fails
        {"op": "motd", "params": {"text": "never"}},
    ]
    path = rastosd.call(MANAGER, "RunPipeline", "st", json.dumps(steps), "4")[0]
    assert rastosd.wait_job(path) == "failed"
    result = json.loads(rastosd.get(JOB, "Result", path))
    assert [s["state"] for s in result["steps"]] == ["changed", "changed", "failed", "skipped"]
    assert "useradd" in result["steps"][2]["error"]
    root = rastosd.scratch.root
    assert not (root / "etc/motd").exists(), "restored: the snapshot had no motd"
    assert "svc:" not in (root / "etc/passwd").read_text(), "restored: passwd as before the pipeline"
    assert "/etc/passwd" in result["restored"] and "/etc/motd" in result["restored"]

    dry = rastosd.call(MANAGER, "RunPipeline", "st", json.dumps(steps[:2]), "1")[0]
    assert rastosd.wait_job(dry) == "done"
    planned = json.loads(rastosd.get(JOB, "Result", dry))
    assert [s["state"] for s in planned["steps"]] == ["planned", "planned"] and "snapshots" not in planned
    assert not (root / "etc/motd").exists(), "a dry run changes nothing"


def test_user_op_creates_the_account_with_keys(rastosd: Rastosd) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx alice@laptop"
    path, state = apply(rastosd, "user", {"name": "alice", "groups": ["sudo"], "authorized_keys": [key]})
    assert state == "done", rastosd.get(JOB, "Result", path)
    root = rastosd.scratch.root
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    uid = int(passwd["alice"][2])
    assert "alice" in next(line for line in (root / "etc/group").read_text().splitlines() if line.startswith("sudo:"))
    keys = root / "home/alice/.ssh/authorized_keys"
    assert key in keys.read_text() and keys.stat().st_uid == uid and keys.stat().st_mode & 0o777 == 0o600
    assert (root / "home/alice/.ssh").stat().st_uid == uid
    path, state = apply(rastosd, "user", {"name": "alice", "groups": ["sudo"], "authorized_keys": [key]})
    assert json.loads(rastosd.get(JOB, "Result", path))["steps"][0]["state"] == "unchanged"
    path, state = apply(rastosd, "user", {"name": "alice", "state": "absent"})
    assert state == "done" and "alice:" not in (root / "etc/passwd").read_text()


BAD_CALLS = [
    (MANAGER, "Plan", "ss", ["nosuch", "{}"], "UnknownOp", "op: no op named 'nosuch'"),
    (MANAGER, "Plan", "ss", ["motd", "{not json"], "InvalidArgs", "params: is not valid JSON"),
    (MANAGER, "Plan", "ss", ["motd", "[]"], "InvalidArgs", "params: must be a JSON object"),
    (MANAGER, "Plan", "ss", ["motd", '{"txt": "x"}'], "InvalidArgs", "params.txt: unknown parameter (did you mean"),
    (MANAGER, "Plan", "ss", ["hostname", '{"hostname": "Bad Name"}'], "InvalidArgs", "params.hostname:"),
    (MANAGER, "Plan", "ss", ["user", '{"name": "x", "uid": "7"}'], "InvalidArgs", "params.uid: must be an integer"),
    (MANAGER, "Plan", "ss", ["user", '{"name": "x", "groups": ["nogroup9"]}'], "InvalidArgs", "params.groups[0]:"),
    (MANAGER, "Plan", "ss", ["sysctl", '{"settings": {"vm": "1"}}'], "InvalidArgs", "params.settings.vm:"),
    (MANAGER, "Apply", "sst", ["motd", '{"text": "x"}', "8"], "InvalidArgs", "flags: unknown bits 0x8"),
    (MANAGER, "Apply", "sst", ["motd", "{}", "0"], "InvalidArgs", "params.text: is required"),
    (MANAGER, "RunPipeline", "st", ["{}", "0"], "InvalidArgs", "steps: must be a non-empty JSON list"),
    (MANAGER, "RunPipeline", "st", ["[]", "0"], "InvalidArgs", "steps: must be a non-empty JSON list"),
    (MANAGER, "RunPipeline", "st", ['[{"op": "motd", "params": {"text": "a"}}, {"op": "motd", "params": {}}]', "0"],
     "InvalidArgs", "steps[1].params.text: is required"),
    (MANAGER, "RunPipeline", "st", ['[{"op": "motd", "parms": {}}]', "0"], "InvalidArgs", "steps[0].parms: unknown"),
    (MANAGER, "RunPipeline", "st", ['[{"op": 7}]', "0"], "InvalidArgs", "steps[0].op: must be the name of an op"),
    (MANAGER, "GetJob", "u", ["999"], "NoSuchJob", "id: no job 999"),
    (MANAGER, "GetEventLog", "tu", ["0", "0"], "InvalidArgs", "limit: must be between 1 and 10000"),
    (SNAPSHOTS, "Create", "s", [""], "InvalidArgs", "description: must be 1 to 200 characters"),
    (SNAPSHOTS, "Create", "s", ["two\nlines"], "InvalidArgs", "description: must be one line"),
    (SNAPSHOTS, "Delete", "u", ["999"], "NoSuchSnapshot", "snapshot 999 does not exist"),
    (SNAPSHOTS, "Rollback", "u", ["999"], "NoSuchSnapshot", "snapshot 999 does not exist"),
]  # fmt: skip


def test_bad_arguments_get_named_errors_and_change_nothing(rastosd: Rastosd) -> None:
    before = sorted(str(p) for p in rastosd.scratch.top.rglob("*"))
    for interface, method, signature, args, error, message in BAD_CALLS:
        text = rastosd.call_error(interface, method, signature, *args)
        assert message in text, f"{method}{tuple(args)}: {text}"
        # busctl prints the message only; gdbus shows the error's name as well.
        name = f"org.freedesktop.DBus.Error.{error}" if error == "InvalidArgs" else f"org.rastos.Daemon1.Error.{error}"
        typed = [f"uint64 {a}" if kind == "t" else a for kind, a in zip(signature, args, strict=True)]
        named = rastosd.gdbus(interface, method, *typed)
        assert f"GDBus.Error:{name}: {message}" in named.stderr, f"{method}{tuple(args)}: {named.stderr}"
    assert sorted(str(p) for p in rastosd.scratch.top.rglob("*")) == before
    assert rastosd.call(MANAGER, "ListJobs")[0] == [], "no job was created by a refused call"
    ctl = rastosd.ctl("plan", "motd", "txt=x")
    assert ctl.returncode == 1
    assert ctl.stderr.strip() == (
        "rastosctl: org.freedesktop.DBus.Error.InvalidArgs: params.txt: unknown parameter (did you mean 'text'?)"
    )
    assert "org.rastos.Daemon1.Error.NoSuchSnapshot" in rastosctl_error(rastosd, "snapshot", "delete", "999")
    path, _ = apply(rastosd, "motd", {"text": "x"})
    cancel = rastosd.busctl("call", BUS_NAME, path, JOB, "Cancel", check=False)
    assert cancel.returncode != 0 and "already done" in cancel.stderr


def rastosctl_error(daemon: Rastosd, *args: str) -> str:
    result = daemon.ctl(*args)
    assert result.returncode == 1, result
    return result.stderr


def test_rastosctl_commands(rastosd: Rastosd, tmp_path: Path) -> None:
    status = json.loads(rastosd.ctl("--json", "status").stdout)
    assert status["hostname"] == "rastos" and status["boot"]["root"] == "@"
    assert "hostname" in rastosd.ctl("ops").stdout
    assert "params" not in rastosd.ctl("ops", "user").stdout and "authorized_keys" in rastosd.ctl("ops", "user").stdout
    plan = rastosd.ctl("plan", "motd", "text=hello")
    assert plan.returncode == 0 and "+hello" in plan.stdout
    applied = rastosd.ctl("apply", "motd", "text=hello")
    assert applied.returncode == 0 and "step 1: motd changed" in applied.stdout, applied
    assert "wrote /etc/motd" in applied.stdout, "the job's output is followed"
    pipeline = tmp_path / "site.toml"
    pipeline.write_text('[[step]]\nop = "motd"\nparams = { text = "from toml" }\n'
                        '[[step]]\nop = "sysctl"\nparams = { settings = { "vm.swappiness" = "10" } }\n')  # fmt: skip
    ran = rastosd.ctl("--json", "pipeline", "run", str(pipeline))
    assert ran.returncode == 0, ran
    assert [s["state"] for s in json.loads(ran.stdout)["steps"]] == ["changed", "changed"]
    assert (rastosd.scratch.root / "etc/sysctl.d/90-rastos.conf").read_text().endswith("vm.swappiness = 10\n")
    jobs = json.loads(rastosd.ctl("--json", "jobs").stdout)
    assert [j["state"] for j in jobs] == ["done", "done"]
    created = json.loads(rastosd.ctl("--json", "snapshot", "create", "before the upgrade").stdout)["id"]
    listed = json.loads(rastosd.ctl("--json", "snapshot", "list").stdout)
    assert {"id": created, "kind": "manual", "description": "before the upgrade"}.items() <= next(
        s for s in listed if s["id"] == created
    ).items()
    assert rastosd.ctl("snapshot", "delete", str(created)).returncode == 0
    assert not (rastosd.scratch.snapshots / str(created)).exists()
    log = json.loads(rastosd.ctl("--json", "log").stdout)
    assert [e["method"] for e in log if e["method"] in ("Create", "Delete")] == ["Create", "Delete"]
    failed = rastosd.ctl("apply", "user", "name=x", "uid=0")
    assert failed.returncode == 1 and "params.uid: must be at least 1" in failed.stderr


def test_rollback_makes_a_boot_entry_and_delete_removes_it(rastosd: Rastosd) -> None:
    _, _ = apply(rastosd, "motd", {"text": "v2"})
    pre = min(row[0] for row in rastosd.call(SNAPSHOTS, "List")[0])
    entry = rastosd.call(SNAPSHOTS, "Rollback", "u", str(pre))[0]
    assert entry == f"rastos-snapshot-{pre}.conf"
    esp = rastosd.scratch.esp / "loader"
    text = (esp / f"entries/rastos-snapshot-{pre}+3.conf").read_text()
    assert f"rootflags=subvol=@snapshots/{pre}/deployment" in text and "linux /rastos/vmlinuz" in text
    # It boots next by order (systemd-boot sorts by sort-key), the running entry right after it.
    assert "sort-key rastos-1\n" in text
    assert "sort-key rastos-2\n" in (esp / "entries/rastos-0.conf").read_text()
    assert (esp / "loader.conf").read_text() == "timeout 0\n", "no entry is named the default"
    deployment = rastosd.scratch.snapshots / str(pre) / "deployment"
    assert btrfsutil.is_subvolume(deployment) and not btrfsutil.get_subvolume_read_only(deployment)
    assert (rastosd.scratch.root / "etc/motd").read_text() == "v2\n", "the running root is untouched"
    assert (esp / f"entries/readonly-snapshot-{pre}.conf").is_file(), "the read-only entry stays"
    rastosd.call(SNAPSHOTS, "Delete", "u", str(pre))
    post = pre + 1  # the post snapshot stays, with its read-only entry
    names = sorted(p.name for p in (esp / "entries").iterdir())
    assert names == ["rastos-0.conf", f"readonly-snapshot-{post}.conf"]


def test_a_snapshot_without_entries_rolls_back_with_the_running_kernel(rastosd: Rastosd) -> None:
    """The snapshot's read-only entry says which kernel it was taken with; with no entry of its own
    left (one removed by hand) the running entry's is the only guess, and the log says so."""
    snapshot = rastosd.call(SNAPSHOTS, "Create", "s", "its entry removed")[0]
    entries = rastosd.scratch.esp / "loader/entries"
    (entries / f"readonly-snapshot-{snapshot}.conf").unlink()
    rastosd.call(SNAPSHOTS, "Rollback", "u", str(snapshot))
    lines = (entries / f"rastos-snapshot-{snapshot}+3.conf").read_text().splitlines()
    assert "linux /rastos/vmlinuz" in lines and "initrd /rastos/initrd.img" in lines, lines
    assert f"snapshot {snapshot} has no boot entry to tell its kernel" in rastosd.log_text()


def test_every_snapshot_is_in_the_boot_menu_read_only(rastosd: Rastosd) -> None:
    """Each snapshot gets an uncounted entry that boots it read-only under an overlay, listed after the
    deployments and never matched by `default rastos-*`; it goes when the snapshot goes."""
    snapshot = rastosd.call(SNAPSHOTS, "Create", "s", "before the upgrade")[0]
    entries = rastosd.scratch.esp / "loader/entries"
    text = (entries / f"readonly-snapshot-{snapshot}.conf").read_text()
    lines = text.splitlines()
    assert lines[0].startswith(f"title rastOS snapshot {snapshot} of ") and lines[0].endswith(
        ", read-only: before the upgrade"
    ), lines[0]
    assert "sort-key rastos-4" in lines and "linux /rastos/vmlinuz" in lines
    options = next(line for line in lines if line.startswith("options ")).split()[1:]
    assert options == [
        "root=UUID=0", "quiet", f"rootflags=subvol=@snapshots/{snapshot}/snapshot",
        "ro", "rastos.overlay", "systemd.mask=systemd-remount-fs.service",
    ]  # fmt: skip
    # A rollback made from it is a normal writable deployment again, whichever entry it copies.
    rastosd.call(SNAPSHOTS, "Rollback", "u", str(snapshot))
    deployment = (entries / f"rastos-snapshot-{snapshot}+3.conf").read_text()
    assert " rw" in deployment and "rastos.overlay" not in deployment and " ro " not in deployment
    rastosd.call(SNAPSHOTS, "Delete", "u", str(snapshot))
    assert sorted(p.name for p in entries.iterdir()) == ["rastos-0.conf"]


def test_boot_once_needs_an_admin_a_snapshot_and_a_boot_loader(rastosd: Rastosd) -> None:
    """The one-shot boot itself is a real VM's (qemu-tests/test_rollback.py); here: the refusals, and
    that bootctl's own failure (no EFI here) reaches the caller as a BootConfig error."""
    snapshot = rastosd.call(SNAPSHOTS, "Create", "s", "one-shot")[0]
    missing = rastosd.gdbus(SNAPSHOTS, "BootOnce", "999")
    assert "org.rastos.Daemon1.Error.NoSuchSnapshot" in missing.stderr, missing.stderr
    denied = rastosd.gdbus(SNAPSHOTS, "BootOnce", str(snapshot), user=PLAIN_USER)
    assert "org.freedesktop.DBus.Error.AccessDenied" in denied.stderr, denied.stderr
    failed = rastosd.gdbus(SNAPSHOTS, "BootOnce", str(snapshot))
    assert "org.rastos.Daemon1.Error.BootConfig" in failed.stderr, failed.stderr
    assert f"cannot make readonly-snapshot-{snapshot}.conf the next boot's entry" in failed.stderr, failed.stderr
    cli = rastosctl_error(rastosd, "snapshot", "boot-once", "999")
    assert "org.rastos.Daemon1.Error.NoSuchSnapshot" in cli


def test_a_read_only_snapshot_boot_says_so_and_takes_no_snapshots(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path],
) -> None:
    """Booted from a snapshot's read-only entry (its subvolume under an overlay), the daemon names
    that snapshot in BootState and refuses to snapshot a root whose changes live in memory."""
    bus, scratch, state_dir = daemon_env
    seed = Rastosd(bus, scratch, state_dir)
    seed.start()
    try:
        snapshot = seed.call(SNAPSHOTS, "Create", "s", "seed")[0]
    finally:
        seed.stop()
    cmdline = f"root=UUID=0 rootflags=subvol=@snapshots/{snapshot}/snapshot ro rastos.overlay quiet"
    daemon = Rastosd(bus, scratch, state_dir, extra=["--kernel-cmdline", cmdline])
    daemon.start()
    try:
        boot = daemon.get(MANAGER, "BootState")
        assert boot["kind"] == "snapshot" and boot["snapshot"] == str(snapshot), boot
        assert boot["root"] == f"@snapshots/{snapshot}/snapshot", boot
        refused = daemon.gdbus(SNAPSHOTS, "Create", "'from memory'").stderr
        assert "org.rastos.Daemon1.Error.SnapshotsUnavailable" in refused, refused
        assert f"runs the read-only snapshot @snapshots/{snapshot}/snapshot under an overlay" in refused, refused
        assert [row[0] for row in daemon.call(SNAPSHOTS, "List")[0]] == [snapshot], "the list still works"
    finally:
        daemon.stop()


def test_mark_good_protects_the_last_good_snapshot(rastosd: Rastosd) -> None:
    snapshot = rastosd.call(SNAPSHOTS, "Create", "s", "known good")[0]
    rastosd.call(SNAPSHOTS, "MarkGood")
    assert rastosd.get(MANAGER, "BootState")["health"] == "good"
    text = rastosd.call_error(SNAPSHOTS, "Delete", "u", str(snapshot))
    assert "kept: it is the last known-good snapshot" in text
    assert (rastosd.scratch.snapshots / str(snapshot) / "snapshot").is_dir()


def test_concurrent_applies_run_one_at_a_time(rastosd: Rastosd) -> None:
    texts = [f"writer {n}" for n in range(8)]
    paths: list[str] = []
    lock = threading.Lock()

    def submit(text: str) -> None:
        path = rastosd.call(MANAGER, "Apply", "sst", "motd", json.dumps({"text": text}), "2")[0]
        with lock:
            paths.append(path)

    threads = [threading.Thread(target=submit, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == len(texts)
    for path in paths:
        assert rastosd.wait_job(path) == "done"
    jobs = sorted((rastosd.job(int(p.rsplit("/", 1)[1])) for p in paths), key=lambda j: j["started"])
    for earlier, later in itertools.pairwise(jobs):
        assert earlier["finished"] <= later["started"], "two jobs overlapped"
    assert (rastosd.scratch.root / "etc/motd").read_text() == jobs[-1]["steps"][0]["params"]["text"] + "\n"


def test_sigkill_during_a_job_marks_it_interrupted_and_keeps_the_log(rastosd: Rastosd) -> None:
    steps = [{"op": "user", "params": {"name": f"load{n}"}} for n in range(120)]
    path = rastosd.call(MANAGER, "RunPipeline", "st", json.dumps(steps), "0")[0]
    deadline = time.monotonic() + 60
    while rastosd.get(JOB, "Progress", path)[0] < 3:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    events_before = rastosd.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]
    assert rastosd.stop(signal.SIGKILL) == -signal.SIGKILL
    rastosd.start()
    job_id = int(path.rsplit("/", 1)[1])
    job = rastosd.job(job_id)
    assert job["state"] == "interrupted"
    states = [step["state"] for step in job["steps"]]
    assert states[0] == "changed" and "interrupted" in states and states.count("changed") < len(steps)
    events_after = rastosd.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]
    assert events_after[: len(events_before)] == events_before, "nothing recorded before the kill was lost"
    assert any(e[3] == "JobInterrupted" and e[4] == job_id for e in events_after)
    assert rastosd.call(MANAGER, "ListJobs")[0][0][2] == "interrupted"
    _, state = apply(rastosd, "motd", {"text": "after the crash"})
    assert state == "done", "the restarted daemon works"


@pytest.fixture
def permissive(daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path) -> Any:
    """rastosd on a bus whose policy lets anyone call anything, configured with a test admin group."""
    ensure_test_users()
    _, scratch, state_dir = daemon_env
    config = tmp_path / "daemon.toml"
    config.write_text(f'[access]\nadmin_group = "{ADMIN_GROUP}"\n')
    with private_bus(PERMISSIVE_POLICY) as bus:
        daemon = Rastosd(bus, scratch, state_dir, config)
        daemon.start()
        yield daemon
        daemon.stop()


def test_without_polkit_an_unprivileged_user_may_read_but_not_change(rastosd: Rastosd) -> None:
    """No polkit on this bus: rastosd's own check is in force, and its log says so at start. The bus
    policy lets the calls through (as the shipped one does); the daemon refuses them."""
    ensure_test_users()
    assert "access: polkit is not on this bus: root and members of group 'rastos' may change the host" in (
        rastosd.log_text()
    )
    read = rastosd.busctl("get-property", BUS_NAME, ROOT_PATH, MANAGER, "Version", user=PLAIN_USER)
    assert json.loads(read.stdout)["data"] == "0.1.0"
    listed = rastosd.busctl("call", BUS_NAME, ROOT_PATH, MANAGER, "ListOps", user=PLAIN_USER)
    assert "hostname" in listed.stdout
    for interface, method, args in (
        (MANAGER, "Apply", ["motd", '{"text": "x"}', "uint64 0"]),
        (SNAPSHOTS, "MarkGood", []),
    ):
        refused = rastosd.gdbus(interface, method, *args, user=PLAIN_USER)
        assert (
            f"GDBus.Error:org.freedesktop.DBus.Error.AccessDenied: {method} changes the host: "
            "only root or members of group 'rastos' may call it"
        ) in refused.stderr, refused.stderr
    assert not (rastosd.scratch.root / "etc/motd").exists()
    assert rastosd.get(MANAGER, "BootState")["health"] != "good", "MarkGood was refused"


def test_the_daemon_refuses_mutations_even_under_a_loose_policy(permissive: Rastosd) -> None:
    refused = permissive.gdbus(MANAGER, "Apply", "motd", '{"text": "x"}', "uint64 0", user=PLAIN_USER)
    assert refused.returncode != 0
    assert (
        "org.freedesktop.DBus.Error.AccessDenied: Apply changes the host: "
        f"only root or members of group '{ADMIN_GROUP}' may call it"
    ) in refused.stderr
    refused = permissive.gdbus(SNAPSHOTS, "Create", "mine", user=PLAIN_USER)
    assert "AccessDenied: Create changes the host" in refused.stderr
    assert not (permissive.scratch.root / "etc/motd").exists()
    allowed = permissive.busctl(
        "call", BUS_NAME, ROOT_PATH, MANAGER, "Apply", "sst", "motd", '{"text": "by an admin"}', "0", user=ADMIN_USER
    )
    path = json.loads(allowed.stdout)["data"][0]
    assert permissive.wait_job(path) == "done"
    uid = int(subprocess.run(["id", "-u", ADMIN_USER], capture_output=True, text=True, check=True).stdout)
    events = permissive.call(MANAGER, "GetEventLog", "tu", "0", "100")[0]
    assert any(e[3] == "Apply" and e[2] == uid for e in events), "the event log names the caller's uid"


def test_unexpected_errors_reach_the_caller_without_a_traceback(rastosd: Rastosd) -> None:
    # A root whose /etc/passwd is a directory makes the user op's fact reading fail in a way no op
    # expects (IsADirectoryError): the caller must get a short message, the journal the traceback.
    passwd = rastosd.scratch.root / "etc/passwd"
    passwd.rename(passwd.with_name("passwd.moved"))
    passwd.mkdir()
    text = rastosd.call_error(MANAGER, "Plan", "ss", "user", '{"name": "bob"}')
    assert "internal error in rastosd (IsADirectoryError)" in text
    assert "Traceback" not in text and str(rastosd.scratch.root) not in text
    assert "Traceback" in rastosd.log_text()
    assert rastosd.get(MANAGER, "Version") == "0.1.0", "the daemon lives on"


def test_sd_notify_ready_and_clean_stop(daemon_env: tuple[PrivateBus, ScratchRoot, Path]) -> None:
    bus, scratch, state_dir = daemon_env
    daemon = Rastosd(bus, scratch, state_dir)
    daemon.start()  # returns only after READY=1 arrived on the notify socket
    owner = daemon.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "GetNameOwner", "s", BUS_NAME)  # fmt: skip
    assert json.loads(owner.stdout)["data"][0].startswith(":")
    assert daemon.stop(signal.SIGTERM) == 0
    assert (state_dir / "state.db").is_file()


def test_the_op_modules_load_at_the_first_call_that_needs_them_not_at_start(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path],
) -> None:
    """On a small VM's boot, rastosd's start is what an admin waits for: it imports no op module until a
    call needs the registry (the import system's own log, PYTHONVERBOSE, says what was imported when)."""
    bus, scratch, state_dir = daemon_env
    daemon = Rastosd(bus, scratch, state_dir, env={"PYTHONVERBOSE": "1"})
    daemon.start()
    try:
        op_modules = {module for module, _ in OP_CLASSES.values()}

        def imported() -> set[str]:
            return set(re.findall(r"^import '([\w.]+)'", daemon.log_text(), re.MULTILINE))

        assert "ops.base" in imported(), "the import log is there (the engine itself loads at start)"
        assert imported() & op_modules == set()
        assert len(daemon.call(MANAGER, "ListOps")[0]) == len(OP_CLASSES)
        assert imported() >= op_modules
    finally:
        assert daemon.stop() == 0


# Loaded into rastosd through sitecustomize: every read of the ESP (a listing or an open under it) waits
# until the test lets it go, as a read of an ESP automount waits for its device at boot.
SLOW_ESP_HOOK = """
import os, sys, time
esp, touched, release = os.environ["SLOW_ESP"], os.environ["SLOW_ESP_TOUCHED"], os.environ["SLOW_ESP_RELEASE"]
def hook(event, args):
    if event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
        if (path == esp or path.startswith(esp + "/")) and not os.path.exists(release):
            os.close(os.open(touched, os.O_CREAT | os.O_WRONLY))
            while not os.path.exists(release):
                time.sleep(0.02)
sys.addaudithook(hook)
"""


def test_rastosd_answers_on_the_bus_before_it_reads_the_esp(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    """At boot the ESP is an automount whose device udev announces late: rastosd takes its name and
    answers reads first, and what needs the ESP (the fallback, the staged update, READY=1) follows."""
    bus, scratch, state_dir = daemon_env
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SLOW_ESP_HOOK)
    touched, release = tmp_path / "esp-touched", tmp_path / "esp-release"
    env = {"SLOW_ESP": str(scratch.esp), "SLOW_ESP_TOUCHED": str(touched), "SLOW_ESP_RELEASE": str(release)}
    daemon = Rastosd(bus, scratch, state_dir, env=env, wrapper=["env", f"PYTHONPATH={hook_dir}:{CHECKOUT}"])
    starting = threading.Thread(target=daemon.start)
    starting.start()
    try:
        deadline = time.monotonic() + 30
        while not touched.exists():
            assert time.monotonic() < deadline, f"rastosd never read the ESP:\n{daemon.log_text()}"
            time.sleep(0.05)
        assert daemon.call(MANAGER, "ListJobs") == [[]], "a read is answered while the ESP is not there"
        assert starting.is_alive(), "no READY=1 before the ESP was read"
    finally:
        release.touch()
        starting.join(60)
    assert daemon.process is not None and daemon.process.poll() is None
    status = json.loads(daemon.call(UPDATES, "GetStatus")[0])
    assert status["staged_version"] == ""
    assert daemon.stop() == 0


def test_rastosd_reads_nothing_of_the_host_before_the_bus_first_answers(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    """At boot rastosd starts beside sysinit.target's work, and the bus (dbus.service, after
    basic.target) answers only once that work is done: its first message goes out before it opens its
    state or reads anything of the host. A bus of the test's own that takes the connection and holds
    the first message shows the point: sd-bus sends that message (Hello) at the event loop's first turn."""
    bus, scratch, state_dir = daemon_env
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.bind(str(tmp_path / "held-bus"))
        held.listen(1)
        held.settimeout(60)
        daemon = Rastosd(bus, scratch, state_dir)
        daemon.launch({}, bus_address=f"unix:path={tmp_path / 'held-bus'}")
        try:
            connection, _ = held.accept()
            with connection:
                connection.settimeout(60)
                said = b""
                while b"BEGIN\r\n" not in said:  # sd-bus sends its whole side of the authentication at once
                    said += connection.recv(4096) or pytest.fail(f"no authentication: {said!r}")
                # dbus-daemon's answers to AUTH EXTERNAL with no initial response, DATA and NEGOTIATE_UNIX_FD
                connection.sendall(b"DATA\r\nOK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n")
                message = said.split(b"BEGIN\r\n", 1)[1]
                while b"Hello" not in message:
                    message += connection.recv(4096) or pytest.fail(f"no Hello:\n{daemon.log_text()}")
                assert not state_dir.exists(), "rastosd opened its state before the bus answered"
                assert daemon.process is not None and daemon.process.poll() is None
        finally:
            assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def slow_pipeline(count: int) -> str:
    """Steps that each run useradd: slow enough to act on a job while it runs."""
    return json.dumps([{"op": "user", "params": {"name": f"slow{n}"}} for n in range(count)])


def slow_job_and_a_queued_one(rastosd: Rastosd) -> tuple[str, str]:
    """A pipeline that has run a few of its 80 slow steps, and a job queued behind it."""
    running = rastosd.call(MANAGER, "RunPipeline", "st", slow_pipeline(80), "0")[0]
    queued = rastosd.call(MANAGER, "Apply", "sst", "motd", '{"text": "queued"}', "0")[0]
    deadline = time.monotonic() + 60
    while rastosd.get(JOB, "Progress", running)[0] < 2:
        assert time.monotonic() < deadline, "the pipeline made no progress"
        time.sleep(0.05)
    return running, queued


def test_cancel_stops_a_running_job_between_steps_and_a_queued_one_at_once(rastosd: Rastosd) -> None:
    running, queued = slow_job_and_a_queued_one(rastosd)
    rastosd.busctl("call", BUS_NAME, queued, JOB, "Cancel")
    assert rastosd.get(JOB, "State", queued) == "cancelled", "a queued job ends at once"
    rastosd.busctl("call", BUS_NAME, running, JOB, "Cancel")
    assert rastosd.wait_job(running) == "cancelled"
    result = json.loads(rastosd.get(JOB, "Result", running))
    states = [step["state"] for step in result["steps"]]
    assert states[0] == "changed" and states[-1] == "skipped" and "failed" not in states
    changed = states.count("changed")
    passwd = (rastosd.scratch.root / "etc/passwd").read_text()
    created = sum(line.startswith("slow") for line in passwd.splitlines())
    assert created == changed, "every step that began ran to its end, no later one ran"
    assert "post" in [row[3] for row in rastosd.call(SNAPSHOTS, "List")[0]], "a post snapshot closes the pair"
    assert not (rastosd.scratch.root / "etc/motd").exists(), "the cancelled queued job never ran"


def test_retention_keeps_the_newest_pairs_and_the_known_good_snapshot(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    bus, scratch, state_dir = daemon_env
    config = tmp_path / "daemon.toml"
    config.write_text("[snapshots]\nkeep_pairs = 2\n")
    daemon = Rastosd(bus, scratch, state_dir, config)
    daemon.start()
    try:
        apply(daemon, "motd", {"text": "one"})
        daemon.call(SNAPSHOTS, "MarkGood")  # the post snapshot of job 1 becomes the last known-good
        for text in ("two", "three", "four"):
            apply(daemon, "motd", {"text": text})
        rows = daemon.call(SNAPSHOTS, "List")[0]
        kinds = {row[0]: (row[3], row[6]) for row in rows}
        assert kinds == {2: ("post", True), 5: ("pre", False), 6: ("post", False), 7: ("pre", False),
                         8: ("post", False)}, kinds  # fmt: skip
        assert sorted(int(p.name) for p in scratch.snapshots.iterdir()) == sorted(kinds)
    finally:
        daemon.stop()


def test_changes_are_signalled(rastosd: Rastosd) -> None:
    """PropertiesChanged for Hostname and a job's State, JobNew and JobRemoved, seen by a subscriber."""
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", rastosd.bus.address, "--dest", BUS_NAME],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        bufsize=1,
    )  # fmt: skip
    assert monitor.stdout is not None
    try:
        assert "Monitoring signals" in monitor.stdout.readline()
        time.sleep(0.3)  # the match rule reaches the bus
        path, _ = apply(rastosd, "hostname", {"hostname": "signalled"})
        seen: list[str] = []
        deadline = time.monotonic() + 30
        wanted = ("Manager.JobNew", "Manager.JobRemoved", "'Hostname': <'signalled'>", "'State': <'done'>")
        while not all(any(w in line for line in seen) for w in wanted):
            assert time.monotonic() < deadline, "\n".join(seen)
            seen.append(monitor.stdout.readline())
    finally:
        monitor.terminate()
        monitor.wait()
    assert any(path in line and "Job.Completed" in line for line in seen)


def test_sigterm_lets_the_running_step_finish_and_records_the_end(rastosd: Rastosd) -> None:
    running, queued = slow_job_and_a_queued_one(rastosd)
    assert rastosd.stop(signal.SIGTERM) == 0
    rastosd.start()
    stopped = rastosd.job(int(running.rsplit("/", 1)[1]))
    assert stopped["state"] == "cancelled", "a stop is recorded as such, not found later as interrupted"
    assert {step["state"] for step in stopped["steps"]} == {"changed", "skipped"}
    assert rastosd.job(int(queued.rsplit("/", 1)[1]))["state"] == "cancelled"
    assert not any(e[3] == "JobInterrupted" for e in rastosd.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0])


def test_a_fallback_boot_is_reported_once(daemon_env: tuple[PrivateBus, ScratchRoot, Path]) -> None:
    """The entry ordered first used up its tries (`+0-3`), and systemd-boot booted the one after it."""
    bus, scratch, state_dir = daemon_env
    entries = scratch.esp / "loader" / "entries"
    (entries / "rastos-snapshot-4+0-3.conf").write_text(
        "title broken\nsort-key rastos-1\nlinux /rastos/vmlinuz\n"
        "options root=UUID=0 rootflags=subvol=@snapshots/4/deployment rw\n"
    )
    daemon = Rastosd(bus, scratch, state_dir, extra=["--booted-entry", "rastos-0.conf"])
    daemon.start()
    try:
        boot = daemon.get(MANAGER, "BootState")
        assert boot["kind"] == "fallback" and boot["entry"] == "rastos-0.conf"
        assert boot["failed_entry"] == "rastos-snapshot-4.conf" and boot["failed_root"] == "@snapshots/4/deployment"
        daemon.stop()
        daemon.start()  # the same boot: recorded once
        events = [e for e in daemon.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "BootFallback"]
        assert len(events) == 1 and json.loads(events[0][5])["failed_entry"] == "rastos-snapshot-4.conf"
        assert daemon.call(MANAGER, "CheckHealth")[0] == []
    finally:
        daemon.stop()


def test_entries_come_and_go_with_their_snapshots(rastosd: Rastosd) -> None:
    """Many rollbacks leave one small entry each and no kernel copy; deleting the snapshots empties the
    ESP of them again, so it cannot fill up with entries of snapshots that are gone."""
    esp = rastosd.scratch.esp
    before = {p.relative_to(esp): p.read_bytes() for p in esp.rglob("*") if p.is_file()}
    ids = [rastosd.call(SNAPSHOTS, "Create", "s", f"state {n}")[0] for n in range(40)]
    for snapshot in ids:
        rastosd.call(SNAPSHOTS, "Rollback", "u", str(snapshot))
    entries = sorted(p.name for p in (esp / "loader/entries").iterdir())
    deployments = [name for name in entries if name.startswith("rastos-snapshot-")]
    assert len(deployments) == 40 and all(name.endswith("+3.conf") for name in deployments)
    assert len([name for name in entries if name.startswith("readonly-snapshot-")]) == 40
    size = sum(p.stat().st_size for p in esp.rglob("*") if p.is_file())
    assert size - sum(len(b) for b in before.values()) < 80 * 512, "entries only: kernels are shared"
    first = [p for p in (esp / "loader/entries").iterdir() if "sort-key rastos-1\n" in p.read_text()]
    assert [p.name for p in first] == [f"rastos-snapshot-{ids[-1]}+3.conf"], "only the newest boots next"
    for snapshot in ids:
        rastosd.call(SNAPSHOTS, "Delete", "u", str(snapshot))
    assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == ["rastos-0.conf"]
    assert sorted(p.name for p in rastosd.scratch.snapshots.iterdir()) == []


def assert_consistent(daemon: Rastosd) -> list[int]:
    """Snapshots, deployments, boot entries and the state store agree; returns the snapshot ids."""
    listed = [row[0] for row in daemon.call(SNAPSHOTS, "List")[0]]
    snapshots = daemon.scratch.snapshots
    entries = daemon.scratch.esp / "loader" / "entries"
    names = sorted(p.name for p in entries.iterdir())
    assert not [name for name in names if name.startswith(".")], f"temporary files left: {names}"
    on_disk = sorted(int(p.name) for p in snapshots.iterdir() if (p / "snapshot").is_dir())
    assert on_disk == listed, "every snapshot on disk is in the store and the reverse"
    for snapshot in listed:
        assert f"readonly-snapshot-{snapshot}.conf" in names, f"snapshot {snapshot} has its menu entry"
        deployed = [f"@snapshots/{snapshot}/{p.name}" for p in (snapshots / str(snapshot)).glob("deployment*")]
        counted = [name for name in names if entry_id(name) == f"rastos-snapshot-{snapshot}.conf"]
        assert len(deployed) <= 1, f"snapshot {snapshot}: one rollback deployment at most, not {deployed}"
        booted = [BootEntries(daemon.scratch.esp, 3).root_of(entries / name) for name in counted]
        assert booted == deployed, f"snapshot {snapshot}: a deployment exactly when an entry boots it"
    for name in names:
        if "snapshot-" in name:
            assert int(name.split("snapshot-")[1].split("+")[0].split(".")[0]) in listed, name
    return listed


@pytest.mark.parametrize("point", FAILPOINTS)
def test_a_crash_between_two_steps_is_repaired_at_the_next_start(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], point: str
) -> None:
    """The daemon is killed (SIGKILL) at each point between the steps of Create and Rollback; the next
    start leaves snapshots, deployments, entries and the store in agreement, and Rollback works again.
    (qemu-tests/test_power_cut.py cuts a whole VM's power at the same points.)"""
    bus, scratch, state_dir = daemon_env
    daemon = Rastosd(bus, scratch, state_dir, env={FAILPOINT_VARIABLE: point})
    daemon.start()
    if point == "snapshot-written":
        stuck = ["call", BUS_NAME, ROOT_PATH, SNAPSHOTS, "Create", "s", "cut"]
    else:
        daemon.call(SNAPSHOTS, "Create", "s", "base")
        stuck = ["call", BUS_NAME, ROOT_PATH, SNAPSHOTS, "Rollback", "u", "1"]
    client = subprocess.Popen(["busctl", f"--address={bus.address}", "--timeout=120", *stuck],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        daemon.killed_at(point)
    finally:
        client.kill()
        client.wait()
    restarted = Rastosd(bus, scratch, state_dir)
    restarted.start()
    try:
        assert assert_consistent(restarted) == [1]
        deployed = (scratch.snapshots / "1" / "deployment").is_dir()
        assert deployed == (point == "entry-written"), "only a deployment whose entry was written stays"
        if point != "entry-written":
            assert restarted.call(SNAPSHOTS, "Rollback", "u", "1")[0] == "rastos-snapshot-1.conf"
            assert assert_consistent(restarted) == [1]
        reconciled = [e for e in restarted.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "Reconcile"]
        assert bool(reconciled) == (point in ("snapshot-written", "deployment-made", "order-changed")), reconciled
    finally:
        assert restarted.stop() == 0, restarted.log_text()


ROLLBACK_POINTS = [point for point in FAILPOINTS if point != "snapshot-written"]


def rollbacks_of(scratch: ScratchRoot, snapshot: int) -> list[tuple[str, str]]:
    """Every entry of the snapshot's rollback deployments, with the root it boots."""
    entries = BootEntries(scratch.esp, 3)
    found = [path for path in entries.entry_files() if entry_id(path.name) == f"rastos-snapshot-{snapshot}.conf"]
    return [(path.name, entries.root_of(path)) for path in found]


@pytest.mark.parametrize("earlier", ("untried", "tried"))
@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_a_second_rollback_cut_between_two_steps_keeps_one_that_boots(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], point: str, earlier: str
) -> None:
    """Rolling back to a snapshot that has a rollback deployment already, the daemon killed (SIGKILL)
    at each point on the way: the earlier deployment, and what was written in it, boots next until
    the new entry is written, the new one after; the next start leaves exactly one of them with its
    entry first, the running deployment untouched and its entry second. An earlier entry that was
    tried has a file name of its own (`+2-1`), so both entries are there for a moment."""
    bus, scratch, state_dir = daemon_env
    daemon = Rastosd(bus, scratch, state_dir)
    daemon.start()
    entries = scratch.esp / "loader/entries"
    try:
        daemon.call(SNAPSHOTS, "Create", "s", "base")
        daemon.call(SNAPSHOTS, "Rollback", "u", "1")
        (scratch.snapshots / "1/deployment/etc/motd").write_text("written in the earlier rollback\n")
        if earlier == "tried":
            (entries / "rastos-snapshot-1+3.conf").rename(entries / "rastos-snapshot-1+2-1.conf")
        running = (entries / "rastos-0.conf").read_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    daemon.env = {FAILPOINT_VARIABLE: point}
    daemon.start()
    stuck = ["call", BUS_NAME, ROOT_PATH, SNAPSHOTS, "Rollback", "u", "1"]
    client = subprocess.Popen(["busctl", f"--address={bus.address}", "--timeout=120", *stuck],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        daemon.killed_at(point)
    finally:
        client.kill()
        client.wait()
    daemon.env = {}
    daemon.start()
    try:
        assert assert_consistent(daemon) == [1]
        ((name, root),) = rollbacks_of(scratch, 1)
        assert "sort-key rastos-1" in (entries / name).read_text().splitlines(), "it boots next"
        kept = (scratch.top / root / "etc/motd").exists()
        assert kept == (point != "entry-written"), "the earlier one until the new entry is written, then the new one"
        assert (entries / "rastos-0.conf").read_text() == running, "the running entry as it was: the fallback"
        assert (scratch.root / "etc/hostname").read_text() == "rastos\n" and not (scratch.root / "etc/motd").exists()
        reconciled = [e for e in daemon.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "Reconcile"]
        assert len(reconciled) == 1, "the next start finished or undid what the cut left"
        assert daemon.call(SNAPSHOTS, "Rollback", "u", "1")[0] == "rastos-snapshot-1.conf", "it works again"
        assert assert_consistent(daemon) == [1]
        ((name, root),) = rollbacks_of(scratch, 1)
        assert not (scratch.top / root / "etc/motd").exists() and name == "rastos-snapshot-1+3.conf"
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_a_second_rollback_that_cannot_write_its_entry_keeps_the_earlier_one(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path],
) -> None:
    """The ESP full (a real tmpfs, filled to its last byte) when a snapshot is rolled back to again:
    the call fails with a BootConfig error that says so, the new deployment goes, and the earlier
    one and its entry are as they were, still booting next."""
    bus, scratch, state_dir = daemon_env
    with small_esp(scratch) as small:
        esp = small.esp
        daemon = Rastosd(bus, small, state_dir)
        daemon.start()
        try:
            daemon.call(SNAPSHOTS, "Create", "s", "base")
            daemon.call(SNAPSHOTS, "Rollback", "u", "1")
            (scratch.snapshots / "1/deployment/etc/motd").write_text("written in the earlier rollback\n")
            before = {p.name: p.read_text() for p in (esp / "loader/entries").iterdir()}
            filler = fill(esp)
            failed = daemon.gdbus(SNAPSHOTS, "Rollback", "1")
            assert "org.rastos.Daemon1.Error.BootConfig" in failed.stderr, failed.stderr
            assert "cannot write the boot entry of snapshot 1" in failed.stderr, failed.stderr
            assert "No space left on device" in failed.stderr, failed.stderr
            assert {p.name: p.read_text() for p in (esp / "loader/entries").iterdir()} == before
            made = sorted(p.name for p in (scratch.snapshots / "1").iterdir())
            assert made == ["deployment", "info.json", "snapshot"], "the new deployment went with the failure"
            assert (scratch.snapshots / "1/deployment/etc/motd").is_file()
            filler.unlink()
            assert daemon.call(SNAPSHOTS, "Rollback", "u", "1")[0] == "rastos-snapshot-1.conf"
            assert assert_consistent(daemon) == [1]
        finally:
            assert daemon.stop() == 0, daemon.log_text()


def test_rollbacks_to_one_snapshot_at_once_leave_one(rastosd: Rastosd) -> None:
    """Two callers roll back to the same snapshot at the same moment, again and again: each rollback
    retires the earlier deployments of the snapshot once its entry is written, so two at once would
    retire each other's. They run one after the other, and one deployment with its entry is left."""
    rastosd.call(SNAPSHOTS, "Create", "s", "base")
    argv = ["busctl", f"--address={rastosd.bus.address}", "call", BUS_NAME, ROOT_PATH, SNAPSHOTS, "Rollback", "u", "1"]
    for _ in range(8):
        callers = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
        errors = [caller.communicate(timeout=60)[1] for caller in callers]
        assert [caller.returncode for caller in callers] == [0, 0, 0], errors
        assert assert_consistent(rastosd) == [1]
        assert len(rollbacks_of(rastosd.scratch, 1)) == 1
