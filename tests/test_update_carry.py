"""A new deployment made the host's own, on real Debian trees: the host's history made by the real
daemon core (jobs, snapshots, a rollback, a confirmation that ran out) on a btrfs root, then
prepare_deployment on a fresh snapshot of the image.

The image (`@images/v1`, read-only) is the pristine tree; the host ran `@` from it, rolled back to the
snapshot taken before one of its jobs, booted that deployment and went on there; the new tree is
another writable snapshot of the image, as a received bundle would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.config import DaemonConfig
from daemon.core import Daemon
from daemon.jobs import FINAL_STATES, FLAG_DRY_RUN
from daemon.snapshots import subvolume_path
from daemon.store import StateStore
from daemon.updates.carry import CarryFailed, prepare_deployment
from daemon.updates.history import RECORD, held_steps
from ops.rootfs import Root
from ops.steps import checked_step, step_from
from tests.daemon_fixtures import ENTRY
from tests.op_tree import op_tree_base, tree_digest  # noqa: F401  (fixtures)
from tests.test_op_library import KEY

pytestmark = [pytest.mark.root, pytest.mark.network]

NOBODY = 65534
MACHINE_ID = "0123456789abcdef0123456789abcdef\n"
HUB_TOKEN = "host-token-5f1e9c\n"
DAEMON_TOML = '[hub]\nurl = "wss://hub.example.org/agent"\n'
IMAGE_DAEMON_TOML = "[snapshots]\nkeep_pairs = 10\n"
HOST_UPDATE_KEY = "-----BEGIN PUBLIC KEY-----\nhost's own\n-----END PUBLIC KEY-----\n"
IMAGE_UPDATE_KEY = "-----BEGIN PUBLIC KEY-----\nbuilder\n-----END PUBLIC KEY-----\n"
IMAGE_HUB_CA = "-----BEGIN CERTIFICATE-----\nthe image's\n-----END CERTIFICATE-----\n"
# A hub appliance's: the image's listens on loopback; the host's serves the fleet over TLS.
IMAGE_HUB_ENV = "RASTOS_HUB_OPTIONS=--listen 127.0.0.1:8470\n"
HUB_ENV = "RASTOS_HUB_OPTIONS=--listen 0.0.0.0:8470 --tls-cert /var/lib/rastos-hub/tls/hub.crt\n"
HUB_CA = "-----BEGIN CERTIFICATE-----\nenrolment's\n-----END CERTIFICATE-----\n"
DECLARED = '[motd]\ntext = "Declared in rastos.toml"\n'
SECRET = "carry-test-secret-31c7"


@dataclass
class Host:
    top: Path
    pristine: Path
    running: Path  # the rollback deployment the host runs now
    subvolume: str  # as the boots table names it
    database: Path
    jobs: dict[str, int] = field(default_factory=dict)
    made: list[Path] = field(default_factory=list)  # subvolumes to delete after

    def store(self) -> StateStore:
        return StateStore(self.database)

    def snapshot(self, source: Path, name: str) -> Path:
        path = self.top / name
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", source, path], check=True)
        self.made.append(path)
        return path

    def prepare(self, new_root: Path, running: Path | None = None, *, pristine: bool = True) -> dict[str, Any]:
        store = self.store()
        try:
            result = prepare_deployment(new_root, running or self.running, self.pristine if pristine else None, store,
                                        running_subvolume=self.subvolume)  # fmt: skip
        finally:
            store.close()
        json.dumps(result)  # JSON-able, as the stager sends it on
        return result


def btrfs(*args: str | Path) -> None:
    subprocess.run(["btrfs", "-q", *map(str, args)], check=True)


def write(root: Path, path: str, content: str, mode: int = 0o644) -> None:
    file = root / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(content)
    file.chmod(mode)


def make_image(base: Path, top: Path) -> Path:
    """The pristine image: the Debian tree with what an image brings of rastOS's, made read-only."""
    image = top / "@images" / "v1"
    image.parent.mkdir(parents=True)
    btrfs("subvolume", "snapshot", base, image)
    write(image, "/etc/rastos/daemon.toml", IMAGE_DAEMON_TOML)
    write(image, "/etc/rastos/hub-ca.pem", IMAGE_HUB_CA)
    write(image, "/etc/rastos-hub/hub.env", IMAGE_HUB_ENV, 0o640)
    write(image, "/etc/rastos/update-keys.d/builder.pub", IMAGE_UPDATE_KEY)
    write(image, "/etc/fstab", fstab(*HOST_IDS))
    write(image, "/etc/kernel/cmdline", cmdline(HOST_IDS[0]))
    btrfs("property", "set", "-ts", image, "ro", "true")
    return image


