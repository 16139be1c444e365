"""Benchmark of image updates (printed, never asserted).

Measures, on this machine, in one run: three versions of a profile built on `minimal` (v2: one
package more and a sysctl changed; v3: one kernel option more), their bundles beside the qcow2 a
reinstall would ship and the space the root uses in the guest; then, in one guest booted from v1
under TCG, the staging of v3 as a full bundle and of v2 as a delta (each from a URL on the host, as
from a hub), a reboot into v2, and a hub's rollout of v3 as a delta, from its start to the host
back healthy on v3.
Run as root: `.venv/bin/python -m bench.bench_updates`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT / "qemu-tests"))
from guest_console import PROMPT, GuestConsole, overlay, settled  # noqa: E402 (after the path above)

from tests.hub_fixtures import Hub, upload  # noqa: E402

DELTA_TARGET = 0.05  # of the full bundle, for a one-package change
PROFILE = """extends = "minimal"
version = "{version}"
[packages]
include = [{packages}]
[kernel]
cmdline = [{cmdline}]
[kernel.sysctl]
"vm.swappiness" = {swappiness}
"""
VERSIONS = {
    "1": {"packages": "", "swappiness": 10, "cmdline": ""},
    "2": {"packages": '"hello"', "swappiness": 13, "cmdline": ""},
    "3": {"packages": '"hello"', "swappiness": 13, "cmdline": '"rastos.bench=3"'},
}


def build(folder: Path, version: str, key: Path, delta_from: Path | None) -> tuple[dict[str, Any], float]:
    (folder / version).mkdir()
    profile = folder / version / "bench.toml"  # one profile name for every version: a delta is of one profile
    profile.write_text(PROFILE.format(version=version, **VERSIONS[version]))
    argv = [sys.executable, "-m", "imagebuilder", "build", str(profile), "--json", "--signing-key", str(key),
            "--output-dir", str(folder / version / "out")]  # fmt: skip
    if delta_from is not None:
        argv += ["--delta-from", str(delta_from)]
    started = time.monotonic()
    subprocess.run(argv, cwd=CHECKOUT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    manifest: dict[str, Any] = json.loads((folder / version / "out/manifest.json").read_text())
    for output in manifest["outputs"].values():
        output["path"] = folder / version / "out" / output["file"]
    return manifest, seconds


def output(manifest: dict[str, Any], kind: str) -> Path:
    return Path(manifest["outputs"][kind]["path"])


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[int]:
    """The bundles over HTTP on all the host's addresses (the guest reaches the host as 10.0.2.2)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def stage(guest: GuestConsole, url: str, reboot: bool = False) -> float:
    """Seconds `rastosctl update stage` took in the guest (its own clock)."""
    flags = " --reboot" if reboot else ""
    # The answer comes as STAGED=$(...), the form guest.run tells from the echo of the typed line.
    answer = guest.run(f'S=$(date +%s.%N); rastosctl update stage{flags} {url} > /tmp/stage.out 2>&1; '
                       'echo "$? $(awk "BEGIN {print $(date +%s.%N) - $S}")" > /tmp/stage.result; '
                       'echo "STAGED=$(cat /tmp/stage.result)"', "STAGED", 900)  # fmt: skip
    status, seconds = answer.split()
    if status != "0":
        print(guest.run("echo \"OUT=$(tail -5 /tmp/stage.out | tr '\\n' ' ')\"", "OUT"))
        raise SystemExit(f"staging {url} failed with exit status {status}")
    return float(seconds)


