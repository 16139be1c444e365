"""Image updates through the real rastosd on a private bus: org.rastos.Daemon1.Updates driven by
busctl, gdbus and rastosctl, on a host layout on a btrfs loop file (tests/update_fixtures.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import btrfsutil
import pytest
from aiohttp import web

from daemon.boot import BootEntries
from daemon.failpoints import UPDATE_POINTS
from daemon.failpoints import VARIABLE as FAILPOINT_VARIABLE
from daemon.store import StateStore
from daemon.updates.fetch import CHUNK
from tests.daemon_fixtures import (
    ADMIN_GROUP,
    ADMIN_USER,
    BUS_NAME,
    CHECKOUT,
    MANAGER,
    PERMISSIVE_POLICY,
    PLAIN_USER,
    ROOT_PATH,
    SNAPSHOTS,
    STRICT_POLICY,
    Rastosd,
    ScratchRoot,
    ensure_test_users,
    private_bus,
    require_root,
    until,
)
from tests.hub_fixtures import Hub, free_port, upload
from tests.hub_fixtures import hub as hub
from tests.update_fixtures import KERNEL, NOTHING_LEFT, Bundles, BundleServer, host_layout, leftovers

pytestmark = pytest.mark.root
UPDATES = "org.rastos.Daemon1.Updates"
ERROR = "org.rastos.Daemon1.Error.Update."


def start_daemon(
    directory: Path, bundles: Bundles, policy: Path, settings: str = "", **extra: Any
) -> Iterator[Rastosd]:
    """A real rastosd on a private bus and a host layout of version 1; `settings`: more of daemon.toml."""
    require_root()
    ensure_test_users()
    config = directory / "daemon.toml"
    config.write_text(
        f'[access]\nadmin_group = "{ADMIN_GROUP}"\n'
        f'[updates]\ndirectory = "{directory}/downloads"\nkeys_dir = "{bundles.keys}"\n{settings}'
    )
    with private_bus(policy) as bus, host_layout(directory, bundles) as scratch:
        daemon = Rastosd(bus, scratch, directory / "state", config, **extra)
        daemon.start()
        yield daemon
        if daemon.process is not None:
            assert daemon.stop() == 0, daemon.log_text()


@pytest.fixture
def updating(tmp_path: Path, bundles: Bundles) -> Iterator[Rastosd]:
    yield from start_daemon(tmp_path, bundles, STRICT_POLICY)


def status(daemon: Rastosd) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(daemon.call(UPDATES, "GetStatus")[0])
    return document


def wait_ended(daemon: Rastosd, update_id: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = status(daemon)
        if now["id"] == update_id and now["result"] is not None:
            result: dict[str, Any] = now["result"]
            return result
        time.sleep(0.1)
    raise AssertionError(f"update {update_id} did not end: {status(daemon)}")


def events(daemon: Rastosd) -> list[tuple[int, str, dict[str, Any]]]:
    """The daemon's events but each boot's own record (`Booted`, logged at the first start in a boot)."""
    logged = [(e[2], e[3], json.loads(e[5])) for e in daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]]
    return [event for event in logged if event[1] != "Booted"]


def test_rastosctl_stages_a_bundle_and_follows_it_to_its_end(updating: Rastosd, bundles: Bundles) -> None:
    assert updating.get(MANAGER, "BootState")["image_version"] == "1"
    staged = updating.ctl("update", "stage", str(bundles.full["2"]))
    assert staged.returncode == 0, staged
    assert staged.stdout.startswith("update 1 staged: version 2 boots next, on trial\n"), staged.stdout
    assert "entry:      rastos-update-2.conf (kernel /rastos/2)" in staged.stdout
    # Progress is read as it comes; a small bundle may be past verifying by the first read under load
    # (the signal test sees every phase).
    assert re.match(r"\[(verifying|receiving|reapplying|installing)\]", staged.stderr), "progress is followed"
    document = json.loads(updating.ctl("--json", "update", "status").stdout)
    assert (document["state"], document["staged_version"], document["running_version"]) == ("staged", "2", "1")
    assert document["result"]["deployment"] == "@deployments/2"
    assert "staged version:  2 (boots next)" in updating.ctl("update", "status").stdout
    assert [(uid, method) for uid, method, _ in events(updating)] == [(0, "Stage"), (0, "UpdateStaged")]
    assert (updating.scratch.esp / "loader/entries/rastos-update-2+3.conf").is_file()
    assert updating.get(UPDATES, "Progress")[0] == "staged"
    refused = updating.ctl("--json", "update", "stage", str(bundles.untrusted))
    assert refused.returncode == 3, refused
    assert json.loads(refused.stdout)["error"]["name"] == ERROR + "Untrusted"
    nothing = updating.ctl("update", "cancel")
    assert nothing.returncode == 1 and f"{ERROR}NotStaging: no update is staging" in nothing.stderr, nothing


def test_a_relative_path_is_made_absolute_by_rastosctl_only(updating: Rastosd, bundles: Bundles) -> None:
    result = subprocess.run(
        [*updating.ctl_argv(), "update", "stage", "--no-wait", bundles.delta.name],
        capture_output=True, text=True, check=False, cwd=bundles.delta.parent,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("update 1 is staging"), result
    assert wait_ended(updating, 1)["state"] == "staged"
    refused = updating.gdbus(UPDATES, "Stage", bundles.delta.name, "false")
    assert "org.freedesktop.DBus.Error.InvalidArgs: source: 'rastos-test-2-from-1.rbundle' is neither" in refused.stderr


def test_stage_signals_progress_and_completed(updating: Rastosd, bundles: Bundles) -> None:
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", updating.bus.address, "--dest", BUS_NAME],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
    )  # fmt: skip
    assert monitor.stdout is not None
    try:
        assert "Monitoring signals" in monitor.stdout.readline()
        time.sleep(0.3)  # the match rule reaches the bus
        update_id = updating.call(UPDATES, "Stage", "sb", str(bundles.delta), "false")[0]
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not any("Updates.Completed" in line for line in seen):
            assert time.monotonic() < deadline, "\n".join(seen)
            seen.append(monitor.stdout.readline())
    finally:
        monitor.terminate()
        monitor.wait()
    completed = next(line for line in seen if "Updates.Completed" in line)
    assert f"(uint64 {update_id}, true, " in completed and '"deployment": "@deployments/2"' in completed
    phases = [line for line in seen if "'Progress': <(" in line]
    assert any("'receiving'" in line for line in phases) and any("'staged'" in line for line in phases), phases


def test_url_staging_resumes_through_the_daemon(updating: Rastosd, bundles: Bundles) -> None:
    content = bundles.full["2"].read_bytes()
    with BundleServer(content, cut_after=len(content) // 3) as server:
        staged = updating.ctl("--json", "update", "stage", server.url)
    assert staged.returncode == 0, staged
    assert json.loads(staged.stdout)["state"] == "staged"
    assert [seen.range for seen in server.seen] == [None, f"bytes={len(content) // 3}-"]


def test_rastosctl_cancels_a_download_midway(updating: Rastosd, bundles: Bundles) -> None:
    with BundleServer(bundles.full["3"].read_bytes(), delay=0.05) as server:
        assert updating.ctl("update", "stage", "--no-wait", server.url).returncode == 0
        deadline = time.monotonic() + 30
        while status(updating)["progress"]["done"] < 1 << 20:
            assert time.monotonic() < deadline, status(updating)
            time.sleep(0.05)
        busy = updating.gdbus(UPDATES, "Stage", str(bundles.full["2"]), "false")
        assert f"GDBus.Error:{ERROR}Busy: update 1 (3) is staging: one at a time" in busy.stderr, busy.stderr
        cancelled = updating.ctl("update", "cancel")
        assert cancelled.returncode == 0, cancelled
        result = wait_ended(updating, 1, timeout=10)
    assert result["state"] == "cancelled", result
    assert leftovers(updating.scratch) == NOTHING_LEFT
    assert not list((updating.scratch.top.parent / "downloads").iterdir()), "the partial download is gone"
    assert [method for _, method, _ in events(updating)] == ["Stage", "Cancel", "UpdateCancelled"]


def test_only_admins_stage_and_cancel(updating: Rastosd, bundles: Bundles) -> None:
    for method, args in (("Stage", [str(bundles.full["2"]), "false"]), ("Cancel", [])):
        refused = updating.gdbus(UPDATES, method, *args, user=PLAIN_USER)
        # rastosd's own check (no polkit on this bus): the bus policy lets every caller reach it.
        expected = f"AccessDenied: {method} changes the host: only root or members of group '{ADMIN_GROUP}'"
        assert expected in refused.stderr, refused.stderr
    read = updating.busctl("call", BUS_NAME, ROOT_PATH, UPDATES, "GetStatus", user=PLAIN_USER)
    assert json.loads(json.loads(read.stdout)["data"][0])["running_version"] == "1"
    told = updating.ctl("update", "stage", str(bundles.full["2"]), user=PLAIN_USER)
    assert told.returncode == 1, told
    assert "AccessDenied: Stage changes the host: only root or members of group" in told.stderr, told.stderr
    assert leftovers(updating.scratch) == NOTHING_LEFT and events(updating) == []


def test_the_daemon_refuses_non_admins_under_a_loose_policy(tmp_path: Path, bundles: Bundles) -> None:
    for daemon in start_daemon(tmp_path, bundles, PERMISSIVE_POLICY):
        for method, args in (("Stage", [str(bundles.full["2"]), "false"]), ("Cancel", [])):
            refused = daemon.gdbus(UPDATES, method, *args, user=PLAIN_USER)
            assert f"AccessDenied: {method} changes the host: only root or members of group " in refused.stderr
        assert events(daemon) == []
        allowed = daemon.busctl("call", BUS_NAME, ROOT_PATH, UPDATES, "Stage", "sb", str(bundles.full["2"]), "false",
                                user=ADMIN_USER)  # fmt: skip
        update_id = json.loads(allowed.stdout)["data"][0]
        assert wait_ended(daemon, update_id)["state"] == "staged"
        uid = int(subprocess.run(["id", "-u", ADMIN_USER], capture_output=True, text=True, check=True).stdout)
        assert [(u, m) for u, m, _ in events(daemon)] == [(uid, "Stage"), (uid, "UpdateStaged")]


def test_reboot_after_staging_goes_to_logind(updating: Rastosd, bundles: Bundles) -> None:
    """The reboot is asked of systemd-logind on the daemon's own bus: on this private bus there is
    none, so the host running the test stays up, and the attempt is in the event log."""
    update_id = updating.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "true")[0]
    result = wait_ended(updating, update_id)
    assert result["state"] == "staged" and result["reboot"] is True, result
    failed = first_event(updating, "RebootFailed")
    assert "org.freedesktop.login1" in failed["error"], failed


@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_a_staging_cut_between_two_steps_is_undone_at_the_next_start(
    tmp_path: Path, bundles: Bundles, point: str
) -> None:
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY, env={FAILPOINT_VARIABLE: point}):
        daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")
        daemon.killed_at(point)
        daemon.env = {}
        daemon.start()
        assert leftovers(daemon.scratch) == NOTHING_LEFT, daemon.log_text()
        after = status(daemon)
        assert after["last_error"]["message"] == "rastosd stopped while it staged this update", after
        reconciled = [detail for _, method, detail in events(daemon) if method == "Reconcile"]
        assert reconciled and any("update 1 was cut short" in action for action in reconciled[0]["actions"])
        again = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")[0]
        assert wait_ended(daemon, again)["state"] == "staged", "staging works again"


def test_a_staging_cut_once_its_entry_is_written_is_staged_at_the_next_start(tmp_path: Path, bundles: Bundles) -> None:
    """The entry is written last: a cut after it leaves a deployment that boots next, and the next
    start says so instead of calling it failed."""
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY, env={FAILPOINT_VARIABLE: "update-entry-written"}):
        daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")
        daemon.killed_at("update-entry-written")
        daemon.env = {}
        daemon.start()
        after = status(daemon)
        assert after["result"]["state"] == "staged" and after["last_error"] is None, after
        assert (daemon.scratch.top / "@deployments/2").is_dir(), "the deployment stays"
        assert any(p.name.startswith("rastos-update-2+") for p in (daemon.scratch.esp / "loader/entries").iterdir())


def test_a_stop_cancels_the_staging_and_says_so(updating: Rastosd, bundles: Bundles) -> None:
    with BundleServer(bundles.full["3"].read_bytes(), delay=0.05) as server:
        update_id = updating.call(UPDATES, "Stage", "sb", server.url, "false")[0]
        deadline = time.monotonic() + 30
        while status(updating)["progress"]["done"] < 1 << 20:
            assert time.monotonic() < deadline, status(updating)
            time.sleep(0.05)
        assert updating.stop(signal.SIGTERM) == 0
    updating.start()
    after = status(updating)
    assert after["id"] == update_id and after["result"]["state"] == "cancelled", after
    assert after["last_error"]["message"] == "cancelled: rastosd stopped before it was staged"
    assert leftovers(updating.scratch) == NOTHING_LEFT
    assert not any(method == "Reconcile" for _, method, _ in events(updating)), "nothing was left to repair"


def staged_versions(scratch: ScratchRoot) -> dict[str, Any]:
    """Every update deployment, update entry and update kernel directory on the host, and for each
    entry what it boots: so a test can tell one consistent staging from two, or none."""
    deployments = scratch.top / "@deployments"
    entries = BootEntries(scratch.esp, 3)
    booted = {}
    for root, path in entries.update_entries():
        kernels = sorted(str(directory) for directory in entries.referenced_directories(path))
        complete = all((scratch.esp / k.lstrip("/") / name).is_file() for k in kernels for name in ("linux", "initrd"))
        first = "sort-key rastos-1" in path.read_text().splitlines()
        booted[path.name] = {"root": root, "kernels": kernels, "complete": complete, "first": first,
                             "root_exists": (scratch.top / root).is_dir()}  # fmt: skip
    return {
        "deployments": sorted(p.name for p in deployments.iterdir()) if deployments.is_dir() else [],
        "entries": booted,
        "kernels": sorted(str(p.relative_to(scratch.esp)) for p in scratch.esp.glob("rastos/*") if p.name != KERNEL),
    }


def assert_one_staging_of(scratch: ScratchRoot, version: str) -> None:
    """Exactly one deployment of the version, one entry naming it that boots next with its own
    complete kernel, no other kernel directory; the running root and its entry as they were."""
    found = staged_versions(scratch)
    assert len(found["deployments"]) == 1, found
    assert len(found["entries"]) == 1, found
    (entry,) = found["entries"].values()
    assert entry["root"] == f"@deployments/{found['deployments'][0]}" and entry["root_exists"], found
    assert entry["complete"] and entry["first"], found
    assert [f"/{k}" for k in found["kernels"]] == entry["kernels"], found
    tree = scratch.top / entry["root"]
    assert (tree / "usr/share/rastos-test/version").read_text() == f"{version}\n"
    assert (scratch.root / "usr/share/rastos-test/version").read_text() == "1\n", "the running root untouched"
    running = (scratch.esp / "loader/entries/rastos-test.conf").read_text()
    assert "rootflags=subvol=@ " in running and "sort-key rastos-2" in running, "the running entry is the fallback"
    assert (scratch.esp / "rastos" / KERNEL / "linux").is_file()


@pytest.mark.parametrize("point", (*UPDATE_POINTS, "order-changed", "update-entry-written"))
def test_a_version_staged_again_keeps_the_earlier_staging_until_the_new_one_is_complete(
    tmp_path: Path, bundles: Bundles, point: str
) -> None:
    """A cut anywhere in a second staging of a version leaves one staging of it that boots next:
    the earlier one until the new entry is written, the new one after."""
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY):
        first = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")[0]
        assert wait_ended(daemon, first)["state"] == "staged"
        assert_one_staging_of(daemon.scratch, "2")
        if point == "update-received":  # received again only when its image is gone meanwhile
            btrfsutil.delete_subvolume(daemon.scratch.top / "@images" / bundles.versions["2"].name)
        assert daemon.stop() == 0
        daemon.env = {FAILPOINT_VARIABLE: point}
        daemon.start()
        daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")
        daemon.killed_at(point)
        daemon.env = {}
        daemon.start()
        assert_one_staging_of(daemon.scratch, "2")
        after = status(daemon)
        assert after["staged_version"] == "2", after
        # Its own entry written, the cut staging is staged; before that it failed, the earlier one stays.
        assert after["result"]["state"] == ("staged" if point == "update-entry-written" else "failed"), after
        again = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")[0]
        assert wait_ended(daemon, again)["state"] == "staged", "staging works again"
        assert_one_staging_of(daemon.scratch, "2")


@pytest.mark.parametrize("trigger", ("MarkGood", "start"))
def test_a_good_boot_collects_the_update_deployments_and_images_nothing_needs(
    tmp_path: Path, bundles: Bundles, trigger: str
) -> None:
    """Version 2 staged, then version 3 staged over it: once this boot (on version 1's @) is known
    good, version 2's deployment, entry, kernel and image go; version 3 (staged: it boots next) and
    version 1's image (the running one's: a delta's parent) stay. Logged, and in the event log."""
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY):
        top, esp = daemon.scratch.top, daemon.scratch.esp
        for version in ("2", "3"):
            update_id = daemon.call(UPDATES, "Stage", "sb", str(bundles.full[version]), "false")[0]
            assert wait_ended(daemon, update_id)["state"] == "staged"
        assert sorted(p.name for p in (top / "@deployments").iterdir()) == ["2", "3"]
        if trigger == "MarkGood":
            daemon.call(SNAPSHOTS, "MarkGood")
        else:
            assert daemon.stop() == 0
            daemon.start()  # not known good: nothing is collected
            assert sorted(p.name for p in (top / "@deployments").iterdir()) == ["2", "3"]
            assert daemon.stop() == 0
            daemon.extra = ["--booted-entry", "rastos-test.conf"]  # blessed: no boot counter left
            daemon.start()
        assert sorted(p.name for p in (top / "@deployments").iterdir()) == ["3"]
        assert sorted(p.name for p in (top / "@images").iterdir()) == ["rastos-test-1", "rastos-test-3"]
        assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == [
            "rastos-test.conf",
            "rastos-update-3+3.conf",
        ]
        assert sorted(p.name for p in (esp / "rastos").iterdir()) == ["3", KERNEL]
        assert status(daemon)["staged_version"] == "3"
        cleanups = [detail for _, method, detail in events(daemon) if method == "UpdateCleanup"]
        assert len(cleanups) == 1 and sorted(cleanups[0]["actions"]) == [
            "removed @deployments/2 (version 2): neither the running deployment, the fallback nor the staged one",
            "removed @images/rastos-test-2: no deployment kept was made from it",
        ], cleanups  # fmt: skip
        assert "removed @deployments/2" in daemon.log_text()