# The file systems of the image the host was installed from, and those a later build made.
HOST_IDS = ("0b1e8a57-3c5c-4d6e-9f10-1a2b3c4d5e6f", "12AB-34CD")
NEW_IDS = ("7d0c4a31-9e8f-4b2a-8c6d-5e4f3a2b1c0d", "56EF-78AB")


def fstab(root: str, esp: str) -> str:
    return (f"UUID={root}\t/\tbtrfs\tnoatime\t0 0\nUUID={root}\t/home\tbtrfs\tsubvol=/@home,noatime\t0 0\n"
            f"UUID={esp}\t/efi\tvfat\tumask=0077,noauto\t0 0\n")  # fmt: skip


def cmdline(root: str) -> str:
    return f"root=UUID={root} rootflags=subvol=@ rw quiet\n"


def make_host_files(root: Path) -> None:
    """What a host has that no image does: its identity, its token, its admin's settings."""
    write(root, "/etc/machine-id", MACHINE_ID, 0o444)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    key = root / "etc/ssh/ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", key], check=True)
    write(root, "/etc/rastos/hub-token", HUB_TOKEN, 0o600)
    write(root, "/etc/rastos/daemon.toml", DAEMON_TOML, 0o640)
    write(root, "/etc/rastos/hub-ca.pem", HUB_CA)  # enrolment's (Hub.Join); the image's is another
    write(root, "/etc/rastos-hub/hub.env", HUB_ENV, 0o640)
    write(root, "/etc/rastos/update-keys.d/host.pub", HOST_UPDATE_KEY)
    write(root, "/etc/rastos/rastos.toml", DECLARED, 0o640)


def hand_edit(root: Path) -> None:
    with (root / "etc/issue").open("a") as issue:
        issue.write("Hand-edited banner\n")
    write(root, "/etc/carry-test.conf", "setting = 1\n")
    with (root / "etc/sudoers").open("a") as sudoers:  # 0440: root writes it all the same
        sudoers.write("# a hand edit\n")
    (root / "etc/issue.net").chmod(0o600)
    for table, line in (("passwd", "bob:x:1500:1500::/home/bob:/bin/sh"), ("group", "bob:x:1500:")):
        with (root / "etc" / table).open("a") as file:  # an account made by hand, not through rastosd
            file.write(line + "\n")


def config_for(root: Path, top: Path) -> DaemonConfig:
    return DaemonConfig(root=root, snapshots_dir=top / "@snapshots", state_dir=top / "state", esp=top / "esp")


async def run_job(daemon: Daemon, kind: str, steps: list[dict[str, Any]], flags: int = 0) -> dict[str, Any]:
    """A job as the bus face submits one, run by the daemon's own worker to its end."""
    checked = [step_from(daemon.target, s["op"], s["params"], f"steps[{i}]") for i, s in enumerate(steps)]
    job = daemon.jobs.submit(kind, checked, flags, 0, "RunPipeline" if kind == "pipeline" else "Apply")
    while job.state not in FINAL_STATES:
        await asyncio.sleep(0.02)
    assert job.state == "done", job.result
    return {"id": job.id, **job.result}


