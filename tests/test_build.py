"""Real builds of the minimal profile (root, Debian's registry): the manifest matches the image, and
a failed or interrupted build leaves nothing mounted, attached or half-written."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagebuilder import cli
from tests.conftest import CACHE_DIR, CHECKOUT, BuildRun, build, host_state, require_root

# One xdist worker runs them all: they share two session-scoped builds of minimal, which each worker
# would otherwise make again for itself.
pytestmark = [pytest.mark.root, pytest.mark.network, pytest.mark.slow, pytest.mark.xdist_group("image-build")]


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def mounted_btrfs_top(image: Path, start: int, size: int, where: Path) -> Iterator[Path]:
    """A partition of a raw image, attached and mounted read-only, detached whatever happens."""
    device = run("losetup", "--find", "--show", "--read-only", "--offset", str(start),
                 "--sizelimit", str(size), image).strip()  # fmt: skip
    try:
        where.mkdir(parents=True, exist_ok=True)
        # subvolid=5: the top level, where every subvolume is a directory (not the default, @).
        run("mount", "-o", "ro,subvolid=5", device, where)
        try:
            yield where
        finally:
            run("umount", where)
    finally:
        run("losetup", "--detach", device)


def dpkg_status(path: Path) -> list[tuple[str, str, str]]:
    """Installed packages read straight from dpkg's database, as an independent check."""
    packages = []
    for paragraph in path.read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status") == "install ok installed":
            packages.append((fields["Package"], fields["Version"], fields["Architecture"]))
    return sorted(packages)


