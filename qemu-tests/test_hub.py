"""rastosd in a booted VM connects to a hub on the host (QEMU's user network: the host is 10.0.2.2),
given the hub's URL and its host token as systemd credentials at boot, and carries out what the hub
dispatches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from imagebuilder.vm import VmOptions, running_vm
from tests.hub_fixtures import Hub
from tests.hub_fixtures import hub as hub

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


def test_the_daemon_in_a_vm_syncs_to_a_hub_on_the_host(minimal_image: Path, artifacts: Path, hub: Hub) -> None:
    token = hub.api("POST", "/api/v1/hosts", {"name": "vm-1", "groups": ["vms"]})["token"]
    credentials = (("rastos.hub.url", f"ws://10.0.2.2:{hub.port}/api/v1/agent"), ("rastos.hub.token", token))
    options = VmOptions(image=minimal_image, snapshot=True, credentials=credentials)

    async def scenario() -> int:
        async with running_vm(options, artifacts / "console.log") as vm:
            report = await vm.wait_ready(300)
            assert report["state"] == "running", report["failed_units"]
            started = time.monotonic()
            state = await asyncio.to_thread(
                hub.wait_state, lambda s: bool(s["hosts"]["vm-1"]["facts"]), "the VM's facts", 120
            )
            print(f"hub saw the VM {time.monotonic() - started:.1f}s after its boot report")
            host = state["hosts"]["vm-1"]
            assert host["online"] and host["facts"]["hostname"] == "rastos"
            assert host["facts"]["boot_state"]["root"] == "@" and "hostname" in host["facts"]["ops"]
            steps = [{"op": "hostname", "params": {"hostname": "fleet-vm-1"}},
                     {"op": "motd", "params": {"text": "managed by the hub"}}]  # fmt: skip
            run = await asyncio.to_thread(hub.api, "POST", "/api/v1/runs", {"target": {"group": "vms"}, "steps": steps})
            state = await asyncio.to_thread(
                hub.wait_state, lambda s: s["runs"][run["id"]]["state"] != "running", "the run's end", 300
            )
            command = state["runs"][run["id"]]["commands"][0]
            assert state["runs"][run["id"]]["state"] == "complete", command
            assert [step["state"] for step in command["result"]["steps"]] == ["changed", "changed"]
            state = await asyncio.to_thread(
                hub.wait_state, lambda s: s["hosts"]["vm-1"]["facts"]["hostname"] == "fleet-vm-1", "new name", 60
            )
            facts = state["hosts"]["vm-1"]["facts"]
            assert [s["kind"] for s in facts["snapshots"]][-2:] == ["pre", "post"], "the job's snapshots"
            return await vm.powerdown()

    assert asyncio.run(scenario()) == 0
    state = hub.wait_state(lambda s: not s["hosts"]["vm-1"]["online"], "the VM gone offline", 60)
    assert state["hosts"]["vm-1"]["health"] == "offline"
