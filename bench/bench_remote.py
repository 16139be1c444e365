"""Benchmark of rastosctl over SSH beside the hub (printed, never asserted).

Measures, on this machine, in one run, with two guests of the `server` profile under TCG (booted once,
saved, each guest a resumed copy: qemu-tests/remote_guests.py):
  - what reaching one host costs: `ssh HOST true`, `rastosctl -H HOST status` from here, and the same
    `rastosctl status` run on the guest itself (the difference is the SSH path's overhead);
  - one workflow (`essential` by default) applied to both guests over an inventory (`--parallel 2`)
    and through a hub on this machine the guests are enrolled in (a run with the workflow's steps),
    `--rounds` times each, the order alternating, after one run that warms apt's lists: wall time,
    the slowest host's own time, and the CPU time this machine spent per host; then the same for the
    workflow's steps without the package update (what is left is the path's own cost, not the mirror);
and extrapolates both to 500 hosts, beside pyinfra's published figures.
Run as root: `.venv/bin/python -m bench.bench_remote`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT / "qemu-tests"))
from guest_console import GuestConsole  # noqa: E402 (after the path above)
from remote_guests import boot_and_save, resume, ssh  # noqa: E402

from ops.declared import load_workflow  # noqa: E402
from tests.hub_fixtures import HUB_CLI, Hub  # noqa: E402
from tests.ssh_fixtures import SshClient  # noqa: E402

HOSTS = 500
# pyinfra's own benchmark (github.com/Fizzadar/pyinfra-performance, latest_results.csv): four small
# operations (a user, a file, a file copied, a shell command) on Docker containers of one machine.
PYINFRA_500 = {"first run": 49.5, "second run": 31.2}
# Python's CPU-bound work in the TCG guest against the same work natively on this host (rastosd's
# imports: 1.49 s and 0.12 s, docs/image-builder.md): how a host's own time here maps to real hardware.
TCG_FACTOR = 12
CORES = 2


def build_server(folder: Path) -> Path:
    profile = folder / "server-small.toml"
    profile.write_text('extends = "server"\n[disk]\nsize = "4G"\nformats = ["qcow2"]\n')
    done = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(profile), "--json", "--output-dir",
                           str(folder / "out")], capture_output=True, text=True, cwd=CHECKOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the server image did not build:\n{done.stderr}")
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    return folder / "out" / str(manifest["outputs"]["qcow2"]["file"])


def median_seconds(runs: int, action: Any) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        action()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def over_ssh(client: SshClient, inventory: Path, command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, the slowest host's own seconds, this machine's CPU seconds per host."""
    cpu, started = children_cpu(), time.monotonic()
    done = client.ctl("--inventory", str(inventory), "--parallel", "2", "--json", *command, timeout=1200)
    wall = time.monotonic() - started
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(records) != 2:
        raise SystemExit(f"{' '.join(command)} over SSH failed:\n{done.stdout}\n{done.stderr}")
    return wall, max(r["seconds"] for r in records), (children_cpu() - cpu) / 2


