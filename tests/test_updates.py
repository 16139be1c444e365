"""Staging image updates with `daemon.updates.Updates` itself (no bus), on real btrfs loop files, with
real signed bundles: full and delta, every kind of bad bundle, downloads that are cut, cancelled or
refused at their head, a file system that fills up, and what a cut staging leaves for the next start.
(The same through the real rastosd on a private bus: tests/test_daemon_updates.py.)"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sqlite3
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from daemon.boot import BootEntries, entry_id, tries_left
from daemon.config import DaemonConfig
from daemon.errors import InvalidParams, NotStaging, UpdateBusy
from daemon.snapshots import SnapshotLayout, Snapshots, subvolume_path
from daemon.store import StateStore
from daemon.store_schema import MIGRATIONS
from daemon.updates import StageAnswer, Updates
from daemon.updates.layout import HostLayout, identity
from daemon.updates.model import PrepareDeployment, carry_nothing
from daemon.updates.retention import remove_deployment
from daemon.updates.service import REBOOT_DELAY
from rastos.bundle import Bundle, SigningKey, part_offsets, trusted_keys, write_bundle
from tests.daemon_fixtures import ScratchRoot, fill, small_esp
from tests.update_fixtures import (
    KERNEL,
    NOTHING_LEFT,
    RUNNING_ENTRY,
    Bundles,
    BundleServer,
    host_layout,
    leftovers,
)

pytestmark = pytest.mark.root
ERROR = "org.rastos.Daemon1.Error.Update."


@dataclass
class Host:
    scratch: ScratchRoot
    config: DaemonConfig
    store: StateStore
    entries: BootEntries
    updates: Updates
    completed: queue.Queue[tuple[int, bool, dict[str, Any]]] = field(default_factory=queue.Queue)
    phases: list[str] = field(default_factory=list)

    def stage(self, source: str | Path, **headers: str) -> dict[str, Any]:
        update_id = self.updates.stage(str(source), uid=0, method="Stage", reboot=False, headers=headers or None)
        return self.wait(update_id)

    def wait(self, update_id: int) -> dict[str, Any]:
        done, ok, result = self.completed.get(timeout=120)
        assert done == update_id and ok == (result["state"] == "staged"), result
        return result

    def events(self) -> list[str]:
        return [event.method for event in self.store.events(0, 1000)]


def make_host(
    scratch: ScratchRoot, directory: Path, keys: Path, running: str = "@", prepare: PrepareDeployment = carry_nothing,
    reboot: Callable[[], None] | None = None,
) -> Host:  # fmt: skip
    config = DaemonConfig(
        root=scratch.top / running, esp=scratch.esp, state_dir=directory / "state",
        updates_dir=directory / "downloads", update_keys_dir=keys,
    )  # fmt: skip
    store = StateStore(config.database)
    entries = BootEntries(scratch.esp, 3)
    updates = Updates(config, store, entries, running, prepare_deployment=prepare, reboot=reboot)
    host = Host(scratch, config, store, entries, updates)
    host.updates.on_completed.append(lambda *args: host.completed.put(args))
    host.updates.on_progress.append(lambda progress: host.phases.append(progress[0]))
    return host


@pytest.fixture
def host(tmp_path: Path, bundles: Bundles) -> Iterator[Host]:
    with host_layout(tmp_path, bundles) as scratch:
        made = make_host(scratch, tmp_path, bundles.keys)
        yield made
        made.store.close()


def entry_text(host: Host, version: str) -> str:
    return (host.scratch.esp / f"loader/entries/rastos-update-{version}+3.conf").read_text()


def test_a_full_bundle_becomes_a_deployment_that_boots_next(host: Host, bundles: Bundles) -> None:
    result = host.stage(bundles.full["2"])
    top, esp = host.scratch.top, host.scratch.esp
    assert result["state"] == "staged" and result["received"] is True, result
    assert (result["image"], result["deployment"], result["entry"]) == (
        "@images/rastos-test-2", "@deployments/2", "rastos-update-2.conf"
    )  # fmt: skip
    assert identity(top / "@images/rastos-test-2") == bundles.versions["2"].uuid, "received: its identity kept"
    deployment = top / "@deployments/2"
    assert btrfsutil.is_subvolume(deployment) and not btrfsutil.get_subvolume_read_only(deployment)
    assert (deployment / "usr/share/rastos-test/version").read_text() == "2\n"
    lines = entry_text(host, "2").splitlines()
    assert lines[:2] == ["title rastOS test 2", "sort-key rastos-1"], lines
    assert f"version {KERNEL}" in lines and "linux /rastos/2/linux" in lines and "initrd /rastos/2/initrd" in lines
    options = next(line for line in lines if line.startswith("options ")).split()[1:]
    # The host's own root device, never the builder's; the new deployment named; rw.
    assert options == ["root=UUID=host-root", "quiet", "console=ttyS0", "rootflags=subvol=@deployments/2", "rw"]
    assert (esp / "rastos/2/linux").read_text() == "linux of version 2\n" * 64
    assert (esp / "rastos/2/initrd").read_text() == "initrd of version 2\n" * 128
    running = (esp / "loader/entries/rastos-test.conf").read_text()
    assert "sort-key rastos-2\n" in running, "the running entry is second: the fallback"
    assert (host.scratch.root / "usr/share/rastos-test/version").read_text() == "1\n", "the running root untouched"
    assert result["carried"] == {"carried": [], "reapplied": [], "hand_changes": []}
    assert host.events() == ["Stage", "UpdateStaged"]
    assert list(host.config.download_directory.iterdir()) == [], "the private copy of the bundle went with it"
    status = host.updates.status()
    assert (status["state"], status["staged_version"], status["running_version"]) == ("staged", "2", "1")
    assert "receiving" in host.phases and host.phases[-1] == "staged"


def test_an_image_made_in_place_is_whole_once_read_only_and_its_own_uuid_is_its_identity(host: Host) -> None:
    # The image a host is installed from: the builder made its root in the image's btrfs and sent the
    # version's streams from it, so it was never received (btrfs receive finds a delta's parent by UUID
    # then; tests/test_image_updates.py applies a delta to a built image that way).
    made = host.scratch.top / "@images/made-in-place"
    btrfsutil.create_subvolume(made)
    assert identity(made) is None, "writable: as a receive that was cut"
    btrfsutil.set_subvolume_read_only(made)
    own = str(uuid.UUID(bytes=btrfsutil.subvolume_info(made).uuid))
    assert identity(made) == own
    assert HostLayout(host.scratch.top).find_image(own) == made


def test_a_delta_is_received_onto_the_version_it_was_made_from(host: Host, bundles: Bundles) -> None:
    result = host.stage(bundles.delta)
    assert result["state"] == "staged" and result["delta"] is True and result["parent"] == "1", result
    deployment = host.scratch.top / "@deployments/2"
    assert (deployment / "usr/share/rastos-test/new-in-2").read_text() == "added in version 2\n"
    assert identity(host.scratch.top / "@images/rastos-test-2") == bundles.versions["2"].uuid


def test_a_version_already_here_is_not_received_again_and_its_deployment_is_replaced(
    host: Host, bundles: Bundles
) -> None:
    top, esp = host.scratch.top, host.scratch.esp
    host.stage(bundles.delta)
    (top / "@deployments/2/etc/made-by-hand").write_text("x\n")
    for update_id in (2, 3):
        again = host.stage(bundles.full["2"])
        assert again["state"] == "staged" and again["received"] is False, again
        # A name of its own: the earlier deployment kept its name, and so its entry, until this one's was in.
        earlier = "@deployments/2" if update_id == 2 else f"@deployments/2@{update_id - 1}"
        assert (again["deployment"], again["replaced"]) == (f"@deployments/2@{update_id}", [earlier]), again
        assert again["kernel"] == f"/rastos/2@{update_id}"
        assert sorted(p.name for p in (top / "@deployments").iterdir()) == [f"2@{update_id}"]
        assert not (top / f"@deployments/2@{update_id}/etc/made-by-hand").exists(), "a fresh deployment"
        names = sorted(p.name for p in (esp / "loader/entries").iterdir())
        assert names == ["rastos-test.conf", "rastos-update-2+3.conf"], "one entry per version"
        lines = entry_text(host, "2").splitlines()
        assert f"linux /rastos/2@{update_id}/linux" in lines and lines[1] == "sort-key rastos-1", lines
        assert f"rootflags=subvol=@deployments/2@{update_id}" in lines[-1].split()
        assert sorted(p.name for p in (esp / "rastos").iterdir()) == [f"2@{update_id}", KERNEL], (
            "the earlier kernel went"
        )
    assert host.updates.status()["staged_version"] == "2"


def test_the_running_deployment_is_never_replaced(host: Host, bundles: Bundles, tmp_path: Path) -> None:
    host.stage(bundles.full["2"])
    on_two = make_host(host.scratch, tmp_path / "second", bundles.keys, running="@deployments/2")
    result = on_two.stage(bundles.full["2"])
    assert result["error"]["name"] == ERROR + "Failed", result
    assert "version 2 is the running deployment (@deployments/2)" in result["error"]["message"]
    assert (host.scratch.top / "@deployments/2/usr/share/rastos-test/version").read_text() == "2\n"
    on_two.store.close()


def test_a_delta_without_its_parent_is_refused_before_anything_is_received(host: Host, bundles: Bundles) -> None:
    btrfsutil.delete_subvolume(host.scratch.top / "@images/rastos-test-1")
    result = host.stage(bundles.delta)
    assert result["state"] == "failed" and result["error"]["name"] == ERROR + "Parent", result
    uuid = bundles.versions["1"].uuid
    assert result["error"]["message"] == (
        f"this host does not have version 1 (uuid {uuid}) that the delta needs; stage the full bundle"
    )
    assert "receiving" not in host.phases and "verifying" in host.phases, "refused from the head, before receive"
    assert sorted(p.name for p in (host.scratch.top / "@images").iterdir()) == []
    assert sorted(p.name for p in (host.scratch.top / "@deployments").iterdir()) == []
    assert host.events() == ["Stage", "UpdateFailed"]


def kernel_kept(bundles: Bundles, folder: Path, linux: str) -> Path:
    """Version 2 as a delta that leaves its `linux` (this text) to the host's ESP."""
    opened = Bundle(bundles.delta, trusted_keys(bundles.keys))
    parts = {"root.btrfs.zst": bundles.directory / "root-2-from-1.btrfs.zst", "linux": folder / "linux"}
    parts["linux"].write_text(linux)
    for name in ("entry.conf", "initrd"):
        parts[name] = folder / name
        parts[name].write_bytes(opened.read_part(name))
    kept = folder / "kept.rbundle"
    key = SigningKey.load(bundles.directory / "signing-key")
    write_bundle(kept, opened.manifest, key, parts, in_parent=frozenset({"linux"}))
    assert part_offsets(kept)["linux"][1] == 0, "the kernel is not in the bundle"
    return kept


