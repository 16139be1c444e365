"""Image updates end to end: v1 is built and booted, its admins change it through rastosd, v2 (one
package more, a sysctl changed) is staged as a delta with the power cut at each step of the staging
(the running version stays, nothing half-made is left), then rolled out by the hub with the power cut
once its entry is written (v2 boots on trial, the rollout completes), and the guest runs v2 with its
host name and user kept; a second rollout of v2 skips the host; v3, whose rastosd
cannot start, is rolled out by the hub, falls back to v2 by itself, and the hub halts its rollout with
the reason."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CACHE_DIR, CHECKOUT
from guest_console import PROMPT, GuestConsole, overlay, settled

from daemon.failpoints import UPDATE_POINTS
from tests.hub_fixtures import Hub, upload
from tests.hub_fixtures import hub as hub

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.network]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVwZGF0ZXMtdGVzdC1rZXktMDAwMDAwMDAwMDAwMDAw alice@test"
# One try for a new deployment: the fallback is seen after one failed boot, not three.
PROFILE = """extends = "minimal"
version = "{version}"
[packages]
include = [{packages}]
[kernel.sysctl]
"vm.swappiness" = {swappiness}
[boot]
tries = 1
{extra}
"""
BOOT_STATE = (
    'echo "STATE=$(busctl --json=short get-property org.rastos.Daemon1 /org/rastos/Daemon1 '
    'org.rastos.Daemon1.Manager BootState)"'
)


def build(folder: Path, key: Path, version: str, *, packages: str = "", swappiness: int = 10, extra: str = "",
          delta_from: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Build profile v`version` into `folder`; returns its manifest.json, with the paths of its bundles."""
    folder.mkdir()
    profile = folder / "updates.toml"  # one profile name for every version: a delta is of one profile
    profile.write_text(PROFILE.format(version=version, packages=packages, swappiness=swappiness, extra=extra))
    argv = [sys.executable, "-m", "imagebuilder", "build", str(profile), "--output-dir", str(folder / "out"),
            "--cache-dir", str(CACHE_DIR), "--signing-key", str(key)]  # fmt: skip
    if delta_from is not None:
        argv += ["--delta-from", str(delta_from)]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=CHECKOUT, check=False)
    assert result.returncode == 0, result.stderr
    print(f"v{version} built in {time.monotonic() - started:.1f}s")
    manifest = manifest_of(folder / "out")
    for kind, output in manifest["outputs"].items():
        print(f"  {kind}: {output['file']} {output['size'] / 2**20:.1f} MiB")
    return manifest


def manifest_of(out: Path) -> dict[str, Any]:
    """A build's manifest.json in `out`, each output with its "path"."""
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    for output in manifest["outputs"].values():
        output["path"] = out / output["file"]
    return manifest


def bundle_of(manifest: dict[str, Any], *, delta: bool) -> Path:
    names = [o["path"] for o in manifest["outputs"].values() if str(o["file"]).endswith(".rbundle")]
    chosen = [path for path in names if ("-from-" in path.name) == delta]
    assert len(chosen) == 1, names
    return Path(chosen[0])


def boot_state(guest: GuestConsole) -> dict[str, str]:
    return dict(json.loads(guest.run(BOOT_STATE, "STATE"))["data"])


def image_version(state: dict[str, Any], host: str) -> str | None:
    facts = state["hosts"][host].get("facts") or {}
    version = (facts.get("boot_state") or {}).get("image_version")
    return str(version) if version is not None else None


# The top of the root's btrfs (subvolid 5), mounted read-only for a look: each image subvolume with
# its read-only flag and received UUID, the deployments; then the boot entries and kernel folders.
SURVEY = (
    'mount -o ro,subvolid=5 /dev/vda2 /mnt && echo "SURVEY=$(cd /mnt && for s in @images/*; do [ -d "$s" ] && '
    'printf \'%s:%s:%s \' "${s#@images/}" "$(btrfs property get -ts "$s" ro | cut -d= -f2)" '
    '"$(btrfs subvolume show "$s" | awk \'/Received UUID/ {print $3}\')"; done)'
    ";$(ls /mnt/@deployments 2>/dev/null | tr '\\n' ,);$(ls /efi/loader/entries | tr '\\n' ,)"
    ";$(ls /efi/rastos | tr '\\n' ,)\"; umount /mnt"
)


