"""Hosts without a hub, then one joined to a hub, all over SSH: guests of the `server` profile
(remote_guests.py), driven from the host."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_console import GuestConsole, SavedGuest
from remote_guests import resume, ssh

from tests.hub_fixtures import HUB_CLI, Hub
from tests.hub_fixtures import hub as hub
from tests.ssh_fixtures import SshClient, closed_port

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.network]

CHECKOUT = Path(__file__).resolve().parents[1]
# The workflow every host gets; its update step reaches Debian's mirror from the guest.
WORKFLOW = "essential"
# What the workflow's first step (sysctl) writes (the image has it already, from the profile's
# [kernel.sysctl]). A link there, which the op did not make, is refused: the guest that has one fails
# that step, and its pipeline stops there.
SYSCTL_FILE = "/etc/sysctl.d/90-rastos.conf"


def records(output: str) -> dict[str, dict[str, Any]]:
    """`--json` over an inventory: one record a line, by host."""
    found = [json.loads(line) for line in output.splitlines() if line.strip()]
    return {record["host"]: record for record in found}


@pytest.fixture
def guests(saved_server: SavedGuest, ssh_client: SshClient, artifacts: Path) -> Iterator[list[GuestConsole]]:
    running: list[GuestConsole] = []
    try:
        for number in range(2):
            running.append(resume(saved_server, ssh_client, artifacts / f"guest-{number}"))
        yield running
    finally:
        for number, guest in enumerate(running):
            guest.close(artifacts / f"console-{number}.log")


def test_an_inventory_runs_a_workflow_on_two_guests_and_names_each_ones_end(
    guests: list[GuestConsole], ssh_client: SshClient, tmp_path: Path
) -> None:
    ports = [guest.ssh_port() for guest in guests]
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        "".join(f'[[host]]\nname = "{name}"\naddress = "127.0.0.1"\nuser = "root"\nport = {port}\n\n'
                for name, port in (("a", ports[0]), ("b", ports[1]), ("c", closed_port())))
        + '[group.vms]\nhosts = ["a", "b"]\n'
    )  # fmt: skip

    # A dry run on the group: each guest's plan, nothing changed (no snapshot, the file as it was).
    before = [ssh(ssh_client, port, f"sha256sum {SYSCTL_FILE}") for port in ports]
    snapshots = [json.loads(ssh(ssh_client, port, "rastosctl --json status"))["snapshots"] for port in ports]
    planned = ssh_client.ctl("--inventory", str(inventory), "--limit", "vms", "--json", "workflow", "run", WORKFLOW,
                         "--dry-run", timeout=600)  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plans = records(planned.stdout)
    print("dry run", {name: round(r["seconds"], 1) for name, r in plans.items()})
    assert sorted(plans) == ["a", "b"] and {r["outcome"] for r in plans.values()} == {"changed"}, plans
    for port, hashed, count in zip(ports, before, snapshots, strict=True):
        assert json.loads(ssh(ssh_client, port, "rastosctl --json status"))["snapshots"] == count, "no snapshot taken"
        assert ssh(ssh_client, port, f"sha256sum {SYSCTL_FILE}") == hashed, "the dry run wrote nothing"

    # The real run on every host: b cannot take the first step, c does not answer, a completes.
    ssh(ssh_client, ports[1], f"ln -sf /etc/shadow {SYSCTL_FILE}")
    ran = ssh_client.ctl("--inventory", str(inventory), "--json", "workflow", "run", WORKFLOW, timeout=900)
    assert ran.returncode != 0, "a host failed: the run says so"
    ends = records(ran.stdout)
    print({name: (r["outcome"], round(r.get("seconds", 0), 1)) for name, r in ends.items()})
    outcomes = {name: r["outcome"] for name, r in ends.items()}
    assert outcomes == {"a": "changed", "b": "failed", "c": "unreachable"}, json.dumps(ends)[:4000]
    assert ends["c"]["error"]["reason"] == "unreachable", ends["c"]
    steps = ends["a"]["result"]["result"]["steps"]
    assert len(steps) == 3 and {step["state"] for step in steps} <= {"changed", "unchanged"}, steps
    failed = ends["b"]["result"]["result"]["steps"]
    assert failed[0]["state"] == "failed" and "link" in json.dumps(failed[0]).lower(), failed
    assert ssh(ssh_client, ports[0], f"sha256sum {SYSCTL_FILE}") != before[0], "a's sysctl file has the new set"
    assert ssh(ssh_client, ports[1], f"readlink {SYSCTL_FILE}") == "/etc/shadow", "b's link is left as it was"


def test_a_running_guest_is_enrolled_into_a_hub_over_ssh(
    saved_server: SavedGuest, ssh_client: SshClient, hub: Hub, artifacts: Path
) -> None:
    guest = resume(saved_server, ssh_client, artifacts / "guest")
    try:
        port = guest.ssh_port()
        # The guest reaches this host's loopback, where the hub listens, as 10.0.2.2 (QEMU's user network).
        enrolled = subprocess.run(
            [*HUB_CLI, *hub.options, "host", "enrol", f"root@127.0.0.1:{port}", "--name", "vm-a", "--group", "vms",
             "--hub-url", f"http://10.0.2.2:{hub.port}", "--timeout", "120"],
            capture_output=True, text=True, check=False, timeout=300, cwd=CHECKOUT, env=ssh_client.env(),
            start_new_session=True,
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        assert enrolled.stdout.splitlines()[-1].startswith("vm-a: online on the hub"), enrolled.stdout
        state = hub.wait_state(lambda s: bool(s["hosts"]["vm-a"]["facts"]), "vm-a's facts", 60)
        assert state["hosts"]["vm-a"]["online"] and state["hosts"]["vm-a"]["groups"] == ["vms"]
        assert state["hosts"]["vm-a"]["facts"]["boot_state"]["root"] == "@"
        # The agent's own word, over the same SSH path an admin would use.
        assert json.loads(ssh(ssh_client, port, "rastosctl --json hub status"))["state"] == "connected"
        assert ssh(ssh_client, port, "stat -c '%a %U' /etc/rastos/hub-token") == "600 root"
        # grep reads the token from its file, so it is on no command line either.
        logged = ssh(ssh_client, port, "journalctl --boot --no-pager | grep -c -F -f /etc/rastos/hub-token || true")
        assert logged == "0", "the token is in the guest's journal"
    finally:
        guest.close(artifacts / "console.log")
