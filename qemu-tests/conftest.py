"""Boot tests: a real image, built once per session, booted under UEFI in QEMU and driven over QMP.

When a test fails, the guest's console log (and, in the boot report of an unhealthy boot, its
journal) is kept under $RASTOS_TEST_ARTIFACTS (default: qemu-tests/artifacts) and its path printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
# The hub's fixtures (tests/hub_fixtures.py) serve the VM tests too; the checkout is not installed.
if str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))

from guest_console import PROMPT, GuestConsole, SavedGuest, overlay, settled  # noqa: E402 (after the path above)
from remote_guests import boot_and_save  # noqa: E402

from tests.ssh_fixtures import SshClient  # noqa: E402

CACHE_DIR = Path(os.environ.get("RASTOS_CACHE_DIR", "/var/cache/rastos"))
# On two xdist workers (tox), two VMs run at once on this machine's two cores under TCG: with one vCPU
# each they boot faster than with two (measured: a pair booted to multi-user in 36-38 s, against 43-44 s),
# as no vCPU thread waits on another one preempted. Every VM of a run inherits it (`rastos-image boot`,
# VmOptions); a saved guest is resumed with the vCPUs it was saved with, as it was made in the same run.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("RASTOS_VM_CPUS", "1")
ARTIFACTS = Path(os.environ.get("RASTOS_TEST_ARTIFACTS", CHECKOUT / "qemu-tests" / "artifacts"))


def build_qcow2(profile: str | Path, out: Path, cache_dir: Path = CACHE_DIR) -> Path:
    if os.geteuid() != 0:
        pytest.skip("building an image needs root")
    result = subprocess.run(
        [sys.executable, "-m", "imagebuilder", "build", str(profile), "--json",
         "--output-dir", str(out), "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, cwd=CHECKOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    return out / str(manifest["outputs"]["qcow2"]["file"])


@pytest.fixture(scope="session")
def minimal_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qcow2("minimal", tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="session")
def hub_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet hub appliance (profiles/hub.toml): rastos-hub on PostgreSQL, loopback only until told."""
    return build_qcow2("hub", tmp_path_factory.mktemp("hub-image"))


@pytest.fixture(scope="session")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server profile (Debian's own initramfs, OpenSSH), on a smaller disk to build faster."""
    folder = tmp_path_factory.mktemp("server")
    profile = folder / "server-small.toml"
    profile.write_text('extends = "server"\n[disk]\nsize = "4G"\nformats = ["qcow2"]\n')
    return build_qcow2(profile, folder / "out")


@pytest.fixture(scope="session")
def saved_minimal(minimal_image: Path, tmp_path_factory: pytest.TempPathFactory) -> SavedGuest:
    """minimal_image booted once, root logged in on the console, the boot settled (rastosd up, the health
    check run, the entry blessed), then saved: each test that needs a running guest, not a boot, resumes
    its own copy of it in seconds (`guest`)."""
    folder = tmp_path_factory.mktemp("saved-minimal")
    disk = overlay(minimal_image, folder / "saved.qcow2")
    console = GuestConsole(disk, keep_changes=True)
    try:
        assert console.wait_for(PROMPT, 300), "root is logged in on the serial console"
        settled(console)
        console.save(folder / "state")
    finally:
        console.close(folder / "console.log")
    return SavedGuest(disk, folder / "state")


@pytest.fixture(scope="session")
def ssh_client(tmp_path_factory: pytest.TempPathFactory) -> SshClient:
    """This side of SSH to the server guests: its key is root's on each (remote_guests.py)."""
    return SshClient(tmp_path_factory.mktemp("ssh-client"))


@pytest.fixture(scope="session")
def saved_server(server_image: Path, ssh_client: SshClient, tmp_path_factory: pytest.TempPathFactory) -> SavedGuest:
    """server_image booted once with ssh_client's key for root, its boot over, saved: each test that needs
    a server resumes a copy of it (remote_guests.resume)."""
    return boot_and_save(server_image, ssh_client, tmp_path_factory.mktemp("saved-server"))


@pytest.fixture
def guest(saved_minimal: SavedGuest, artifacts: Path) -> Iterator[GuestConsole]:
    """A running minimal guest of the test's own, resumed from `saved_minimal`: at a root prompt on
    its console, its boot over, its disk a throwaway overlay."""
    console = GuestConsole.resume(saved_minimal, artifacts)
    yield console
    console.close(artifacts / "console.log")


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A folder for the test's console log and journal, kept only if the test fails."""
    yield tmp_path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        keep = ARTIFACTS / request.node.name
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(tmp_path, keep)
        print(f"\nguest logs of the failed boot kept in {keep}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # type: ignore[attr-defined]
    return report