def manifest_of(build_run: BuildRun) -> dict[str, Any]:
    return json.loads((build_run.output_dir / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_build_reports_every_stage_with_timings(minimal_build: BuildRun) -> None:
    events = minimal_build.events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "build-started" and kinds[-1] == "build-finished"
    stages = events[0]["stages"]
    finished = {e["stage"]: e for e in events if e["event"] == "stage-finished"}
    assert list(finished) == stages
    assert all(e["seconds"] >= 0 for e in finished.values())
    assert finished["bootstrap"]["note"].startswith(("reused", "rebuilt"))
    log = (minimal_build.output_dir / "build.log").read_text()
    assert "+ mmdebstrap" in log or "reused cache" in log
    assert "stage images: done" in log


@pytest.fixture(params=["mkfs-rootdir", "loop-fallback"])
def any_build(request: pytest.FixtureRequest) -> BuildRun:
    """Both ways of making the root file system must give the same image."""
    name = "minimal_build" if request.param == "mkfs-rootdir" else "minimal_build_via_loop"
    run: BuildRun = request.getfixturevalue(name)
    return run


def test_loop_fallback_says_how_it_built(minimal_build_via_loop: BuildRun, minimal_build: BuildRun) -> None:
    def note(run: BuildRun) -> str:
        return str(next(e["note"] for e in run.events if e.get("stage") == "btrfs" and e["event"] == "stage-finished"))

    assert "mounted through a loop device" in note(minimal_build_via_loop)
    assert "nothing mounted" in note(minimal_build)


def test_manifest_matches_the_image(any_build: BuildRun, tmp_path: Path) -> None:
    minimal_build = any_build
    manifest = manifest_of(minimal_build)
    outputs = manifest["outputs"]
    assert set(outputs) == {"raw", "qcow2", "bundle"}
    for output in outputs.values():
        path = minimal_build.output_dir / output["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == output["sha256"]
        assert path.stat().st_size == output["size"]
    raw = minimal_build.output_dir / outputs["raw"]["file"]
    partitions = json.loads(run("sfdisk", "--json", raw))["partitiontable"]
    assert partitions["id"].lower() == manifest["disk"]["guid"]
    on_disk = {p["name"]: p for p in partitions["partitions"]}
    for part in manifest["disk"]["partitions"]:
        assert on_disk[part["name"]]["start"] * 512 == part["start"]
        assert on_disk[part["name"]]["size"] * 512 == part["size"]
        assert on_disk[part["name"]]["uuid"].lower() == part["partuuid"]
        assert on_disk[part["name"]]["type"].upper() == part["type"]
    esp, root = manifest["disk"]["partitions"]

    # The ESP, read without mounting: the boot loader, the entry and the kernel the manifest names.
    at = f"{raw}@@{esp['start']}"
    entry_name = manifest["kernel"]["boot_entry"]
    entry = run("mtype", "-i", at, f"::/loader/entries/{entry_name}")
    options = next(line for line in entry.splitlines() if line.startswith("options")).split(None, 1)[1]
    assert options.split() == manifest["kernel"]["cmdline"]
    assert f"rootflags=subvol={manifest['btrfs']['default_subvolume']}" in options
    listing = run("mdir", "-/", "-b", "-i", at, "::/")
    version = manifest["kernel"]["version"]
    for path in ("::/EFI/BOOT/BOOTX64.EFI", f"::/rastos/{version}/linux", f"::/rastos/{version}/initrd"):
        assert path in listing
    blkid = run("blkid", "--probe", "--offset", str(esp["start"]), "--output", "export", raw)
    assert f"UUID={esp['fs_uuid']}" in blkid

    # The btrfs root, mounted read-only: subvolumes, packages, kernel, fstab.
    with mounted_btrfs_top(raw, root["start"], root["size"], tmp_path / "mnt") as top:
        assert run("findmnt", "--noheadings", "--output", "UUID", top).strip() == root["fs_uuid"]
        subvolumes = {line.split()[-1] for line in run("btrfs", "subvolume", "list", top).splitlines()}
        received = f"{manifest['btrfs']['images']}/{manifest['subvolume']['name']}"
        assert subvolumes == {s["name"] for s in manifest["btrfs"]["subvolumes"]} | {received}
        default = run("btrfs", "subvolume", "get-default", top).split()[-1]
        assert default == manifest["btrfs"]["default_subvolume"]
        rootfs = top / manifest["btrfs"]["default_subvolume"]
        installed = dpkg_status(rootfs / "var/lib/dpkg/status")
        assert installed == sorted((p["name"], p["version"], p["architecture"]) for p in manifest["packages"])
        assert (rootfs / f"boot/vmlinuz-{version}").is_file()
        fstab = (rootfs / "etc/fstab").read_text()
        for sub in manifest["btrfs"]["subvolumes"]:
            if sub["mountpoint"] != "/":
                assert f"UUID={root['fs_uuid']}\t{sub['mountpoint']}\tbtrfs\tsubvol=/{sub['name']}," in fstab
        assert f"UUID={esp['fs_uuid']}\t/efi\tvfat" in fstab
        assert (rootfs / "usr/lib/rastos/python/daemon/cli.py").is_file()
        # What the initrd reads ahead for rastosd's start: files of the image, the daemon's own modules
        # (byte-compiled) and the interpreter among them.
        ahead = (rootfs / "usr/lib/rastos/readahead.list").read_text().splitlines()
        assert all((rootfs / path).is_file() for path in ahead), [p for p in ahead if not (rootfs / p).is_file()]
        service = r"usr/lib/rastos/python/daemon/__pycache__/service\.cpython-\d+\.pyc"
        assert any(re.fullmatch(service, p) for p in ahead), ahead
        assert any(re.fullmatch(r"usr/bin/python3\.\d+", p) for p in ahead), ahead
        assert (rootfs / "etc/systemd/system/multi-user.target.wants/rastosd.service").is_symlink()
        assert "rastos:" in (rootfs / "etc/group").read_text()
        assert (rootfs / "etc/systemd/system/multi-user.target.wants/rastos-boot-report.service").is_symlink()
        assert not any((rootfs / "usr/share/man").glob("man1/*")), "minimal has docs = false"
        assert (top / "@var_log").is_dir() and not any((rootfs / "var/log").iterdir())
        assert (rootfs / "etc/hostname").read_text() == "rastos\n"


def test_rebuild_reuses_the_bootstrap_and_says_so(minimal_build: BuildRun, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned.toml"
    tuned.write_text('extends = "minimal"\n[kernel.sysctl]\n"vm.swappiness" = 7\n')
    again = build(tuned, tmp_path / "out")
    assert again.returncode == 0, again.stderr
    note = next(e["note"] for e in again.events if e.get("stage") == "bootstrap" and e["event"] == "stage-finished")
    assert note.startswith("reused cache")
    assert json.loads((tmp_path / "out/manifest.json").read_text())["bootstrap_cache_key"] == \
        manifest_of(minimal_build)["bootstrap_cache_key"]  # fmt: skip


def leftovers(output_dir: Path) -> list[str]:
    """What a build that has ended left behind. The cache is shared with any other build on this host,
    running meanwhile: a scratch directory counts once its build's process is gone (each is named after
    it, and the builder removes such abandoned ones too), and a partial bootstrap entry once no build is
    making one, under the lock a build holds while it does."""
    found = (
        [p.name for p in output_dir.iterdir() if p.name not in ("build.log", ".lock")] if output_dir.exists() else []
    )
    found += [
        str(p) for p in (CACHE_DIR / "work").glob("*") if not (p.name.isdigit() and Path(f"/proc/{p.name}").exists())
    ]
    bootstrap = CACHE_DIR / "bootstrap"
    bootstrap.mkdir(parents=True, exist_ok=True)
    with (bootstrap / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found += [str(p) for p in bootstrap.glob("*.partial")]
    return found


def test_a_disk_too_small_fails_with_advice_and_leaves_nothing(
    minimal_build: BuildRun, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = host_state(tmp_path_factory)
    small = tmp_path / "small.toml"
    small.write_text('extends = "minimal"\n[disk]\nsize = "512M"\n')
    failed = build(small, tmp_path / "out")
    assert failed.returncode == 1
    assert "disk too small for the root file system" in failed.stderr
    assert "hint: set disk.size to at least" in failed.stderr
    assert [e["stage"] for e in failed.events if e["event"] == "stage-failed"] == ["btrfs"]
    assert leftovers(tmp_path / "out") == []
    assert host_state(tmp_path_factory) == before


def test_a_missing_package_shows_the_mmdebstrap_log_and_leaves_nothing(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require_root()
    before = host_state(tmp_path_factory)
    broken = tmp_path / "broken.toml"
    broken.write_text('extends = "minimal"\n[packages]\ninclude = ["no-such-package-rastos"]\n')
    failed = build(broken, tmp_path / "out")
    assert failed.returncode == 1
    assert "mmdebstrap failed" in failed.stderr
    assert "no-such-package-rastos" in failed.stderr  # apt's complaint, from the log tail
    assert leftovers(tmp_path / "out") == []
    assert host_state(tmp_path_factory) == before


def test_ctrl_c_during_the_bootstrap_leaves_nothing(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    require_root()
    before = host_state(tmp_path_factory)
    profile = tmp_path / "interrupted.toml"
    profile.write_text('extends = "minimal"\n[packages]\ninclude = ["jq"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebuilder", "build", str(profile), "--json", "--refresh-bootstrap",
         "--output-dir", str(tmp_path / "out"), "--cache-dir", str(CACHE_DIR)],
        cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # A shell's background job inherits SIGINT ignored, and Python then keeps ignoring it:
        # give the build the disposition an interactive terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"stage": "bootstrap"' in line:
            break
    time.sleep(8)  # mmdebstrap is now installing packages, with its mounts in place
    assert proc.poll() is None, "the build ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert leftovers(tmp_path / "out") == []
    assert host_state(tmp_path_factory) == before
    # unshare's --kill-child sends mmdebstrap SIGTERM as unshare dies, without waiting for it: its
    # processes may take a moment to exit after the build has. They must be gone soon, not linger.
    deadline = time.monotonic() + 30
    while (still := mmdebstrap_processes(session=proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert still == [], still


def mmdebstrap_processes(session: int) -> list[str]:
    """The build's mmdebstrap processes, which stay in the session it was started as (neither unshare
    nor mmdebstrap starts a new one): not those another xdist worker may run meanwhile (for the op
    tests' tree or a kernel's source), nor another build's on this host."""
    found = subprocess.run(["pgrep", "-a", "--session", str(session), "-f", "mmdebstrap"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    return found.stdout.splitlines()


def run_cli_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run rastos-image's main() in a child that really dropped root (fork, then setuid), with the
    modules already imported: no file of the test environment needs to be readable by nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            os.close(read_end)
            sys.stderr = os.fdopen(write_end, "w")  # pytest's capture would swallow it otherwise
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = cli.main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as stderr:
        output = stderr.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_not_root_is_refused_before_any_work(tmp_path: Path) -> None:
    require_root()  # to become someone else
    code, stderr = run_cli_as_nobody(["build", "minimal", "--output-dir", str(tmp_path / "out")])
    assert code == 1
    assert "needs root" in stderr and "hint: run it with sudo" in stderr
    assert not (tmp_path / "out").exists()