def test_a_deployment_that_failed_its_tries_is_kept_in_the_boot_that_fell_back_only(
    tmp_path: Path, bundles: Bundles
) -> None:
    """Version 2 used up its tries and @ booted again: that boot keeps version 2 for its report
    (BootState says fallback and names it); a later boot, one that also still sees the failed entry,
    collects it."""
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY):
        top, esp = daemon.scratch.top, daemon.scratch.esp
        update_id = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")[0]
        assert wait_ended(daemon, update_id)["state"] == "staged"
        assert daemon.stop() == 0
        entry = esp / "loader/entries/rastos-update-2+3.conf"
        entry.rename(entry.with_name("rastos-update-2+0-3.conf"))
        daemon.extra = ["--booted-entry", "rastos-test.conf"]
        daemon.start()  # the boot that fell back: known good (its entry is blessed)
        daemon.call(SNAPSHOTS, "MarkGood")
        state = daemon.get(MANAGER, "BootState")
        assert state["kind"] == "fallback" and state["failed_root"] == "@deployments/2", state
        assert sorted(p.name for p in (top / "@deployments").iterdir()) == ["2"]
        assert not any(method == "UpdateCleanup" for _, method, _ in events(daemon))
        assert daemon.stop() == 0
        store = StateStore(tmp_path / "state" / "state.db")  # a boot before this one fell back from it too
        try:
            with store.transaction() as db:
                db.execute("UPDATE boots SET boot_id = 'the-fallback-boot', started = started - 60")
        finally:
            store.close()
        daemon.start()
        assert not (top / "@deployments/2").exists()
        assert sorted(p.name for p in (top / "@images").iterdir()) == ["rastos-test-1"]
        assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == ["rastos-test.conf"]
        assert sorted(p.name for p in (esp / "rastos").iterdir()) == [KERNEL]
        cleanups = [detail for _, method, detail in events(daemon) if method == "UpdateCleanup"]
        assert [detail["why"] for detail in cleanups] == ["rastosd started on a boot known good"], cleanups
        # Each boot said once what booted, at rastosd's first start in it: the last one, what it fell back from.
        booted = [detail for e in daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]
                  if e[3] == "Booted" for detail in [json.loads(e[5])]]  # fmt: skip
        assert len(booted) == 2, booted
        assert {key: booted[-1][key] for key in ("root", "kind", "snapshot", "entry", "image_version", "failed_entry",
                                                  "failed_root")} == {
            "root": "@", "kind": "fallback", "snapshot": None, "entry": "rastos-test.conf", "image_version": "1",
            "failed_entry": "rastos-update-2.conf", "failed_root": "@deployments/2"}, booted  # fmt: skip