def roll_out(hub: Hub, guest: GuestConsole, bundle: Path) -> float:
    """Seconds from the rollout's start (the bundle already uploaded) to the hub's word that it is complete:
    the host staged the update from the hub, rebooted into it and came back healthy on it."""
    status, image = upload(hub, bundle.read_bytes())
    assert status in (200, 201), image
    hub.wait_state(lambda s: s["hosts"]["vm-1"]["online"], "the agent connected", 120)
    before = len(guest.seen)
    started = time.monotonic()
    rollout = hub.api("POST", "/api/v1/rollouts", {"image": image["id"], "target": {"hosts": ["vm-1"]},
                                                    "health_timeout_s": 1200})  # fmt: skip
    while (state := hub.api("GET", f"/api/v1/rollouts/{rollout['id']}"))["state"] not in ("complete", "halted"):
        assert time.monotonic() - started < 1500, f"the rollout did not end: {state}"
        time.sleep(0.5)
    seconds = time.monotonic() - started
    assert state["state"] == "complete", state
    assert guest.wait_for_after(before, b"BdsDxe: starting", 60), "the host rebooted for the update"
    assert guest.wait_for_after(guest.seen.find(b"BdsDxe: starting", before), PROMPT, 400), "v3 boots"
    settled(guest)
    return seconds


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="rastos-bench-updates-") as scratch:
        folder = Path(scratch)
        key = folder / "signing-key"
        subprocess.run([sys.executable, "-m", "imagebuilder", "key", "generate", str(key)], cwd=CHECKOUT,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        v1, built1 = build(folder, "1", key, None)
        v2, built2 = build(folder, "2", key, output(v1, "bundle"))
        v3, built3 = build(folder, "3", key, output(v2, "bundle"))
        served = folder / "served"
        served.mkdir()
        for path in (output(v2, "delta"), output(v3, "bundle"), output(v3, "delta")):
            (served / path.name).hardlink_to(path)
        full, delta = output(v2, "bundle").stat().st_size, output(v2, "delta").stat().st_size
        qcow2 = output(v1, "qcow2").stat().st_size

        hub = Hub(folder / "hub")
        hub.directory.mkdir()
        hub.admin_token = hub.cli("admin", "add", "bench").stdout.strip().splitlines()[-1]
        hub.start()
        token = hub.api("POST", "/api/v1/hosts", {"name": "vm-1", "groups": ["vms"]})["token"]
        credentials = ("--credential", f"rastos.hub.url=ws://10.0.2.2:{hub.port}/api/v1/agent",
                       "--credential", f"rastos.hub.token={token}")  # fmt: skip
        disk = overlay(output(v1, "qcow2"), folder / "disk.qcow2")
        guest = GuestConsole(disk, keep_changes=True, boot_args=credentials)
        try:
            assert guest.wait_for(PROMPT, 300), "v1 boots"
            settled(guest)
            used = int(guest.run("echo \"USED=$(btrfs filesystem usage -b / | awk '/^ *Used:/ {print $2; exit}')\"",
                                 "USED"))  # fmt: skip
            with serving(served) as port:
                base = f"http://10.0.2.2:{port}"
                full_seconds = stage(guest, f"{base}/{output(v3, 'bundle').name}")
                delta_seconds = stage(guest, f"{base}/{output(v2, 'delta').name}")
            # v2, staged last, boots next: the host runs the parent of v3's delta.
            guest.type("systemctl reboot")
            assert guest.wait_for_new(b"BdsDxe: starting", 300), "the guest rebooted into v2"
            assert guest.wait_for_new(PROMPT, 400), "v2 boots"
            settled(guest)
            rollout_seconds = roll_out(hub, guest, output(v3, "delta"))
            version = guest.run(
                'echo "VERSION=$(busctl --json=short get-property org.rastos.Daemon1 /org/rastos/Daemon1 '
                "org.rastos.Daemon1.Manager BootState | grep -o '\"image_version\":\"[^\"]*\"')\"", "VERSION"
            )  # fmt: skip
        finally:
            guest.close(folder / "console.log")
            hub.stop()

    table = Table(title="image updates, profile minimal + one package (sizes)")
    for column in ("what", "size", "of the full bundle"):
        table.add_column(column, justify="right" if column != "what" else "left")
    rows = [
        ("qcow2 a reinstall ships", qcow2),
        ("space the root uses in the guest (btrfs, compressed)", used),
        ("full bundle (v2)", full),
        ("delta bundle v1 -> v2", delta),
    ]
    for what, size in rows:
        table.add_row(what, f"{size / 2**20:.2f} MiB", f"{size / full:.1%}")
    console.print(table)
    mark = "met" if delta <= DELTA_TARGET * full else "NOT met"
    console.print(f"delta target: at most {DELTA_TARGET:.0%} of the full bundle: {mark}")
    console.print(f"shipping the qcow2 instead of the delta: {qcow2 / delta:.0f}x the bytes")

    table = Table(title="image updates, times (TCG, one guest)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    for what, seconds in (
        ("build v1 (warm cache)", built1),
        ("build v2 with --delta-from v1", built2),
        ("build v3 with --delta-from v2", built3),
        ("stage v2 as a delta (download, verify, receive, carry, install)", delta_seconds),
        ("stage v3 as a full bundle", full_seconds),
        ("hub rollout of v3 (delta): start to the host back healthy on v3", rollout_seconds),
    ):
        table.add_row(what, f"{seconds:.1f}")
    console.print(table)
    console.print(f"running after the reboot: {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