def survey(guest: GuestConsole) -> tuple[list[str], list[str], list[str], list[str]]:
    """Images, deployments, boot entries, kernel folders; an image half received fails here (btrfs
    receive makes its subvolume read-only last; v1's own image was made in place, never received)."""
    images, deployments, entries, kernels = guest.run(SURVEY, "SURVEY").split(";")
    for image in images.split():
        name, readonly, received = image.split(":")
        assert readonly == "true", f"image {name} half received: {image}"
        assert received not in ("", "-") or name == "rastos-updates-1", f"image {name} never received: {image}"
    listed = [sorted(part for part in field.split(",") if part) for field in (deployments, entries, kernels)]
    return images.split(), listed[0], listed[1], listed[2]


@contextlib.contextmanager
def served(folder: Path) -> Iterator[int]:
    """`folder` over plain HTTP on the host's loopback (10.0.2.2 to the guest); yields the port."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def cut_while_staging(guest: GuestConsole, point: str, url: str, artifacts: Path) -> None:
    """Stage `url` with rastosd stopped at `point`, then cut the power there."""
    guest.type(f"systemctl set-environment RASTOS_TEST_FAILPOINT={point} && systemctl restart rastosd")
    guest.type(f"rastosctl update stage {url} > /dev/null 2>&1 &")
    assert guest.wait_for_new(f"rastos failpoint {point} reached".encode(), 300), point
    guest.power_cut()
    guest.close(artifacts / f"console-cut-at-{point}.log")


def roll_out(hub: Hub, bundle: Path) -> str:
    status, image = upload(hub, bundle.read_bytes())
    assert status in (200, 201), image
    rollout = hub.api("POST", "/api/v1/rollouts", {"image": image["id"], "target": {"hosts": ["vm-1"]},
                                                    "health_timeout_s": 1200})  # fmt: skip
    return str(rollout["id"])


def rollout_state(hub: Hub, rollout: str) -> dict[str, Any]:
    document: dict[str, Any] = hub.api("GET", f"/api/v1/rollouts/{rollout}")
    return document


def wait_rollout(hub: Hub, rollout: str, states: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (state := rollout_state(hub, rollout))["state"] not in states:
        assert time.monotonic() < deadline, f"rollout never reached {states}: {json.dumps(state)[:3000]}"
        time.sleep(1)
    return state


def test_an_update_keeps_the_host_and_a_broken_one_falls_back(
    tmp_path_factory: pytest.TempPathFactory, hub: Hub, artifacts: Path
) -> None:
    # Builds and the disk apart from `artifacts` (the test's tmp_path), which a failure keeps whole.
    work = tmp_path_factory.mktemp("updates")
    key = work / "signing-key"
    subprocess.run([sys.executable, "-m", "imagebuilder", "key", "generate", str(key)], cwd=CHECKOUT, check=True)
    v1 = build(work / "v1", key, "1")
    v2 = build(work / "v2", key, "2", packages='"hello"', swappiness=13, delta_from=bundle_of(v1, delta=False))
    broken = '[kernel]\ncmdline = ["systemd.mask=rastosd.service"]'  # its boot entry masks rastosd
    v3 = build(work / "v3", key, "3", packages='"hello"', swappiness=13, extra=broken,
               delta_from=bundle_of(v2, delta=False))  # fmt: skip
    full, delta = bundle_of(v2, delta=False).stat().st_size, bundle_of(v2, delta=True).stat().st_size
    print(f"v2 full bundle {full / 2**20:.1f} MiB, delta {delta / 2**20:.2f} MiB ({100 * delta / full:.1f} %)")
    assert delta < full / 5, "a one-package change makes a delta far smaller than the whole root"

    token = hub.api("POST", "/api/v1/hosts", {"name": "vm-1", "groups": ["vms"]})["token"]
    disk = overlay(Path(v1["outputs"]["qcow2"]["path"]), work / "disk.qcow2")
    credentials = ("--credential", f"rastos.hub.url=ws://10.0.2.2:{hub.port}/api/v1/agent",
                   "--credential", f"rastos.hub.token={token}")  # fmt: skip
    guest = GuestConsole(disk, keep_changes=True, boot_args=credentials)
    try:
        assert guest.wait_for(PROMPT, 300)
        settled(guest)
        assert boot_state(guest)["image_version"] == "1"
        hub.wait_state(lambda s: image_version(s, "vm-1") == "1", "v1 on the hub", 120)
        steps = [{"op": "hostname", "params": {"hostname": "kept-name"}},
                 {"op": "user", "params": {"name": "alice", "authorized_keys": [KEY]}}]  # fmt: skip
        run = hub.api("POST", "/api/v1/runs", {"target": {"hosts": ["vm-1"]}, "steps": steps})
        state = hub.wait_state(lambda s: s["runs"][run["id"]]["state"] != "running", "the run's end", 300)
        assert state["runs"][run["id"]]["state"] == "complete", state["runs"][run["id"]]
        guest.prompt = b"root@kept-name:~#"  # the shell's prompt from the next boot on

        # The power cut at each step of staging v2 before its entry is written: the next boot is v1's,
        # healthy, with nothing of v2 half made.
        v2_delta = bundle_of(v2, delta=True)
        with served(v2_delta.parent) as port:
            url = f"http://10.0.2.2:{port}/{v2_delta.name}"
            for point in UPDATE_POINTS:
                cut_while_staging(guest, point, url, artifacts)
                guest = GuestConsole(disk, keep_changes=True, boot_args=credentials)
                guest.prompt = b"root@kept-name:~#"
                assert guest.wait_for(guest.prompt, 400), f"the guest boots after a cut at {point}"
                settled(guest)
                state = boot_state(guest)
                assert state["health"] == "good", (point, state)
                assert state["image_version"] == "1" and state["root"] == "@", (point, state)
                _, deployments, entries, kernels = survey(guest)
                assert not [d for d in deployments if d.split("@")[0] == "2"], (point, deployments)
                assert not [e for e in entries if e.startswith("rastos-update-2")], (point, entries)
                assert not [k for k in kernels if k.split("@")[0] == "2"], (point, kernels)

        # The hub rolls v2 out, and the power is cut as soon as its entry is written, before rastosd
        # reboots into it: the next boot is v2's on trial (its entry is first), the hub sees it come back
        # healthy on v2, and the rollout completes.
        # The update must reach the restarted rastosd, which stops at the failpoint: one sent to the old
        # one, still connected while the restart is typed, is staged whole and rebooted into. So wait for
        # the restart to end in the guest (the old process gone), then for a report made after it: facts
        # the new agent sends when it connects. A report of the old one (facts change as a boot settles)
        # is no sign of the new connection.
        restart = ("systemctl set-environment RASTOS_TEST_FAILPOINT=update-entry-written && systemctl restart rastosd"
                   ' && echo "RESTARTED=$(systemctl is-active rastosd)"')  # fmt: skip
        assert guest.run(restart, "RESTARTED") == "active"
        restarted = time.time()
        hub.wait_state(lambda s: s["hosts"]["vm-1"]["online"] and s["hosts"]["vm-1"]["last_seen"] > restarted,
                       "the restarted agent connected", 120)  # fmt: skip
        rollout = roll_out(hub, v2_delta)
        assert guest.wait_for_new(b"rastos failpoint update-entry-written reached", 600), "v2 staged from the hub"
        guest.power_cut()
        guest.close(artifacts / "console-cut-at-update-entry-written.log")
        guest = GuestConsole(disk, keep_changes=True, boot_args=credentials)
        guest.prompt = b"root@kept-name:~#"
        assert guest.wait_for(guest.prompt, 400), "the guest boots after the cut at update-entry-written"
        settled(guest)
        done = wait_rollout(hub, rollout, {"complete", "halted"}, 300)
        assert done["state"] == "complete", done
        state = boot_state(guest)
        assert state["image_version"] == "2" and state["root"] == "@deployments/2", state
        assert state["health"] == "good" and state["kind"] == "deployment", state
        # Hosts already on a version are skipped: a second rollout of v2 has nothing to do here.
        again = wait_rollout(hub, roll_out(hub, v2_delta), {"complete", "halted"}, 120)
        assert again["state"] == "complete" and again["hosts"][0]["state"] == "skipped", again
        seen = guest.run('echo "SEEN=$(hostname) $(sysctl -n vm.swappiness) $(dpkg-query -W -f=\'${Status}\' hello | '
                         'tr " " _) $(grep -c alice@test /home/alice/.ssh/authorized_keys)"', "SEEN")  # fmt: skip
        assert seen == "kept-name 13 install_ok_installed 1", "the new package and sysctl, the host's name and user"

        rollout = roll_out(hub, bundle_of(v3, delta=True))
        assert guest.wait_for_new(b"BdsDxe: starting", 900), "the host staged v3 and rebooted"
        assert guest.wait_for_new(b"the health check failed", 600), "v3's trial boot fails its health check"
        last = guest.seen.rfind(b"the health check failed")
        assert guest.wait_for_after(last, b"BdsDxe: starting", 300), "the failed trial boot rebooted"
        assert guest.wait_for_new(guest.prompt, 400), "v2 boots again by itself"
        settled(guest)
        state = boot_state(guest)
        assert state["kind"] == "fallback" and state["image_version"] == "2", state
        assert state["failed_entry"].startswith("rastos-update-3"), state
        halted = wait_rollout(hub, rollout, {"halted", "complete"}, 300)
        assert halted["state"] == "halted" and "fallback" in json.dumps(halted).lower(), halted
    finally:
        guest.close(artifacts / "console.log")
