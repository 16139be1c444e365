"""The shipped units' sandboxes, as systemd rates them: `systemd-analyze security --offline` on each unit
file of units/, a figure that depends on the file alone. rastosd changes the host and keeps what its
ops need open (each exposure is commented in units/rastosd.service); the boot's helpers keep nothing.
The hub's units (units/hub/) are rated too, and checked with `systemd-analyze verify`, and their
commands run: the hub serves and a backup is made as the units say.

The host's systemd rates them (252 on bookworm, 257 in the image; both rate them alike today: 5.8 and
3.5 on 252, 5.8 and 3.3 on 257). Whether the sandbox lets every op work is for the VM tests.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.hub_fixtures import CHECKOUT, HUB_CLI, free_port

UNITS = Path(__file__).resolve().parents[1] / "units"
BOUNDS = {
    "rastosd.service": 6.0,
    "rastos-health.service": 4.0,
    "rastos-boot-probe.service": 4.0,
    "rastos-boot-report.service": 4.0,
    # The hub's, for the machine that runs it (units/hub/, not in host images): it keeps nothing of the
    # host but its state directory and its sockets. Rated 1.4 on 252.
    "hub/rastos-hub.service": 2.0,
    "hub/rastos-hub-backup.service": 2.0,
    # It only runs psql over the Unix socket, as postgres: rated 0.6 on 252.
    "hub/rastos-hub-postgresql.service": 1.0,
}
OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d)")


def exposure(unit: Path) -> float:
    """systemd-analyze's overall exposure of a unit file (0 is the best, 10 the worst)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (systemd)")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    if "--offline" in result.stderr and ("unrecognized option" in result.stderr or "Unknown option" in result.stderr):
        pytest.skip("this systemd-analyze cannot rate a unit file offline (--offline came with systemd 250)")
    found = OVERALL.search(result.stdout)
    assert found is not None and found[1] == unit.name, f"no rating in:\n{result.stdout}\n{result.stderr}"
    return float(found[2])


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_a_unit_is_rated_within_its_bound(name: str) -> None:
    rated = exposure(UNITS / name)
    print(f"{name}: {rated}")
    assert rated <= BOUNDS[name], f"{name} is rated {rated}, above {BOUNDS[name]}: what opened it?"


def without_sandbox(unit: Path, folder: Path) -> Path:
    """The unit file with its sandboxing directives left out, under its own name in `folder`."""
    bare = folder / unit.name
    sandbox = ("NoNewPrivileges", "Capability", "SystemCall", "Restrict", "Lock", "Private", "Protect")
    kept = [line for line in unit.read_text().splitlines() if not line.startswith(sandbox)]
    bare.write_text("\n".join(kept) + "\n")
    return bare


def test_the_rating_sees_the_sandbox(tmp_path: Path) -> None:
    """The same unit without its sandbox rates as exposed as a bare root service: the figure above
    comes from the directives, not from a unit systemd-analyze failed to read."""
    assert exposure(without_sandbox(UNITS / "rastosd.service", tmp_path)) >= 9.0


HUB_UNITS = (
    "rastos-hub.service",
    "rastos-hub-backup.service",
    "rastos-hub-backup.timer",
    "rastos-hub-postgresql.service",
)


def test_the_hub_units_are_valid_for_systemd(tmp_path: Path) -> None:
    """`systemd-analyze verify`: every directive known, every command there. Their ExecStart names
    `rastos-hub` for systemd to find in /usr/local/bin or /usr/bin; here it is this venv's."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (systemd)")
    program = Path(sys.executable).parent / "rastos-hub"
    for name in HUB_UNITS:
        text = (UNITS / "hub" / name).read_text()
        (tmp_path / name).write_text(text.replace("\nExecStart=rastos-hub ", f"\nExecStart={program} "))
    result = subprocess.run(["systemd-analyze", "verify", *HUB_UNITS], capture_output=True, text=True,
                            check=False, timeout=60, cwd=tmp_path)  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def unit_command(unit: Path, state: Path, environment: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd would run it: %S the state directories' root, each variable from
    its Environment= lines or `environment`; `rastos-hub` is this checkout's."""
    lines = unit.read_text().splitlines()
    variables = dict(
        line.removeprefix("Environment=").split("=", 1) for line in lines if line.startswith("Environment=")
    )
    variables = {key: value.replace("%S", str(state)) for key, value in {**variables, **environment}.items()}
    (command,) = [line.removeprefix("ExecStart=") for line in lines if line.startswith("ExecStart=")]
    argv = []
    for word in shlex.split(command.replace("%S", str(state))):
        if word.startswith("${"):  # one argument, as systemd keeps it
            argv.append(variables[word[2:-1]])
        elif word.startswith("$"):  # split at whitespace, as systemd does
            argv += variables[word[1:]].split()
        else:
            argv.append(word)
    assert argv[0] == "rastos-hub"
    return [*HUB_CLI, *argv[1:]]


def test_the_hub_units_commands_serve_and_back_up(tmp_path: Path) -> None:
    state = tmp_path / "lib"
    (state / "rastos-hub" / "backups").mkdir(parents=True)  # StateDirectory= makes them
    port = free_port()
    serve = unit_command(UNITS / "hub/rastos-hub.service", state, {"RASTOS_HUB_OPTIONS": f"--listen 127.0.0.1:{port}"})
    log = (tmp_path / "hub.log").open("w")
    hub = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, cwd=CHECKOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert hub.poll() is None, (tmp_path / "hub.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "hub.log").read_text()
                time.sleep(0.1)
        backup = unit_command(UNITS / "hub/rastos-hub-backup.service", state, {})
        done = subprocess.run(backup, capture_output=True, text=True, check=False, timeout=60, cwd=CHECKOUT)
        assert done.returncode == 0, done.stderr
        assert [path.suffix for path in (state / "rastos-hub" / "backups").iterdir()] == [".sqlite"]
    finally:
        hub.send_signal(signal.SIGTERM)  # how systemd stops it
        assert hub.wait(30) == 0, (tmp_path / "hub.log").read_text()