def rollback(daemon: Daemon, snapshot_id: int) -> None:
    """Rollback() as the bus face does it: the deployment and its entry, then the event."""
    entry = daemon.prepare_rollback(snapshot_id)
    daemon.store.record(0, "Rollback", None, snapshot=snapshot_id, entry=entry)


async def first_boot(config: DaemonConfig, jobs: dict[str, int]) -> int:
    """On @: a user and the host name, two sysctl files; then a rollback to before the second one."""
    daemon = Daemon(config)
    daemon.store.record_boot("boot-1", daemon.root_subvolume)  # as service.py does at start
    worker = asyncio.ensure_future(daemon.jobs.run_forever())
    try:
        user = {"op": "user", "params": {"name": "alice", "authorized_keys": [KEY], "sudo": True}}
        hostname = {"op": "hostname", "params": {"hostname": "carry-host"}}
        jobs["user"] = (await run_job(daemon, "pipeline", [user, hostname]))["id"]
        jobs["sysctl"] = (await run_job(daemon, "apply", [sysctl("90-rastos", "vm.swappiness", "10")]))["id"]
        undone = await run_job(daemon, "apply", [sysctl("80-undone", "vm.dirty_ratio", "5")])
        jobs["undone"] = undone["id"]
        rollback(daemon, undone["snapshots"]["pre"])
        return int(undone["snapshots"]["pre"])
    finally:
        worker.cancel()
        daemon.store.close()


async def second_boot(config: DaemonConfig, jobs: dict[str, int]) -> None:
    """On the rollback deployment: another sysctl file, a dry run, a risky change left to revert, an
    upgrade that installed a package, and a rollback prepared but never booted."""
    daemon = Daemon(config)
    daemon.store.record_boot("boot-2", daemon.root_subvolume)
    worker = asyncio.ensure_future(daemon.jobs.run_forever())
    try:
        after = await run_job(daemon, "apply", [sysctl("85-after", "vm.dirty_background_ratio", "3")])
        jobs["after"] = after["id"]
        dry = {"op": "hostname", "params": {"hostname": "dry"}}
        jobs["dry"] = (await run_job(daemon, "apply", [dry], FLAG_DRY_RUN))["id"]
        ssh = {"op": "ssh", "params": {"port": 2222, "confirm_timeout": 1}}
        kept = sysctl("70-kept", "vm.overcommit_memory", "1")
        jobs["reverted"] = (await run_job(daemon, "pipeline", [kept, ssh]))["id"]
        while (daemon.store.confirmation(jobs["reverted"]) or {}).get("state") != "reverted":
            await asyncio.sleep(0.1)
        jobs["upgrade"] = record_upgrade(daemon.store)
        rollback(daemon, after["snapshots"]["pre"])  # never booted: job "after" stays in the running root
    finally:
        worker.cancel()
        daemon.store.close()


def sysctl(name: str, key: str, value: str) -> dict[str, Any]:
    return {"op": "sysctl", "params": {"name": name, "settings": {key: value}}}


def record_upgrade(store: StateStore) -> int:
    """An upgrade job's rows as jobs.py writes them (running one would need the network)."""
    step = checked_step("update", {"packages": ["htop"]}, "").as_json()
    job_id = store.add_job("apply", [step], 0, 0, "Apply")
    store.set_job_state(job_id, "running")
    store.set_step(job_id, 0, "changed", {"op": "update", "state": "changed", "changes": []})
    store.set_job_state(job_id, "done", {"steps": [{"op": "update", "state": "changed"}], "state": "done"})
    return job_id


@pytest.fixture(scope="module")
def host(op_tree_base: Path) -> Iterator[Host]:  # noqa: F811
    top = op_tree_base.parent / "carry"
    top.mkdir()
    pristine = make_image(op_tree_base, top)
    btrfs("subvolume", "snapshot", pristine, top / "@")
    btrfs("subvolume", "create", top / "@snapshots")
    (top / "esp/loader/entries").mkdir(parents=True)
    (top / "esp/loader/entries/rastos-0.conf").write_text(ENTRY)
    make_host_files(top / "@")
    jobs: dict[str, int] = {}
    snapshot = asyncio.run(first_boot(config_for(top / "@", top), jobs))
    running = top / "@snapshots" / str(snapshot) / "deployment"
    asyncio.run(second_boot(config_for(running, top), jobs))
    hand_edit(running)
    made = Host(top, pristine, running, subvolume_path(running), top / "state/state.db", jobs)
    try:
        yield made
    finally:
        for path in reversed(made.made):
            subprocess.run(["btrfs", "-q", "subvolume", "delete", path], check=False, capture_output=True)