def through_hub(hub: Hub, steps: list[dict[str, Any]]) -> float:
    started = time.monotonic()
    run = hub.api("POST", "/api/v1/runs", {"target": {"group": "bench"}, "steps": steps})
    state = hub.wait_state(lambda s: s["runs"][run["id"]]["state"] != "running", "the run's end", 1200)
    wall = time.monotonic() - started
    if state["runs"][run["id"]]["state"] != "complete":
        raise SystemExit(f"the workflow through the hub failed: {state['runs'][run['id']]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default="essential")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    steps = load_workflow(args.workflow).steps_for({})
    with tempfile.TemporaryDirectory(prefix="rastos-bench-remote-") as scratch:
        folder = Path(scratch)
        client = SshClient(folder / "client")
        console.print("building the server image and booting it once ...")
        (folder / "saved").mkdir()
        saved = boot_and_save(build_server(folder), client, folder / "saved")
        guests: list[GuestConsole] = []
        hub = Hub(folder / "hub")
        hub.directory.mkdir()
        hub.admin_token = hub.cli("admin", "add", "bench").stdout.strip().splitlines()[-1]
        hub.start()
        try:
            for number in range(2):
                guests.append(resume(saved, client, folder / f"guest-{number}"))
            ports = [guest.ssh_port() for guest in guests]
            destination = f"root@127.0.0.1:{ports[0]}"
            reach = {
                "ssh HOST true": median_seconds(5, lambda: ssh(client, ports[0], "true")),
                "rastosctl -H HOST status": median_seconds(
                    5, lambda: client.ctl("-H", destination, "status").check_returncode()
                ),
            }
            local = ssh(client, ports[0], "python3 -c 'import statistics, subprocess, time\n"
                        "def once():\n t = time.monotonic()\n subprocess.run([\"rastosctl\", \"status\"], check=True,"
                        " capture_output=True)\n return time.monotonic() - t\n"
                        "print(statistics.median(once() for _ in range(5)))'")  # fmt: skip
            reach["rastosctl status on the guest"] = float(local)
            inventory = folder / "fleet.toml"
            inventory.write_text("".join(f'[[host]]\nname = "vm-{n}"\naddress = "127.0.0.1"\nuser = "root"\n'
                                         f"port = {port}\n\n" for n, port in enumerate(ports)))  # fmt: skip
            for n, port in enumerate(ports):
                enrolled = subprocess.run(
                    [*HUB_CLI, *hub.options, "host", "enrol", f"root@127.0.0.1:{port}", "--name", f"vm-{n}",
                     "--group", "bench", "--hub-url", f"http://10.0.2.2:{hub.port}", "--timeout", "120"],
                    capture_output=True, text=True, check=False, cwd=CHECKOUT, env=client.env(),
                )  # fmt: skip
                if enrolled.returncode != 0:
                    raise SystemExit(f"enrolment failed: {enrolled.stderr}")
            light = [step for step in steps if step["op"] != "update"]
            (folder / "light.json").write_text(json.dumps(light))
            workloads = {
                f"workflow {args.workflow}": (["workflow", "run", args.workflow], steps),
                f"its {len(light)} steps without the update": (["pipeline", "run", str(folder / "light.json")], light),
            }
            over_ssh(client, inventory, ["workflow", "run", args.workflow])  # apt's lists fetched once: warm
            results: dict[str, tuple[list[tuple[float, float, float]], list[float]]] = {}
            for name, (command, workload) in workloads.items():
                ssh_runs, hub_runs = [], []
                for number in range(args.rounds):
                    if number % 2:
                        hub_runs.append(through_hub(hub, workload))
                    ssh_runs.append(over_ssh(client, inventory, command))
                    if not number % 2:
                        hub_runs.append(through_hub(hub, workload))
                results[name] = (ssh_runs, hub_runs)
        finally:
            for number, guest in enumerate(guests):
                guest.close(folder / f"console-{number}.log")
            hub.stop()

    table = Table(title="reaching one host (TCG guest, median of 5)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    for what, seconds in reach.items():
        table.add_row(what, f"{seconds:.2f}")
    login = reach["rastosctl -H HOST status"] - reach["ssh HOST true"]
    table.add_row("rastosctl -H beyond the SSH login (the bridge, the bus calls)", f"{login:.2f}")
    console.print(table)
    console.print("rastosctl on the guest starts Python under TCG: -H runs it here instead, and is faster.")

    paper = Table(title=f"on paper: {HOSTS} hosts on real hardware (a host's own time here / {TCG_FACTOR}, "
                        f"this machine's CPU per host on its {CORES} cores)")  # fmt: skip
    paper.add_column("workload")
    paper.add_column("how")
    paper.add_column("seconds", justify="right")
    for name, (ssh_runs, hub_runs) in results.items():
        table = Table(title=f"{name} on two guests, {args.rounds} rounds, the order alternating")
        for column in ("round", "over SSH: wall", "slowest host", "CPU here per host", "through the hub: wall",
                       "SSH / hub"):  # fmt: skip
            table.add_column(column, justify="right")
        for number, ((wall, slowest, cpu), hub_wall) in enumerate(zip(ssh_runs, hub_runs, strict=True), 1):
            table.add_row(str(number), f"{wall:.1f} s", f"{slowest:.1f} s", f"{cpu:.2f} s", f"{hub_wall:.1f} s",
                          f"{wall / hub_wall:.2f}x")  # fmt: skip
        console.print(table)
        host = statistics.median(run[1] for run in ssh_runs) / TCG_FACTOR
        cpu = statistics.median(run[2] for run in ssh_runs)
        for parallel in (10, 50, 100):
            # Hosts go in waves of --parallel, each wave as long as one host, unless this machine's CPU for
            # the SSH sessions (ssh's handshakes, rastosctl) is the bound.
            waves = -(-HOSTS // parallel) * host
            paper.add_row(name, f"over SSH, --parallel {parallel}", f"{max(waves, HOSTS * cpu / CORES):.0f}")
        paper.add_row(name, "through the hub (every host at once)", f"{host:.0f}")
    for run, seconds in PYINFRA_500.items():
        paper.add_row("pyinfra, 4 small operations (published)", run, f"{seconds:.0f}")
    console.print(paper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
