"""The hub appliance (profiles/hub.toml) in one VM serves a fleet over TLS, and rastosd in a second VM,
pointed at it at boot by systemd credentials (URL, token, CA), connects and carries out what it
dispatches. Then the appliance is updated to its next version and keeps its fleet: the database and
the hub's state are on subvolumes of their own, and its settings come over. QEMU's user network shows
the host's loopback as 10.0.2.2: the appliance's hub port is forwarded to the host, so the second VM
reaches it at 10.0.2.2, and the test's own requests at 127.0.0.1, both names in the hub's certificate."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CACHE_DIR, CHECKOUT
from guest_console import GuestConsole, settled
from test_updates import boot_state, bundle_of, manifest_of, served

from imagebuilder.vm import VmOptions, free_port, running_vm
from tests.hub_fixtures import Hub

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

APPLIANCE_PROMPT = b"root@rastos-hub:~#"
# The hub's first line once it listens, stamped in seconds since the kernel started.
SERVING = "journalctl -b -o short-monotonic -u rastos-hub --grep 'serving on' --quiet --no-pager"
UNTIL_SERVING = f'timeout 120 sh -c "until {SERVING} | grep -q serving; do sleep 0.2; done"'
TLS = "/var/lib/rastos-hub/tls"
TLS_OPTIONS = f"--listen 0.0.0.0:8470 --tls-cert {TLS}/hub.crt --tls-key {TLS}/hub.key"


class ApplianceHub(Hub):
    """The appliance's hub as the host reaches it: its forwarded port on 127.0.0.1, over TLS."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class Phases:
    """How long each phase took, printed as it ends: the figures docs/hub.md quotes."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"{what}: {now - self.last:.1f}s (at {now - self.start:.1f}s)", flush=True)
        self.last = now


def set_up(appliance: GuestConsole) -> tuple[str, str, str]:
    """On the appliance's console, as its operator would: the hub's certificate from the appliance's CA
    for the agents' and the test's addresses, a host and an admin, the three at once (each is a process
    that starts Python under emulation; the hub's migrations wait for each other). Returns the CA (PEM),
    the host's token and the admin's token: what the second VM needs to boot."""
    certs = 'rastosctl apply certs hub_names=\'["10.0.2.2", "127.0.0.1"]\' trust=false >/dev/null'
    hub_cli = "runuser -u rastos-hub -- rastos-hub"
    # At the prompt the boot may not have made the hub's database yet: starting its unit waits for it.
    hub = (f"systemctl start rastos-hub-postgresql && {{ {hub_cli} host add vm-1 --group vms >/run/host & h=$!; "
           f"{hub_cli} admin add tester >/run/admin && wait $h; }}")  # fmt: skip
    at_once = f"{certs} & c=$!; {hub} && wait $c"
    made = appliance.run(f"echo MADE=$({at_once} && echo $(tail -1 /run/host) $(tail -1 /run/admin) "
                         f"$(base64 -w0 {TLS}/ca.crt))", "MADE", 240)  # fmt: skip
    token, admin, ca = made.split()
    return base64.b64decode(ca).decode(), token, admin


def serve_tls(appliance: GuestConsole) -> None:
    """The hub on every address, over TLS with the certs op's pair: hub.env's options, and a restart."""
    tls = f"sed -i 's|^RASTOS_HUB_OPTIONS=.*|RASTOS_HUB_OPTIONS={TLS_OPTIONS}|' /etc/rastos-hub/hub.env"
    assert appliance.run(f"echo TLS=$({tls} && systemctl restart rastos-hub && echo done)", "TLS", 120) == "done"


def wait_answering(hub: Hub, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            hub.api("GET", "/api/v1/hosts")
            return
        except OSError:  # refused, reset by the forward while the hub listens on loopback, TLS not yet
            assert time.monotonic() < deadline, f"the appliance's hub did not answer on {hub.url} within {timeout}s"
            time.sleep(0.2)


def next_version(hub_image: Path, folder: Path) -> Path:
    """The appliance's next version, as a delta bundle from `hub_image`'s: the same profile, rebuilt."""
    full = bundle_of(manifest_of(hub_image.parent), delta=False)
    argv = [sys.executable, "-m", "imagebuilder", "build", "hub", "--image-version", "2", "--output-dir", str(folder),
            "--cache-dir", str(CACHE_DIR), "--delta-from", str(full), "--json"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, cwd=CHECKOUT, check=False)
    assert result.returncode == 0, result.stderr
    return bundle_of(manifest_of(folder), delta=True)


def test_a_vm_joins_the_hub_appliance_over_tls_and_runs_what_it_dispatches(
    hub_image: Path, minimal_image: Path, artifacts: Path, tmp_path: Path
) -> None:
    phases = Phases()
    update = next_version(hub_image, tmp_path / "v2")
    phases.done("appliance: its next version built")
    port = free_port()
    appliance = GuestConsole(hub_image, boot_args=("--forward", f"{port}:8470"))
    appliance.prompt = APPLIANCE_PROMPT
    try:
        assert appliance.wait_for(APPLIANCE_PROMPT, 300), "root is logged in on the appliance's console"
        phases.done("appliance: QEMU start to its root prompt")
        ca, token, admin = set_up(appliance)
        phases.done("appliance: certificate, host and admin made (its hub starting meanwhile)")
        # The hub serves on loopback from the first boot: when, from the kernel's start.
        serving = appliance.run(f"{UNTIL_SERVING}; echo SERVING=$({SERVING} | head -1 | tr -d '[' | cut -d] -f1)",
                                "SERVING", 150)  # fmt: skip
        print(f"appliance: kernel start to its hub serving on loopback: {float(serving):.1f}s")
        chain = "systemd-analyze critical-chain rastos-hub.service --no-pager | tail -n +3 | tr -s ' \\n' ' '"
        print("appliance: the hub's critical chain:", appliance.run(f"echo CHAIN=$({chain})", "CHAIN"))
        (tmp_path / "ca.crt").write_text(ca)
        hub = ApplianceHub(tmp_path / "hub", port=port, admin_token=admin)
        hub.client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        url = f"wss://10.0.2.2:{port}/api/v1/agent"
        credentials = (("rastos.hub.url", url), ("rastos.hub.token", token), ("rastos.hub.ca", ca))
        options = VmOptions(image=minimal_image, snapshot=True, credentials=credentials)
        agent(hub, lambda: serve_tls(appliance), options, artifacts, phases)
        backup_and_restore(appliance, hub)
        phases.done("appliance: backup, restore, the hub back")
        update_keeps_the_fleet(appliance, hub, update)
        phases.done("appliance: updated to its next version, its fleet kept")
        state = appliance.run("echo STATE=$(systemctl is-system-running)", "STATE")
        failed = appliance.run("echo FAILED=$(systemctl --failed --plain --no-legend | tr '\\n' ' ')", "FAILED")
        assert state == "running", failed
    finally:
        appliance.close(artifacts / "appliance-console.log")


def agent(hub: Hub, serve_tls: Callable[[], None], options: VmOptions, artifacts: Path, phases: Phases) -> None:
    """The second VM boots while the appliance's hub restarts on TLS (`serve_tls`); the checks of a
    host on the hub, from its facts to its going offline at powerdown."""

    def serving() -> None:
        serve_tls()
        wait_answering(hub, 120)

    async def scenario() -> int:
        async with running_vm(options, artifacts / "console.log") as vm:
            answering = asyncio.create_task(asyncio.to_thread(serving))
            report = await vm.wait_ready(300)
            assert report["state"] == "running", report["failed_units"]
            await answering
            phases.done("agent: QEMU start to its boot report (the hub answering over TLS meanwhile)")
            state = await asyncio.to_thread(
                hub.wait_state, lambda s: bool(s["hosts"]["vm-1"]["facts"]), "the VM's facts", 120
            )
            phases.done("agent: boot report to the hub holding its facts")
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
            # The facts with the new name may come before those with the job's post snapshot: both are waited for.
            state = await asyncio.to_thread(hub.wait_state, renamed_and_snapshotted, "new name, pre and post", 60)
            facts = state["hosts"]["vm-1"]["facts"]
            assert [s["kind"] for s in facts["snapshots"]][-2:] == ["pre", "post"], "the job's snapshots"
            phases.done("agent: a run dispatched and complete, its facts back")
            return await vm.powerdown()

    assert asyncio.run(scenario()) == 0
    state = hub.wait_state(lambda s: not s["hosts"]["vm-1"]["online"], "the VM gone offline", 60)
    assert state["hosts"]["vm-1"]["health"] == "offline"
    phases.done("agent: powered down, offline on the hub")


def renamed_and_snapshotted(state: dict[str, Any]) -> bool:
    facts = state["hosts"]["vm-1"]["facts"]
    return bool(facts["hostname"] == "fleet-vm-1" and [s["kind"] for s in facts["snapshots"]][-2:] == ["pre", "post"])


def backup_and_restore(appliance: GuestConsole, hub: Hub) -> None:
    """The nightly backup's unit, run now, writes a dump; a host added after it is gone once the dump is
    restored (the hub stopped, as `db restore` wants), and vm-1 is there."""
    backups = "/var/lib/rastos-hub/backups"
    dump = appliance.run(f"systemctl start rastos-hub-backup && echo DUMP=$(ls {backups})", "DUMP", 180)
    assert dump.startswith("rastos-hub-") and dump.endswith(".pgdump"), dump
    hub_cli = "runuser -u rastos-hub -- rastos-hub"
    assert appliance.run(f"echo ADDED=$({hub_cli} host add later >/dev/null && echo yes)", "ADDED", 120) == "yes"
    restore = f"{hub_cli} db restore {backups}/{dump} >/dev/null"
    restore = f"systemctl stop rastos-hub && {restore} && systemctl start rastos-hub"
    assert appliance.run(f"echo RESTORED=$({restore} && echo yes)", "RESTORED", 180) == "yes"
    wait_answering(hub, 120)
    assert sorted(hub.state()["hosts"]) == ["vm-1"]


def update_keeps_the_fleet(appliance: GuestConsole, hub: Hub, update: Path) -> None:
    """The appliance stages its next version and reboots into it: the hub serves the same fleet over TLS
    (its database and certificate on their subvolumes, hub.env carried), even with the accounts that
    own them numbered otherwise than before (as a new image may number them), which the units give back."""
    before = hub.state()
    renumber = ("systemctl stop rastos-hub postgresql && "
                "chown -R 4242:4242 /var/lib/postgresql && chown -R 4243:4243 /var/lib/rastos-hub")  # fmt: skip
    assert appliance.run(f"echo RENUMBERED=$({renumber} && echo yes)", "RENUMBERED", 120) == "yes"
    with served(update.parent) as port:
        stage = f"rastosctl update stage --reboot http://10.0.2.2:{port}/{update.name} >/dev/null 2>&1 &"
        appliance.type(stage)
        assert appliance.wait_for_new(b"BdsDxe: starting", 900), "the appliance staged its next version and rebooted"
    assert appliance.wait_for_new(APPLIANCE_PROMPT, 400), "the next version boots to its console"
    settled(appliance)
    boot = boot_state(appliance)
    assert boot["image_version"] == "2" and boot["root"] == "@deployments/2" and boot["health"] == "good", boot
    owners = appliance.run("echo OWNERS=$(stat -c %U:%G /var/lib/postgresql /var/lib/rastos-hub/tls/hub.key)", "OWNERS")
    assert owners == "postgres:postgres rastos-hub:rastos-hub", owners
    wait_answering(hub, 180)
    after = hub.state()
    assert sorted(after["hosts"]) == sorted(before["hosts"]) == ["vm-1"]
    assert sorted(after["runs"]) == sorted(before["runs"]) and after["runs"], "the runs the hub had, kept"