@pytest.fixture(scope="module")
def prepared(host: Host) -> tuple[Path, dict[str, Any]]:
    new_root = host.snapshot(host.pristine, "new-1")
    return new_root, host.prepare(new_root)


Prepared = tuple[Path, dict[str, Any]]


def reapplied(result: dict[str, Any]) -> list[tuple[int | None, str]]:
    return [(entry["job"], entry["op"]) for entry in result["reapplied"]]


def test_host_state_is_reapplied_and_rolled_back_jobs_are_not(host: Host, prepared: Prepared) -> None:
    new_root, result = prepared
    jobs = host.jobs
    assert reapplied(result) == [
        (None, "motd"), (jobs["user"], "user"), (jobs["user"], "hostname"), (jobs["sysctl"], "sysctl"),
        (jobs["after"], "sysctl"), (jobs["reverted"], "sysctl"),
    ]  # fmt: skip
    assert all(entry["changed"] for entry in result["reapplied"])
    assert (new_root / "etc/motd").read_text() == "Declared in rastos.toml\n"
    assert (new_root / "etc/hostname").read_text() == "carry-host\n"
    assert "127.0.1.1\tcarry-host" in (new_root / "etc/hosts").read_text()
    alice = [line for line in (new_root / "etc/passwd").read_text().splitlines() if line.startswith("alice:")]
    on_host = [line for line in (host.running / "etc/passwd").read_text().splitlines() if line.startswith("alice:")]
    assert alice == on_host, "the same uid and gid: her home on @home keeps its owner"
    assert KEY in (new_root / "home/alice/.ssh/authorized_keys").read_text()
    assert (new_root / "etc/sudoers.d/rastos-alice").stat().st_mode & 0o777 == 0o440
    assert "vm.swappiness = 10" in (new_root / "etc/sysctl.d/90-rastos.conf").read_text()
    assert "vm.dirty_background_ratio = 3" in (new_root / "etc/sysctl.d/85-after.conf").read_text()
    assert "vm.overcommit_memory = 1" in (new_root / "etc/sysctl.d/70-kept.conf").read_text()
    # Undone by the rollback the host booted; the dry run changed nothing; the ssh change was put back.
    assert not (new_root / "etc/sysctl.d/80-undone.conf").exists()
    assert (host.running / "etc/hostname").read_text() == "carry-host\n"
    assert not (new_root / "etc/ssh/sshd_config.d/10-rastos.conf").exists()
    skipped = {(entry.get("job"), entry.get("op")): entry["reason"] for entry in result["not_reapplied"]}
    assert "rolled back" in skipped[(jobs["undone"], None)]
    assert "not confirmed in time" in skipped[(jobs["reverted"], "ssh")]
    assert "htop" in skipped[(jobs["upgrade"], "update")]
    assert all(entry.get("job") != jobs["dry"] for entry in result["not_reapplied"] + result["reapplied"])
    assert result["warnings"] == []
    assert result["chain"] == [host.subvolume, subvolume_path(host.top / "@")]
    record = json.loads((new_root / RECORD.lstrip("/")).read_text())
    assert {job for job, _ in record["steps"]} == {jobs[name] for name in ("user", "sysctl", "after", "reverted",
                                                                           "upgrade")}  # fmt: skip