# Rollbacks on a host whose deployments each have a kernel of their own


def boot_into(daemon: Rastosd, root: str, entry: str) -> None:
    """rastosd started again as the host booted into `root` from `entry` would start it."""
    assert daemon.stop() == 0, daemon.log_text()
    daemon.extra = ["--root", str(daemon.scratch.top / root), "--booted-entry", entry]
    daemon.start()


def kernel_of(entry: Path) -> list[str]:
    return [line for line in entry.read_text().splitlines() if line.split(" ", 1)[0] in ("linux", "initrd")]


def test_a_rollback_boots_the_kernel_its_snapshot_was_taken_with(tmp_path: Path, bundles: Bundles) -> None:
    """A snapshot taken while version 2 ran, rolled back to while version 3 runs: the rollback's
    entry boots version 2's kernel and initrd, as the snapshot's read-only entry does (the modules in
    the snapshot are that kernel's), never the running version's. That kernel stays on the ESP while
    an entry of the snapshot names it (version 2's deployment collected, a second rollback replacing
    the first, the next start) and goes with the snapshot."""
    version_2 = ["linux /rastos/2/linux", "initrd /rastos/2/initrd"]
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY):
        top, esp = daemon.scratch.top, daemon.scratch.esp
        entries = esp / "loader/entries"
        staged = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["2"]), "false")[0]
        assert wait_ended(daemon, staged)["state"] == "staged"
        boot_into(daemon, "@deployments/2", "rastos-update-2+3.conf")
        snapshot = daemon.call(SNAPSHOTS, "Create", "s", "on version 2")[0]
        assert kernel_of(entries / f"readonly-snapshot-{snapshot}.conf") == version_2
        staged = daemon.call(UPDATES, "Stage", "sb", str(bundles.full["3"]), "false")[0]
        assert wait_ended(daemon, staged)["state"] == "staged"
        boot_into(daemon, "@deployments/3", "rastos-update-3+3.conf")
        newer = daemon.call(SNAPSHOTS, "Create", "s", "on version 3")[0]
        daemon.call(SNAPSHOTS, "MarkGood")  # retention takes version 2's deployment, not its kernel
        assert not (top / "@deployments/2").exists()
        for _ in range(2):  # the second replaces the first rollback deployment and its entry
            assert daemon.call(SNAPSHOTS, "Rollback", "u", str(snapshot))[0] == f"rastos-snapshot-{snapshot}.conf"
            (rollback,) = entries.glob(f"rastos-snapshot-{snapshot}+*.conf")
            assert kernel_of(rollback) == version_2, rollback.read_text()
            options = next(line for line in rollback.read_text().splitlines() if line.startswith("options "))
            assert options.endswith(" rw") and "root=UUID=host-root" in options, options
            assert (esp / "rastos/2/linux").read_text() == "linux of version 2\n" * 64
            assert (esp / "rastos/2/initrd").read_text() == "initrd of version 2\n" * 128
        # The rollback entry alone names the kernel now: the start's reconcile and retention keep it,
        # and the read-only entry written again takes it from there, not from the running entry.
        (entries / f"readonly-snapshot-{snapshot}.conf").unlink()
        boot_into(daemon, "@deployments/3", "rastos-update-3+3.conf")
        assert kernel_of(rollback) == version_2 and (esp / "rastos/2/linux").is_file()
        assert sorted(p.name for p in (esp / "rastos").iterdir()) == ["2", "3", KERNEL]
        assert kernel_of(entries / f"readonly-snapshot-{snapshot}.conf") == version_2
        daemon.call(SNAPSHOTS, "Delete", "u", str(snapshot))
        assert sorted(p.name for p in (esp / "rastos").iterdir()) == ["3", KERNEL], "gone with its last entry"
        assert kernel_of(entries / f"readonly-snapshot-{newer}.conf") == ["linux /rastos/3/linux",
                                                                          "initrd /rastos/3/initrd"]  # fmt: skip


