"""Fixtures for tests that run the real builder (root, Debian's registry, real files)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("RASTOS_CACHE_DIR", "/var/cache/rastos"))
CLONE_NEWNS = 0x00020000  # os.CLONE_NEWNS from Python 3.12


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") and os.geteuid() == 0:
        private_mount_namespace()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test with an id of its own: xdist's --dist loadgroup hands tests to workers by id, and of
    tests that share one it would run only one. schemathesis 4.32 under pytest 9.2 names each API
    operation's test test_x[GET /path] but gives them all the id of test_x; they get the id their name
    says back, as pytest 8 gave it. Any other clash stops the run rather than lose tests unseen."""
    ids = Counter(item.nodeid for item in items)
    for item in items:
        if ids[item.nodeid] > 1 and item.parent is not None and "[" in item.name:
            from _pytest.nodeid import NodeId  # pytest 9.2's; no public way to give an item its id

            item._id = NodeId.parse(f"{item.parent.nodeid}::{item.name}")
    shared = sorted(nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1)
    if shared:
        raise pytest.UsageError(f"tests that share an id, of which xdist would run one: {', '.join(shared)}")
    if getattr(config.option, "loadgroup", False):  # xdist's workers under --dist loadgroup
        name_groups(items)


def name_groups(items: list[pytest.Item]) -> None:
    """Each test's xdist_group in its id (`...::test_x@image-build`), which --dist loadgroup hands out
    by. xdist 3.8 writes it to `item._nodeid`, which pytest 9.2 no longer reads (an item's id is its
    `_id`): the groups were split over the workers, and each ran the image-build group's session
    builds again, at the same time as the other."""
    from _pytest.nodeid import NodeId  # pytest 9.2's; no public way to give an item its id

    for item in items:
        marks = item.iter_markers("xdist_group")
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) for mark in marks})
        suffix = f"@{'_'.join(names)}"
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


def private_mount_namespace() -> None:
    """This pytest-xdist worker, and all it starts, in a mount namespace of its own that still sees the
    host's mounts: the tests that check a build or a shadow left the mount table as they found it then
    see only what their own worker mounted, not the loop mounts, shadows and network namespaces that
    the other workers' tests make and remove meanwhile. Serially nothing changes.

    unshare moves only the calling thread, so it must be the one that runs the tests and starts their
    processes: xdist runs them on the main thread (execnet's main_thread_only), and /proc/self is it."""
    assert threading.current_thread() is threading.main_thread(), "xdist runs tests on the main thread"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNS): {os.strerror(errno)}")
    # A slave: the host's mounts still reach the worker, the worker's never reach the host or the others.
    subprocess.run(["mount", "--make-rslave", "/"], check=True)


@dataclass
class BuildRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    output_dir: Path


def rastos_image(*args: str | Path, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebuilder", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=CHECKOUT, check=False,
    )  # fmt: skip


def build(profile: str | Path, output_dir: Path, *extra: str) -> BuildRun:
    result = rastos_image("build", profile, "--json", "--output-dir", output_dir, "--cache-dir", CACHE_DIR, *extra)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return BuildRun(result.returncode, events, result.stderr, output_dir)


def host_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Mounts and loop devices on the host: a build must leave both as it found them. A build attaches
    loop devices only to files of its own scratch directory (CACHE_DIR/work/PID, stage root), never to
    tests' temporary files: loop devices on those belong to other tests (btrfs loop files, in any xdist
    worker, of this worker's earlier tests, which detach when their lazy unmount completes, or of
    another test session on this host) and are left out, as are those of builds still running (another
    session's); a build's that is gone and left one behind counts."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    listing = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True, check=True).stdout
    basetemp = tmp_path_factory.getbasetemp()
    sessions = next((p for p in (basetemp, *basetemp.parents) if p.name.startswith("pytest-of-")), basetemp)
    loops = [
        loop
        for loop in json.loads(listing)["loopdevices"]
        if not (loop["back-file"] or "").startswith(f"{sessions}/") and not _of_a_running_build(loop["back-file"])
    ]
    return {"mounts": sorted(line.split(" ", 4)[4] for line in mounts), "loops": loops}


def _of_a_running_build(back_file: str | None) -> bool:
    work = f"{CACHE_DIR}/work/"
    if not (back_file or "").startswith(work):
        return False
    pid = (back_file or "").removeprefix(work).split("/", 1)[0]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def build_minimal_with_raw(directory: Path, *extra: str) -> BuildRun:
    profile = directory / "minimal-raw.toml"
    profile.write_text('extends = "minimal"\n[disk]\nformats = ["raw", "qcow2"]\n')
    run = build(profile, directory / "out", *extra)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="session")
def minimal_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildRun]:
    """A real build of the shipped `minimal` profile, with a raw image too, shared by the tests."""
    require_root()
    yield build_minimal_with_raw(tmp_path_factory.mktemp("minimal"))


@pytest.fixture(scope="session")
def minimal_build_via_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildRun]:
    """The same build through the fallback for old btrfs-progs: a loop mount in a private namespace.
    Whatever it mounted and attached must be gone afterwards."""
    require_root()
    before = host_state(tmp_path_factory)
    run = build_minimal_with_raw(tmp_path_factory.mktemp("minimal-loop"), "--loop-fallback")
    assert host_state(tmp_path_factory) == before
    yield run


from tests.daemon_fixtures import configured_rastosd, daemon_env, rastosd  # noqa: E402, F401  (fixtures for the daemon tests)
from tests.op_tree import op_root, op_tree_base  # noqa: E402, F401  (a real Debian root for op tests)
from tests.update_fixtures import bundles  # noqa: E402, F401  (signed update bundles, made once)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[str]:
    """One private PostgreSQL server for the whole session of this process (each xdist worker has its
    own), started when a test first needs it: its start (initdb and the server, about 1.5 s) was paid
    by every PostgreSQL test. Tests take a database of their own on it (`postgresql_database`), so none
    sees another's tables, sessions or advisory locks. Yields the server's URL (database postgres)."""
    from tests.hub_fixtures import postgresql_server

    with postgresql_server() as url:
        yield url


@pytest.fixture
def postgresql_database(postgresql: str) -> str:
    """A new, empty database on the session's PostgreSQL server; its URL."""
    from tests.hub_fixtures import new_database

    return new_database(postgresql)