def test_identity_and_secrets_are_carried_byte_for_byte(host: Host, prepared: Prepared) -> None:
    new_root, result = prepared
    carried = {entry["path"] for entry in result["carried"] if entry["action"] == "copied"}
    for path in ("/etc/machine-id", "/etc/rastos/hub-token", "/etc/ssh/ssh_host_ed25519_key",
                 "/etc/ssh/ssh_host_ed25519_key.pub", "/etc/rastos/rastos.toml", "/etc/rastos/daemon.toml",
                 "/etc/rastos/hub-ca.pem", "/etc/rastos/update-keys.d/host.pub",
                 "/etc/rastos-hub/hub.env"):  # fmt: skip
        assert path in carried
        source, copy = host.running / path.lstrip("/"), new_root / path.lstrip("/")
        assert copy.read_bytes() == source.read_bytes(), path
        assert (copy.stat().st_mode, copy.stat().st_uid, copy.stat().st_gid) == (
            source.stat().st_mode, source.stat().st_uid, source.stat().st_gid), path  # fmt: skip
    assert (new_root / "etc/rastos/hub-token").stat().st_mode & 0o777 == 0o600
    # The host had only an ed25519 key: the image's other types go, the host shows its own keys only.
    assert sorted(p.name for p in (new_root / "etc/ssh").glob("ssh_host_*")) == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]  # fmt: skip
    assert "/etc/rastos/update-keys.d/builder.pub" not in carried, "the image's key is the new image's to keep"
    assert (new_root / "etc/rastos/update-keys.d/builder.pub").read_text() == IMAGE_UPDATE_KEY
    assert result["not_carried"] == []


def test_hand_changes_are_reported_with_diffs_only_where_everyone_may_read(
    prepared: Prepared,
) -> None:
    _, result = prepared
    changes = {entry["path"]: entry for entry in result["hand_changes"]}
    issue = changes["/etc/issue"]
    assert issue["change"] == "modified" and "+Hand-edited banner" in issue["diff"]
    added = changes["/etc/carry-test.conf"]
    assert added["change"] == "added" and "+setting = 1" in added["diff"]
    sudoers = changes["/etc/sudoers"]
    assert sudoers["change"] == "modified" and "diff" not in sudoers and "not shown" in sudoers["content"]
    assert changes["/etc/issue.net"]["change"] == "mode" and "diff" not in changes["/etc/issue.net"]
    carried_or_reapplied = {
        "/etc/hostname", "/etc/hosts", "/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/motd",
        "/etc/sysctl.d/90-rastos.conf", "/etc/sudoers.d/rastos-alice", "/etc/machine-id", "/etc/rastos/rastos.toml",
        "/etc/rastos/daemon.toml", "/etc/rastos/hub-token", "/etc/ssh/ssh_host_ed25519_key", "/etc/shadow-",
    }  # fmt: skip
    assert not carried_or_reapplied - {"/etc/passwd", "/etc/group"} & set(changes), sorted(changes)
    assert sorted(changes) == [
        "/etc/carry-test.conf", "/etc/group", "/etc/issue", "/etc/issue.net", "/etc/passwd", "/etc/sudoers"
    ], changes  # fmt: skip
    # The account files are the user op's, but what the new tree still lacks of them is named.
    assert changes["/etc/passwd"]["detail"] == "accounts made by hand that the new deployment lacks: bob"
    assert changes["/etc/group"]["detail"] == "groups made by hand that the new deployment lacks: bob"
    assert "diff" not in changes["/etc/passwd"]
    assert result["hand_changes_truncated"] == 0


def test_a_second_prepare_on_a_fresh_copy_gives_the_same_result(host: Host, prepared: Prepared) -> None:
    first_root, first = prepared
    second_root = host.snapshot(host.pristine, "new-2")
    assert host.prepare(second_root) == first
    for part in ("etc", "home"):
        assert tree_digest(second_root / part) == tree_digest(first_root / part), part
    again = host.prepare(second_root)
    assert not any(entry["changed"] for entry in again["reapplied"]), "everything is in place already"
    assert again["hand_changes"] == first["hand_changes"]