# Image updates from the hub (daemon/hub_link.py) to a real rastosd


def hub_settings(url: str, directory: Path, token: str) -> str:
    (directory / "hub-token").write_text(token + "\n")
    return f'[hub]\nurl = "{url}"\ntoken_file = "{directory / "hub-token"}"\n'


def first_event(daemon: Rastosd, method: str) -> dict[str, Any]:
    """The detail of the daemon's first event of `method`, waited for."""
    found = until(lambda: [detail for _, name, detail in events(daemon) if name == method], f"a {method} event")
    return dict(found[0])


def test_a_hub_update_staged_before_rastosd_restarted_is_answered_staged_and_rebooted_into(
    tmp_path: Path, bundles: Bundles, hub: Hub
) -> None:
    """rastosd stops once the entry of the hub's update is written, before the hub heard it staged
    (killed there, as by a power cut). The hub sends the update again after the next welcome; the
    agent, which kept the update's id in memory only, answers it from the entry that boots next:
    `staged`, with the bundle fetched once, and the reboot the update asks for asked of logind as
    after a staging with reboot (there is none on this private bus: RebootFailed, recorded)."""
    status_code, image = upload(hub, bundles.full["2"].read_bytes())
    assert status_code == 201, image
    token = hub.api("POST", "/api/v1/hosts", {"name": "host-1"})["token"]
    bundle_get = f'"GET /api/v1/images/{image["id"]}/bundle '

    def fetched() -> int:
        return hub.log.read_text().count(bundle_get)

    def host_state(rollout_id: str) -> str:
        return str(hub.api("GET", f"/api/v1/rollouts/{rollout_id}")["hosts"][0]["state"])

    def told(rollout_id: str, state: str) -> Callable[[], bool]:
        return lambda: host_state(rollout_id) == state

    settings = hub_settings(hub.agent_url, tmp_path, token)
    env = {FAILPOINT_VARIABLE: "update-entry-written"}
    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY, settings, env=env):
        hub.wait_state(lambda state: (state["hosts"]["host-1"]["facts"] or {}).get("boot_state", {})
                       .get("image_version") == "1", "host-1 on version 1")  # fmt: skip
        rollout = hub.api("POST", "/api/v1/rollouts", {"image": image["id"], "target": {"hosts": ["host-1"]}})
        daemon.killed_at("update-entry-written")
        assert host_state(rollout["id"]) == "staging", "the hub never heard it staged"
        assert fetched() == 1
        daemon.env = {}
        daemon.start()
        until(told(rollout["id"], "staged"), "the hub told it is staged")
        failed = first_event(daemon, "RebootFailed")
        assert fetched() == 1, "not downloaded again"
        assert_one_staging_of(daemon.scratch, "2")
        asked = [detail for _, method, detail in events(daemon) if method == "HubUpdate"]
        assert [(detail["update"], detail.get("answered")) for detail in asked] == [(1, None), (1, "staged")], asked
        assert failed["update"] == 1 and "org.freedesktop.login1" in failed["error"], failed
        assert [method for _, method, _ in events(daemon)].count("RebootFailed") == 1
        assert status(daemon)["id"] == 1, "one staging in all"