def test_a_delta_that_keeps_its_parents_kernel_installs_the_copy_on_the_esp(
    host: Host, bundles: Bundles, tmp_path: Path
) -> None:
    result = host.stage(kernel_kept(bundles, tmp_path, "the running kernel\n"))
    assert result["state"] == "staged", result
    assert (host.scratch.esp / "rastos/2/linux").read_text() == "the running kernel\n"
    assert (host.scratch.esp / "rastos/2/initrd").read_text() == "initrd of version 2\n" * 128


def test_a_delta_keeping_a_kernel_the_host_lacks_is_refused_before_receive(
    host: Host, bundles: Bundles, tmp_path: Path
) -> None:
    result = host.stage(kernel_kept(bundles, tmp_path, "a kernel this host never had\n"))
    assert result["state"] == "failed" and result["error"]["name"] == ERROR + "Parent", result
    assert "keeps version 1's linux, which is not on this host's ESP" in result["error"]["message"]
    assert "receiving" not in host.phases
    assert sorted(p.name for p in (host.scratch.top / "@images").iterdir()) == ["rastos-test-1"]
    assert not (host.scratch.esp / "rastos/2").exists()


def corrupt_part(bundle: Path, part: str) -> None:
    offset, size = part_offsets(bundle)[part]
    with bundle.open("r+b") as file:
        file.seek(offset + size // 2)
        byte = file.read(1)
        file.seek(offset + size // 2)
        file.write(bytes([byte[0] ^ 0xFF]))


def spoil(bundles: Bundles, directory: Path, how: str) -> Path:
    if how == "untrusted key":
        return bundles.untrusted
    bundle = bundles.copy(bundles.full["2"], directory)
    if how == "corrupt root stream":
        corrupt_part(bundle, "root.btrfs.zst")
    elif how == "corrupt kernel":
        corrupt_part(bundle, "linux")
    elif how == "truncated":
        os.truncate(bundle, bundle.stat().st_size * 6 // 10)
    elif how == "bad signature":
        raw = bundle.read_bytes()
        assert raw.count(b"2024-05-01T12:00:00Z") == 1
        bundle.write_bytes(raw.replace(b"2024-05-01T12:00:00Z", b"2099-05-01T12:00:00Z"))  # same length
    return bundle


SPOILED = {
    "corrupt root stream": ("Corrupt", "part root.btrfs.zst does not match its sha256"),
    "corrupt kernel": ("Corrupt", "part linux does not match its sha256"),
    "truncated": ("Corrupt", "not a complete bundle"),
    "bad signature": ("Signature", "does not match it"),
    "untrusted key": ("Untrusted", "which this host does not trust"),
}


@pytest.mark.parametrize("how", SPOILED)
def test_a_bad_bundle_is_refused_with_its_error_and_leaves_nothing(
    host: Host, bundles: Bundles, tmp_path: Path, how: str
) -> None:
    bundle = spoil(bundles, tmp_path, how)
    result = host.stage(bundle)
    name, message = SPOILED[how]
    assert result["state"] == "failed" and result["error"]["name"] == ERROR + name, result
    assert message in result["error"]["message"], result
    assert "/proc/self/fd" not in result["error"]["message"], "the error names the bundle, not a descriptor"
    assert leftovers(host.scratch) == NOTHING_LEFT
    assert (host.scratch.esp / "loader/entries/rastos-test.conf").read_text() == RUNNING_ENTRY, "still first"
    assert "receiving" not in host.phases, "refused before btrfs receive saw a byte"
    assert host.events() == ["Stage", "UpdateFailed"]
    assert host.updates.status()["last_error"]["name"] == ERROR + name


BAD_SOURCES = {
    "relative": ("bundles/x.rbundle", "is neither an absolute path nor an http(s) URL"),
    "empty": ("", "is empty"),
    "missing": ("/nonexistent/x.rbundle", "no such file"),
    "directory": ("/", "is the root itself"),
    "device": ("/dev/null", "is not a regular file"),
    "ftp": ("ftp://example.org/x.rbundle", "'ftp' URLs are not fetched"),
    "file URL": ("file:///etc/passwd", "'file' URLs are not fetched"),
    "credentials": ("https://user:secret@example.org/x", "holds a user name or password"),
    "no host": ("https:///x.rbundle", "names no host"),
    "control character": ("/tmp/x\n.rbundle", "without control characters"),
    "dot dot": ("/tmp/../etc/passwd", "holds an empty, '.' or '..' component"),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_a_bad_source_is_refused_at_once(host: Host, case: str) -> None:
    source, message = BAD_SOURCES[case]
    with pytest.raises(InvalidParams) as raised:
        host.updates.stage(source, uid=0, method="Stage", reboot=False)
    assert str(raised.value).startswith("source") and message in str(raised.value), raised.value
    assert host.events() == [] and host.updates.status()["state"] == "idle"


def test_links_and_fifos_are_refused_as_sources(host: Host, bundles: Bundles, tmp_path: Path) -> None:
    bundle = bundles.copy(bundles.full["2"], tmp_path)
    (tmp_path / "link.rbundle").symlink_to(bundle)
    (tmp_path / "linked-dir").symlink_to(tmp_path)
    os.mkfifo(tmp_path / "fifo.rbundle")
    for source, message in (
        (tmp_path / "link.rbundle", "is a symbolic link, which rastosd does not follow"),
        (tmp_path / "linked-dir" / bundle.name, f"leads through a symbolic link, {tmp_path}/linked-dir"),
        (tmp_path / "fifo.rbundle", "is not a regular file"),
    ):
        with pytest.raises(InvalidParams) as raised:
            host.updates.stage(str(source), uid=0, method="Stage", reboot=False)
        assert message in str(raised.value), raised.value
    assert host.events() == []


def test_the_file_opened_is_the_one_staged(host: Host, bundles: Bundles, tmp_path: Path) -> None:
    """A path is opened when Stage() is called: a bundle swapped in at that path later is not read."""
    bundle = bundles.copy(bundles.full["2"], tmp_path)
    with host.store._lock:  # the worker waits to record the version it read, before it reads the rest
        update_id = host.updates.stage(str(bundle), uid=0, method="Stage", reboot=False)
        bundle.rename(tmp_path / "moved.rbundle")
        bundle.write_bytes(bundles.untrusted.read_bytes())
    assert host.wait(update_id)["state"] == "staged"


def test_url_staging_resumes_after_a_cut_and_keeps_the_token_to_itself(
    host: Host, bundles: Bundles, caplog: pytest.LogCaptureFixture
) -> None:
    content = bundles.full["2"].read_bytes()
    cut = len(content) // 2
    with BundleServer(content, cut_after=cut) as server:
        result = host.stage(server.url, Authorization="Bearer secret-token")
    assert result["state"] == "staged", result
    assert [seen.range for seen in server.seen] == [None, f"bytes={cut}-"], "resumed where the cut was"
    assert {seen.authorization for seen in server.seen} == {"Bearer secret-token"}
    assert "secret-token" not in caplog.text and "secret-token" not in json.dumps(host.updates.status())
    assert "secret-token" not in json.dumps([event.detail for event in host.store.events(0, 100)])
    assert list(host.config.download_directory.iterdir()) == [], "the download is gone once staged"


def test_a_url_bundle_by_an_untrusted_key_stops_at_its_head(host: Host, bundles: Bundles, tmp_path: Path) -> None:
    """The signature is checked as soon as the head is in: the rest of 48 MiB is never fetched."""
    content = bundles.full["3"].read_bytes()
    host.config = host.updates.config = DaemonConfig(**{**host.config.__dict__, "update_keys_dir": tmp_path})
    with BundleServer(content, delay=0.01) as server:
        started = time.monotonic()
        result = host.stage(server.url + "?token=abc")
    assert result["error"]["name"] == ERROR + "Untrusted", result
    assert time.monotonic() - started < 5, "stopped long before 48 MiB came at 6 MiB/s"
    assert result["source"] == server.url + "?...", "a URL's query is not shown"
    assert list(host.config.download_directory.iterdir()) == [], "the partial download is deleted"
    assert "downloading" in host.phases and "receiving" not in host.phases


def test_cancel_stops_a_download_and_leaves_nothing(host: Host, bundles: Bundles) -> None:
    content = bundles.full["3"].read_bytes()
    with BundleServer(content, delay=0.05) as server:
        update_id = host.updates.stage(server.url, uid=0, method="Stage", reboot=False)
        while host.updates.progress[1] < 1 << 20:
            time.sleep(0.05)
        with pytest.raises(UpdateBusy, match=f"update {update_id} \\(3\\) is staging: one at a time"):
            host.updates.stage(str(bundles.full["2"]), uid=0, method="Stage", reboot=False)
        host.updates.cancel(uid=0, method="Cancel")
        started = time.monotonic()
        result = host.wait(update_id)
        assert time.monotonic() - started < 5, "the download's socket was cut, not waited out"
    assert result["state"] == "cancelled", result
    assert list(host.config.download_directory.iterdir()) == []
    assert leftovers(host.scratch) == NOTHING_LEFT
    assert host.events() == ["Stage", "Cancel", "UpdateCancelled"]
    with pytest.raises(NotStaging):
        host.updates.cancel(uid=0, method="Cancel")


def test_a_version_asked_for_while_it_stages_is_answered_by_that_staging(host: Host, bundles: Bundles) -> None:
    """The version asked for again (by another update of the hub's) while it stages: the answer is
    the staging under way, nothing is fetched for it, and the reboot it asks for is added to that
    staging's. A staging of another version under way is refused, as Stage() refuses it."""
    reboots: list[float] = []
    host.updates.reboot = lambda: reboots.append(time.monotonic())
    with BundleServer(bundles.full["2"].read_bytes()) as server:
        with host.store._lock:  # the worker waits to record the version it read, before it reads the rest
            first = host.updates.stage_version(str(bundles.full["2"]), "2", uid=0, method="Stage", reboot=False)
            while host.updates.status()["version"] != "2":
                time.sleep(0.01)
            again = host.updates.stage_version(server.url, "2", uid=0, method="HubUpdate", reboot=True)
            with pytest.raises(UpdateBusy, match=f"update {first.id} \\(2\\) is staging: one at a time"):
                host.updates.stage_version(str(bundles.full["3"]), "3", uid=0, method="HubUpdate", reboot=True)
        result = host.wait(first.id)
    assert first.state == "staging" and again == first, again
    assert server.seen == [], "nothing fetched for the second"
    assert result["state"] == "staged" and result["reboot"] is True, result
    deadline = time.monotonic() + REBOOT_DELAY + 10
    while not reboots:
        assert time.monotonic() < deadline, host.events()
        time.sleep(0.1)
    time.sleep(0.5)
    assert len(reboots) == 1 and host.completed.empty(), "one staging, one reboot"
    assert host.events() == ["Stage", "HubUpdate", "UpdateStaged", "Reboot"]
    asked = [event.detail for event in host.store.events(0, 100) if event.method == "HubUpdate"]
    assert asked == [{"update": first.id, "version": "2", "reboot": True, "answered": "staging"}]


def test_a_version_staged_already_is_the_answer_and_is_rebooted_into_as_after_a_staging(
    tmp_path: Path, bundles: Bundles
) -> None:
    """The version asked for again after rastosd restarted (the hub agent forgot the update's id):
    its entry boots next, so the answer is `staged`, at once, with nothing fetched, and the reboot
    asked for is the one a staging with reboot makes, REBOOT_DELAY after the answer, recorded the
    same way. Once that entry used up its tries (read from the ESP at each request), it is staged
    again."""
    reboots: list[float] = []
    with host_layout(tmp_path, bundles) as scratch:
        before = make_host(scratch, tmp_path, bundles.keys)
        assert before.stage(bundles.full["2"])["state"] == "staged"
        before.store.close()
        host = make_host(scratch, tmp_path, bundles.keys, reboot=lambda: reboots.append(time.monotonic()))
        try:
            with BundleServer(bundles.full["2"].read_bytes()) as server:
                asked = time.monotonic()
                answer = host.updates.stage_version(server.url, "2", uid=0, method="HubUpdate", reboot=True)
                assert answer == StageAnswer(1, "staged") and reboots == [], "answered before the reboot"
                deadline = time.monotonic() + REBOOT_DELAY + 10
                while not reboots:
                    assert time.monotonic() < deadline, host.events()
                    time.sleep(0.1)
            assert reboots[0] - asked >= REBOOT_DELAY, "the hub agent tells the hub first"
            assert server.seen == [] and host.completed.empty(), "nothing fetched, nothing staged"
            assert host.events() == ["Stage", "UpdateStaged", "HubUpdate", "Reboot"]
            details = [event.detail for event in host.store.events(0, 100)]
            assert details[2:] == [{"update": 1, "version": "2", "reboot": True, "answered": "staged"},
                                   {"update": 1, "version": "2"}]  # fmt: skip
            entry = scratch.esp / "loader/entries/rastos-update-2+3.conf"
            entry.rename(entry.with_name("rastos-update-2+0-3.conf"))  # its tries used up: not staged now
            answer = host.updates.stage_version(str(bundles.full["2"]), "2", uid=0, method="HubUpdate", reboot=False)
            assert answer == StageAnswer(2, "staging")
            assert host.wait(2)["state"] == "staged" and len(reboots) == 1
        finally:
            host.store.close()


def test_running_out_of_space_while_receiving_leaves_nothing(tmp_path: Path, bundles: Bundles) -> None:
    with host_layout(tmp_path, bundles, size="160M") as scratch:
        filler = scratch.top / "filler"
        with filler.open("wb") as out:  # leave about 24 MiB for the 48 MiB of version 3
            free = os.statvfs(scratch.top)
            out.write(b"\0" * max(0, free.f_bavail * free.f_frsize - (24 << 20)))
        subprocess.run(["sync"], check=True)
        host = make_host(scratch, tmp_path, bundles.keys)
        try:
            result = host.stage(bundles.full["3"])
            assert result["error"]["name"] == ERROR + "NoSpace", result
            assert "ran out of space while the image was received" in result["error"]["message"]
            assert leftovers(scratch) == NOTHING_LEFT
        finally:
            host.store.close()


def test_reconcile_removes_what_a_cut_staging_left(host: Host, bundles: Bundles) -> None:
    top, esp = host.scratch.top, host.scratch.esp
    host.stage(bundles.full["2"])
    (top / "@deployments").mkdir(exist_ok=True)
    btrfsutil.create_snapshot(top / "@images/rastos-test-1", top / "@deployments/.incoming-9")
    btrfsutil.create_snapshot(top / "@images/rastos-test-1", top / "@deployments/5")  # placed, never given its entry
    (esp / "rastos/5").mkdir()
    (esp / "rastos/5/linux").write_text("x")
    btrfsutil.create_subvolume(top / "@images/rastos-test-9")  # a receive cut short: writable, no identity
    (esp / "loader/entries/rastos-update-7+2.conf").write_text(
        "title gone\nlinux /rastos/7/linux\noptions root=UUID=host-root rootflags=subvol=@deployments/7 rw\n"
    )
    (esp / "rastos/7").mkdir()
    (esp / "rastos/7/linux").write_text("x")
    (esp / "rastos/2/.linux.0123456789ab").write_text("half a kernel")
    downloads = host.config.download_directory
    downloads.mkdir(exist_ok=True)  # the staging above copied its bundle there
    (downloads / "old.partial").write_text("x")
    os.utime(downloads / "old.partial", (0, 0))
    (downloads / "old.partial.json").write_text("{}")
    (downloads / "fresh.partial").write_text("x")
    (downloads / "fresh.partial.json").write_text("{}")
    (downloads / "done.rbundle").write_text("x")
    done = host.updates.reconcile()
    assert sorted(done) == sorted([
        "removed @images/rastos-test-9: an image whose receive was cut short",
        "removed @deployments/.incoming-9: a deployment whose staging was cut short",
        "removed boot entry rastos-update-7+2.conf: its deployment @deployments/7 is gone",
        "removed @deployments/5: no boot entry names it",
        "removed rastos/2/.linux.0123456789ab: a write to the ESP cut short",
        "removed the download done.rbundle: no staging will go on with it",
        "removed the download old.partial: no staging will go on with it",
        "removed the download old.partial.json: no staging will go on with it",
    ]), done  # fmt: skip
    assert sorted(p.name for p in (top / "@deployments").iterdir()) == ["2"]
    assert sorted(p.name for p in (esp / "rastos").iterdir()) == ["2", KERNEL], "the kernels no entry names went"
    assert sorted(p.name for p in downloads.iterdir()) == ["fresh.partial", "fresh.partial.json"]
    assert host.updates.reconcile() == [], "all in agreement now"


def test_a_kernel_directory_goes_with_the_last_entry_that_names_it(host: Host, bundles: Bundles) -> None:
    host.stage(bundles.full["2"])
    entries = host.entries
    path = host.scratch.esp / "loader/entries/rastos-update-2+3.conf"
    copy = path.with_name("rastos-snapshot-4+3.conf")
    copy.write_text(path.read_text().replace("@deployments/2", "@snapshots/4/deployment"))
    entries.remove_entry(path)
    assert (host.scratch.esp / "rastos/2/linux").is_file(), "the snapshot's entry still names it"
    entries.remove_entry(copy)
    assert not (host.scratch.esp / "rastos/2").exists()
    assert (host.scratch.esp / "rastos" / KERNEL).is_dir(), "the running entry's stays"
    assert stat.S_ISDIR((host.scratch.esp / "rastos").stat().st_mode)


def test_a_version_whose_kernel_directory_another_root_uses_is_refused(host: Host, bundles: Bundles) -> None:
    """vfat folds case: a version named like another entry's kernel directory would overwrite it."""
    entries = host.scratch.esp / "loader/entries"
    (entries / "rastos-other.conf").write_text(
        "title other\nlinux /rastos/2/linux\ninitrd /rastos/2/initrd\n"
        "options root=UUID=host-root rootflags=subvol=@other rw\n"
    )
    (host.scratch.esp / "rastos/2").mkdir()
    (host.scratch.esp / "rastos/2/linux").write_text("the other root's kernel\n")
    result = host.stage(bundles.full["2"])
    assert result["state"] == "failed", result
    assert "would share its boot entry or kernel directory with rastos-other.conf" in result["error"]["message"]
    assert (host.scratch.esp / "rastos/2/linux").read_text() == "the other root's kernel\n"
    assert sorted(p.name for p in (host.scratch.top / "@images").iterdir()) == ["rastos-test-1"]


def test_the_status_any_caller_reads_stays_small_whatever_the_history() -> None:
    from daemon.updates.service import SHOWN_STEPS, _bounded

    steps = [{"job": number, "op": "sysctl", "changed": True} for number in range(5000)]
    hand = [{"path": "/etc/issue", "change": "modified", "diff": "x" * 60000}]
    result = {"state": "staged", "carried": {"reapplied": steps, "hand_changes": hand, "chain": ["@"] * 100}}
    shown = _bounded(result)
    assert shown["carried"]["reapplied"] == steps[-SHOWN_STEPS:] and shown["carried"]["reapplied_count"] == 5000
    assert "hand_changes" not in shown["carried"] and "chain" not in shown["carried"]
    assert len(json.dumps(shown)) < 4096


def esp_state(scratch: ScratchRoot) -> dict[str, str]:
    """Every file on the ESP but the filler, with its content."""
    return {str(p.relative_to(scratch.esp)): p.read_text() for p in sorted(scratch.esp.rglob("*"))
            if p.is_file() and p.name != "filler"}  # fmt: skip


def test_a_full_esp_while_a_version_is_staged_again_keeps_the_earlier_staging(tmp_path: Path, bundles: Bundles) -> None:
    """The ESP fills up (another writer) while the version is staged a second time: the new kernel
    cannot be written, and the earlier staging still boots next, its entry, kernel and deployment
    as they were."""
    with host_layout(tmp_path, bundles) as scratch, small_esp(scratch) as small:
        filled: list[Path] = []

        def filling(new_root: Path, running_root: Path, pristine: Path | None) -> dict[str, Any]:
            if len(filled) == 1:  # the second staging
                filled.append(fill(small.esp))
            filled.append(new_root)
            return carry_nothing(new_root, running_root, pristine)

        host = make_host(small, tmp_path, bundles.keys, prepare=filling)
        try:
            assert host.stage(bundles.full["2"])["state"] == "staged"
            before = esp_state(small)
            result = host.stage(bundles.full["2"])
            assert result["state"] == "failed" and result["error"]["name"] == ERROR + "NoSpace", result
            assert esp_state(small) == before, "nothing on the ESP changed"
            assert sorted(p.name for p in (small.top / "@deployments").iterdir()) == ["2"]
            assert host.updates.status()["staged_version"] == "2"
            filled[1].unlink()
            again = host.stage(bundles.full["2"])
            assert again["state"] == "staged" and again["replaced"] == ["@deployments/2"], again
            assert sorted(p.name for p in (small.esp / "rastos").iterdir()) == ["2@3", KERNEL]
        finally:
            host.store.close()


def test_a_cancel_while_a_version_is_staged_again_keeps_the_earlier_staging(host: Host, bundles: Bundles) -> None:
    """Cancelled as the new kernel is written: the earlier staging was never touched."""
    assert host.stage(bundles.full["2"])["state"] == "staged"
    before = esp_state(host.scratch)
    asked: list[str] = []

    def cancel_when_installing(progress: tuple[str, int, int]) -> None:
        if progress[0] == "installing" and not asked:
            asked.append(progress[0])
            host.updates.cancel(uid=0, method="Cancel")

    host.updates.on_progress.append(cancel_when_installing)
    result = host.stage(bundles.full["2"])
    assert result["state"] == "cancelled" and asked, result
    assert esp_state(host.scratch) == before, "the earlier entry and kernel as they were"
    assert sorted(p.name for p in (host.scratch.top / "@deployments").iterdir()) == ["2"]
    assert "sort-key rastos-1" in entry_text(host, "2").splitlines()
    assert host.updates.status()["staged_version"] == "2"


def test_a_staging_cut_before_stagings_recorded_their_deployment_is_judged_by_its_version(tmp_path: Path) -> None:
    """A store made before the deployment was recorded: a staging cut then had placed
    @deployments/VERSION, as every staging did, and is staged if an entry names that."""
    database = tmp_path / "state.db"
    old = sqlite3.connect(database)
    for version, script in enumerate(MIGRATIONS[:6]):
        old.executescript(f"BEGIN; {script}; PRAGMA user_version = {version + 1}; COMMIT;")
    old.execute(
        "INSERT INTO updates (uid, source, reboot, state, created, version) VALUES (0, 'x', 0, 'staging', 0, '2')"
    )
    old.execute("INSERT INTO updates (uid, source, reboot, state, created) VALUES (0, 'y', 0, 'staging', 0)")
    old.commit()
    old.close()
    store = StateStore(database)
    try:
        asked: list[str] = []

        def entry_written(deployment: str) -> bool:
            asked.append(deployment)
            return True

        failed = store.interrupt_unfinished_updates(entry_written)
        assert asked == ["@deployments/2"] and [update_id for update_id, _ in failed] == [2]
        last = store.last_update()
        assert last is not None and last.state == "failed", last
    finally:
        store.close()


# Kernels of update deployments go with the last entry that names them, whichever path removes it


def snapshots_on(host: Host, root: str, keep_pairs: int = 10) -> Snapshots:
    """rastosd's snapshots of `root`, as if it ran: their entries copy its entry, and so its kernel."""
    snapshots = Snapshots(SnapshotLayout(host.scratch.top / root, host.scratch.snapshots), host.store, keep_pairs,
                          host.entries)  # fmt: skip
    snapshots.running_root = root
    return snapshots


def kernels(host: Host) -> list[str]:
    return sorted(path.name for path in (host.scratch.esp / "rastos").iterdir())


def test_a_kernel_stays_while_any_snapshot_entry_names_it_and_goes_with_the_last(host: Host, bundles: Bundles) -> None:
    """Snapshots taken on version 2 name its kernel: removing its own entry, snapshot retention and
    deleting all but the last snapshot keep it; deleting the last one (its read-only entry and its
    rollback entry) takes it. The running entry's kernel is never taken."""
    host.stage(bundles.full["2"])
    snapshots = snapshots_on(host, "@deployments/2", keep_pairs=0)
    kept = snapshots.create("before the rollback", "manual", uid=0, method="Create")
    pre = snapshots.create("pre", "pre", uid=0, method="Job")
    snapshots.create("post", "post", uid=0, method="Job", pre_id=pre)
    deployment = snapshots.make_deployment(kept)
    host.entries.add_for_snapshot(kept, "before", subvolume_path(deployment), "@deployments/2", time.time())
    for path in (host.scratch.esp / "loader/entries").glob("*snapshot*"):
        assert "linux /rastos/2/linux" in path.read_text().splitlines(), path.name
    remove_deployment(HostLayout(host.scratch.top), host.entries, host.scratch.top / "@deployments/2", "rastos")
    assert kernels(host) == ["2", KERNEL], "the snapshots' entries still name it"
    assert snapshots.cleanup(booted_snapshot=None) == [pre, pre + 1]
    assert kernels(host) == ["2", KERNEL], "snapshot retention took the pair, not the kernel the other names"
    snapshots.delete(kept, uid=0, method="Delete", booted_snapshot=None)
    assert kernels(host) == [KERNEL], "gone with the last entry that named it; the running entry's stays"
    assert (host.scratch.esp / "loader/entries/rastos-test.conf").is_file()


def test_snapshot_entries_reconciled_away_take_the_kernel_they_named_last(
    host: Host, bundles: Bundles, tmp_path: Path
) -> None:
    """A rollback deployment removed behind rastosd's back: the next start removes its entry, and the
    kernel stays for the snapshot's read-only entry. A state store that was lost: the next start
    removes the entries of the snapshots it does not know, and the kernel they were the last to name."""
    host.stage(bundles.full["2"])
    snapshots = snapshots_on(host, "@deployments/2")
    taken = snapshots.create("on version 2", "manual", uid=0, method="Create")
    deployment = snapshots.make_deployment(taken)
    host.entries.add_for_snapshot(taken, "on 2", subvolume_path(deployment), "@deployments/2", time.time())
    remove_deployment(HostLayout(host.scratch.top), host.entries, host.scratch.top / "@deployments/2", "rastos")
    btrfsutil.delete_subvolume(deployment)
    done = snapshots.reconcile(None)
    assert done == [f"removed boot entry rastos-snapshot-{taken}+3.conf: its subvolume is gone"], done
    assert kernels(host) == ["2", KERNEL], "the read-only entry still names it"
    forgotten = StateStore(tmp_path / "lost" / "state.db")
    try:
        lost = Snapshots(snapshots.layout, forgotten, 10, host.entries)
        done = lost.reconcile(None)
    finally:
        forgotten.close()
    assert done == [f"removed boot entry readonly-snapshot-{taken}.conf: its subvolume is gone"], done
    assert kernels(host) == [KERNEL]


def test_a_kernel_whose_last_entry_went_in_a_cut_is_removed_at_the_next_start(host: Host, bundles: Bundles) -> None:
    """A cut between an entry's removal and its kernel's leaves a kernel directory no entry names:
    the next start removes it if a staging of this host put it there, and leaves any other alone
    (kernel-install's, say)."""
    host.stage(bundles.full["2"])
    host.stage(bundles.full["3"])
    for path in (host.scratch.esp / "loader/entries").glob("rastos-update-2*"):
        path.unlink()  # the entry went, the kernel not yet
    btrfsutil.delete_subvolume(host.scratch.top / "@deployments/2")
    (host.scratch.esp / "rastos/6.2.0-other").mkdir()
    (host.scratch.esp / "rastos/6.2.0-other/linux").write_text("not rastosd's\n")
    done = host.updates.reconcile()
    assert done == ["removed rastos/2 from the ESP: no entry names it (its last entry's removal was cut short)"], done
    assert kernels(host) == ["3", KERNEL, "6.2.0-other"]
    assert host.updates.reconcile() == []


# Retention: what a host keeps of its updates once a boot is known good


def reboot(host: Host, running: str, boot: str) -> Host:
    """The host booted into `running` and the boot found good: its entry blessed (the boot counter
    dropped, as systemd-bless-boot does) and the boot recorded good (as MarkGood does)."""
    host.store.close()
    for root, path in host.entries.update_entries():
        if root == running and tries_left(path.name) is not None:
            path.rename(path.with_name(entry_id(path.name)))
    booted = make_host(host.scratch, host.config.state_dir.parent, host.config.update_keys_dir, running)
    booted.store.record_boot(boot, running)
    booted.store.mark_known_good(None, 0, boot)
    return booted


def subvolumes(host: Host, directory: str) -> list[str]:
    return sorted(path.name for path in (host.scratch.top / directory).iterdir())


KEPT = "neither the running deployment, the fallback nor the staged one"


def test_retention_keeps_the_running_the_fallback_the_staged_and_the_images_they_were_made_from(
    host: Host, bundles: Bundles
) -> None:
    """A host's life: installed from version 1 (@), updated to 2 (a delta), to 3, then to 1 again.
    At each good boot: the running deployment, the fallback (the last other root a boot was good on)
    and the staged one stay, and the images they were made from; the rest goes. A snapshot taken on
    version 2 keeps version 2's kernel when its deployment goes."""
    hosts = [host]
    try:
        host.store.record_boot("boot-1", "@")
        host.store.mark_known_good(None, 0, "boot-1")
        assert host.stage(bundles.delta)["state"] == "staged"
        assert host.updates.collect("test") == [], "staged: it boots next"
        hosts.append(on_2 := reboot(host, "@deployments/2", "boot-2"))
        assert on_2.updates.collect("test") == [], "@ is the fallback: its image (version 1) stays"
        snapshots_on(on_2, "@deployments/2").create("on version 2", "manual", uid=0, method="Create")
        assert on_2.stage(bundles.full["3"])["state"] == "staged"
        hosts.append(on_3 := reboot(on_2, "@deployments/3", "boot-3"))
        assert on_3.updates.collect("test") == ["removed @images/rastos-test-1: no deployment kept was made from it"]
        assert subvolumes(on_3, "@deployments") == ["2", "3"] and (host.scratch.top / "@").is_dir(), (
            "@ is not collected"
        )
        assert on_3.stage(bundles.full["1"])["received"] is True
        hosts.append(on_1 := reboot(on_3, "@deployments/1", "boot-4"))
        assert on_1.updates.collect("test") == [
            f"removed @deployments/2 (version 2): {KEPT}",
            "removed @images/rastos-test-2: no deployment kept was made from it",
        ]
        assert subvolumes(on_1, "@deployments") == ["1", "3"], "running and fallback"
        assert subvolumes(on_1, "@images") == ["rastos-test-1", "rastos-test-3"]
        entries = sorted(p.name for p in (host.scratch.esp / "loader/entries").iterdir())
        assert entries == [
            "rastos-test.conf",
            "rastos-update-1.conf",
            "rastos-update-3.conf",
            "readonly-snapshot-1.conf",
        ]
        assert kernels(on_1) == ["1", "2", "3", KERNEL], "version 2's kernel stays for the snapshot's entry"
        cleanups = [event.detail for event in on_1.store.events(0, 1000) if event.method == "UpdateCleanup"]
        assert [len(detail["actions"]) for detail in cleanups] == [1, 2] and cleanups[0]["why"] == "test"
        assert on_1.updates.collect("test") == [], "nothing more to do"
    finally:
        for each in hosts:
            each.store.close()


def test_a_deployment_a_boot_fell_back_from_is_kept_for_that_boot_only(host: Host, bundles: Bundles) -> None:
    host.store.record_boot("boot-1", "@")
    host.store.mark_known_good(None, 0, "boot-1")
    host.stage(bundles.full["2"])
    entry = host.scratch.esp / "loader/entries/rastos-update-2+3.conf"
    entry.rename(entry.with_name("rastos-update-2+0-3.conf"))  # its tries used up: @ boots again
    fell_back = reboot(host, "@", "boot-2")
    try:
        assert fell_back.updates.collect("test", failed="@deployments/2") == [], "kept while this boot reports it"
        assert subvolumes(fell_back, "@deployments") == ["2"]
    finally:
        fell_back.store.close()
    later = reboot(fell_back, "@", "boot-3")
    try:
        assert later.updates.collect("test") == [
            f"removed @deployments/2 (version 2): {KEPT}",
            "removed @images/rastos-test-2: no deployment kept was made from it",
        ]
        assert kernels(later) == [KERNEL]
        assert sorted(p.name for p in (host.scratch.esp / "loader/entries").iterdir()) == ["rastos-test.conf"]
    finally:
        later.store.close()


def test_retention_waits_while_a_staging_runs(tmp_path: Path, bundles: Bundles) -> None:
    with host_layout(tmp_path, bundles) as scratch:
        during: list[list[str]] = []
        hosts: list[Host] = []

        def collecting(new_root: Path, running_root: Path, pristine: Path | None) -> dict[str, Any]:
            during.append(hosts[0].updates.collect("test"))
            return carry_nothing(new_root, running_root, pristine)

        hosts.append(host := make_host(scratch, tmp_path, bundles.keys, prepare=collecting))
        try:
            host.stage(bundles.full["2"])
            host.stage(bundles.full["3"])
            assert during == [[], []], "nothing collected while a staging ran"
            assert host.updates.collect("test") == [
                f"removed @deployments/2 (version 2): {KEPT}",
                "removed @images/rastos-test-2: no deployment kept was made from it",
            ]
        finally:
            host.store.close()


def test_retention_removes_nothing_without_the_boot_entries(host: Host, bundles: Bundles) -> None:
    """An ESP not mounted shows no entries: which deployment is staged cannot be told, so none goes."""
    host.stage(bundles.full["2"])
    host.stage(bundles.full["3"])
    entries = host.scratch.esp / "loader/entries"
    entries.rename(entries.with_name("elsewhere"))
    entries.mkdir()
    assert host.updates.collect("test") == []
    assert subvolumes(host, "@deployments") == ["2", "3"]
    assert subvolumes(host, "@images") == ["rastos-test-1", "rastos-test-2", "rastos-test-3"]


def test_reconcile_keeps_the_later_of_two_entries_of_a_version(host: Host, bundles: Bundles) -> None:
    """What a second staging of version 2 cut right after writing its entry leaves, when the earlier
    entry had another file name (it had been tried once): both entries, both deployments, both
    kernels. The later deployment stays, the earlier goes with its entry and kernel."""
    top, esp = host.scratch.top, host.scratch.esp
    host.stage(bundles.full["2"])
    earlier = esp / "loader/entries/rastos-update-2+3.conf"
    tried = earlier.rename(earlier.with_name("rastos-update-2+2-1.conf"))
    btrfsutil.create_snapshot(top / "@images/rastos-test-2", top / "@deployments/2@5")
    shutil.copytree(esp / "rastos/2", esp / "rastos/2@5")
    earlier.write_text(
        tried.read_text().replace("/rastos/2/", "/rastos/2@5/").replace("@deployments/2 ", "@deployments/2@5 ")
    )
    done = host.updates.reconcile()
    assert done == [
        "removed boot entry rastos-update-2+2-1.conf: @deployments/2@5 replaces its deployment @deployments/2",
        "removed @deployments/2: no boot entry names it",
    ], done
    assert subvolumes(host, "@deployments") == ["2@5"] and kernels(host) == ["2@5", KERNEL]
    assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == ["rastos-test.conf", "rastos-update-2+3.conf"]
    assert host.updates.status()["staged_version"] == "2"