def test_links_at_carried_paths_are_refused_in_either_tree(host: Host, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(f"{SECRET}\n")
    secret.chmod(0o600)
    running = host.snapshot(host.running, "running-copy")
    host_key = running / "etc/ssh/ssh_host_ed25519_key"
    host_key.unlink()
    plant(host_key, str(secret))
    new_root = host.snapshot(host.pristine, "new-links")
    token = new_root / "etc/rastos/hub-token"
    plant(token, str(secret))
    result = host.prepare(new_root, running, pristine=False)
    refused = {entry["path"]: entry["reason"] for entry in result["not_carried"]}
    assert "symbolic link on the running root" in refused["/etc/ssh/ssh_host_ed25519_key"]
    assert "symbolic link in the new tree" in refused["/etc/rastos/hub-token"]
    assert token.is_symlink() and token.readlink() == secret, "the planted link is left as it was"
    assert secret.read_text() == f"{SECRET}\n" and secret.stat().st_mode & 0o777 == 0o600
    assert SECRET not in json.dumps(result)
    assert SECRET not in (new_root / "etc/ssh/ssh_host_ed25519_key").read_text()
    assert result["hand_changes"] == [] and "no pristine image" in result["hand_changes_note"]
    assert (None, "motd") in reapplied(result), "the rest went on"


def copy_store(host: Host, path: Path) -> None:
    """The host's state store as it is, for a test whose history goes on apart from the others'."""
    with (
        contextlib.closing(sqlite3.connect(host.database)) as source,
        contextlib.closing(sqlite3.connect(path)) as copy,
    ):
        source.backup(copy)


def test_a_change_waiting_for_its_confirmation_refuses_the_update(host: Host, tmp_path: Path) -> None:
    copy_store(host, tmp_path / "state.db")
    store = StateStore(tmp_path / "state.db")
    try:
        store.add_confirmation(host.jobs["after"], time.time() + 600, {}, ["sysctl"])
        with pytest.raises(CarryFailed, match=f"job {host.jobs['after']}'s change waits for its confirmation"):
            prepare_deployment(host.snapshot(host.pristine, "new-pending"), host.running, host.pristine, store,
                               running_subvolume=host.subvolume)  # fmt: skip
    finally:
        store.close()


async def boot_and_run(config: DaemonConfig, boot: str, steps: list[dict[str, Any]]) -> int:
    daemon = Daemon(config)
    daemon.store.record_boot(boot, daemon.root_subvolume)
    worker = asyncio.ensure_future(daemon.jobs.run_forever())
    try:
        return int((await run_job(daemon, "apply", steps))["id"])
    finally:
        worker.cancel()
        daemon.store.close()


def test_the_next_update_carries_on_from_a_deployment_an_update_made(host: Host, tmp_path: Path) -> None:
    """The host boots the deployment an update made, runs a job there, and updates again: the new tree
    gets what the first update re-applied (read from the deployment's own record) and the new job."""
    v1 = host.snapshot(host.pristine, "v1")
    first = host.prepare(v1)
    copy_store(host, tmp_path / "state.db")
    config = DaemonConfig(root=v1, snapshots_dir=host.top / "@snapshots", state_dir=tmp_path, esp=host.top / "esp")
    on_v1 = asyncio.run(boot_and_run(config, "boot-3", [sysctl("60-on-v1", "vm.vfs_cache_pressure", "50")]))
    v2 = host.snapshot(host.pristine, "v2")
    store = StateStore(tmp_path / "state.db")
    try:
        second = prepare_deployment(v2, v1, host.pristine, store, running_subvolume=subvolume_path(v1))
    finally:
        store.close()
    assert reapplied(second) == [*reapplied(first), (on_v1, "sysctl")]
    assert second["chain"] == [subvolume_path(v1)]
    assert "vm.vfs_cache_pressure = 50" in (v2 / "etc/sysctl.d/60-on-v1.conf").read_text()
    assert (v2 / "etc/hostname").read_text() == "carry-host\n"


def plant(link: Path, points_to: str) -> None:
    link.symlink_to(points_to)
    os.lchown(link, NOBODY, NOBODY)


def test_an_op_that_fails_on_the_new_tree_fails_the_preparation_naming_it(host: Host) -> None:
    new_root = host.snapshot(host.pristine, "new-no-sudo")
    (new_root / "usr/sbin/visudo").unlink()  # an image without sudo: alice's sudo rule cannot be kept
    with pytest.raises(CarryFailed) as failure:
        host.prepare(new_root)
    error = failure.value
    assert (error.job, error.step, error.op) == (host.jobs["user"], 1, "user")
    assert f"job {host.jobs['user']} step 1 (user) does not apply to the new tree" in str(error)
    assert "sudo is not installed" in str(error)


def test_the_new_tree_names_the_hosts_file_systems_not_its_builds(host: Host) -> None:
    """Every build makes new file system ids: the new tree's fstab and kernel command line are made to
    name the host's, and keep what else the new image changed in them."""
    new_root = host.snapshot(host.pristine, "new-ids")
    (new_root / "etc/fstab").write_text(fstab(*NEW_IDS).replace("noatime\t0 0\nUUID", "noatime,ssd\t0 0\nUUID", 1))
    (new_root / "etc/kernel/cmdline").write_text(cmdline(NEW_IDS[0]).replace("quiet", "quiet loglevel=3"))
    result = host.prepare(new_root)
    assert (new_root / "etc/fstab").read_text() == fstab(*HOST_IDS).replace(
        "noatime\t0 0\nUUID", "noatime,ssd\t0 0\nUUID", 1
    )
    assert (new_root / "etc/kernel/cmdline").read_text() == cmdline(HOST_IDS[0]).replace("quiet", "quiet loglevel=3")
    changed = [entry["path"] for entry in result["carried"] if entry["action"] == "host file system ids"]
    assert changed == ["/etc/fstab", "/etc/kernel/cmdline"]
    assert not [entry for entry in result["hand_changes"] if entry["path"] in changed]


def test_a_rollback_deployment_holds_the_jobs_of_its_own_incarnation_only(tmp_path: Path) -> None:
    """Each rollback to a snapshot makes its deployment anew, beside the earlier one
    (`N/deployment@G`), and a name comes back once the earlier ones are gone: a root holds the jobs
    that ran on it since the Rollback() that made it, never those of an earlier deployment of that
    name, nor of the snapshot's other deployments."""
    store = StateStore(tmp_path / "state.db")
    try:
        store.record_boot("boot-1", "@")
        base = done_job(store)
        snapshot = store.add_snapshot(0, "Create", "after the first job", "manual", None, None)
        jobs = {}
        for boot, root in enumerate(["deployment", "deployment@1", "deployment", "deployment@1"], start=2):
            time.sleep(0.01)
            store.record(0, "Rollback", None, snapshot=snapshot, entry=f"rastos-snapshot-{snapshot}.conf")
            store.record_boot(f"boot-{boot}", f"@snapshots/{snapshot}/{root}")
            jobs[boot] = done_job(store)
        held = held_steps(store, Root(tmp_path), f"@snapshots/{snapshot}/deployment@1")
        assert [ref.job for ref in held.steps] == [base, jobs[5]], "the jobs of boot 3 ran on the earlier @1"
        assert held.chain == [f"@snapshots/{snapshot}/deployment@1", "@"]
    finally:
        store.close()


def done_job(store: StateStore) -> int:
    """A job that ended done with one step, as jobs.py records it, started now."""
    time.sleep(0.01)
    job_id = store.add_job("apply", [sysctl("90-rastos", "vm.swappiness", "10")], 0, 0, "Apply")
    store.set_job_state(job_id, "running")
    store.set_step(job_id, 0, "changed", {"op": "sysctl", "state": "changed"})
    store.set_job_state(job_id, "done", {"steps": [{"op": "sysctl", "state": "changed"}], "state": "done"})
    return job_id