def test_a_second_hub_update_of_the_version_under_way_follows_that_staging(tmp_path: Path, bundles: Bundles) -> None:
    """Another update of the version staging (another rollout's id for the image, while the first
    download runs) is answered `staging`, then `staged` with the first: one download, one staging,
    and the reboot the second asks for is added to it. The hub is played over a real WebSocket and
    serves the bundle itself, so the download can be held after its head until the second is answered."""
    content = bundles.full["3"].read_bytes()
    port, token = free_port(), "host-token"
    first = {"id": "u-1", "url": "/api/v1/images/x/bundle", "version": "3", "reboot": False}
    second = {**first, "id": "u-2", "reboot": True}
    requests: list[str | None] = []
    statuses: list[tuple[str, str]] = []

    async def scenario(daemon: Rastosd) -> None:
        held = asyncio.Event()
        sockets: list[web.WebSocketResponse] = []

        async def agent(request: web.Request) -> web.WebSocketResponse:
            """Welcome, then the first update; every update_status heard is kept."""
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            sockets.append(socket)
            await socket.send_json({"type": "welcome", "host": "host-1", "last_event": 0, "commands": []})
            await socket.send_json({"type": "update", "update": first})
            async for message in socket:
                frame = json.loads(message.data)
                if frame["type"] == "update_status":
                    statuses.append((frame["update"], frame["state"]))
            return socket

        async def bundle(request: web.Request) -> web.StreamResponse:
            """The head (the download's first chunk), then the rest once the test lets it go."""
            assert request.headers["Authorization"] == f"Bearer {token}"
            requests.append(request.headers.get("Range"))
            response = web.StreamResponse(headers={"Content-Length": str(len(content))})
            await response.prepare(request)
            await response.write(content[:CHUNK])
            await held.wait()
            await response.write(content[CHUNK:])
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/api/v1/agent", agent)
        app.router.add_get("/api/v1/images/x/bundle", bundle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.to_thread(until, lambda: status(daemon)["version"] == "3", "the head read, the rest held")
            await sockets[-1].send_json({"type": "update", "update": second})
            await asyncio.to_thread(until, lambda: ("u-2", "staging") in statuses, "u-2 answered staging")
            held.set()
            await asyncio.to_thread(until, lambda: {("u-1", "staged"), ("u-2", "staged")} <= set(statuses), "staged")
        finally:
            held.set()
            for socket in sockets:  # the agent's: the server's cleanup would wait for it to go
                await socket.close()
            await runner.cleanup()

    for daemon in start_daemon(tmp_path, bundles, STRICT_POLICY, hub_settings(f"ws://127.0.0.1:{port}/api/v1/agent",
                                                                               tmp_path, token)):  # fmt: skip
        asyncio.run(scenario(daemon))
        assert requests == [None], "one download, from its start"
        assert statuses == [("u-1", "staging"), ("u-2", "staging"), ("u-1", "staged"), ("u-2", "staged")], statuses
        asked = [detail for _, method, detail in events(daemon) if method == "HubUpdate"]
        assert [(detail["update"], detail.get("answered")) for detail in asked] == [(1, None), (1, "staging")], asked
        assert first_event(daemon, "RebootFailed")["update"] == 1, "the reboot u-2 asked for"
        assert status(daemon)["result"]["reboot"] is True
        assert_one_staging_of(daemon.scratch, "3")
