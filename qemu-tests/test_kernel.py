"""A kernel built from the `minimal-vm` profile, in an image that boots: the image builder builds it
(or takes it from the kernel cache) and installs it in place of Debian's; inside, the running kernel is
that one and its configuration (/proc/config.gz) holds the profile's options. Then the kernel CLI
answers the same profile from its cache, and exports a kernel image with its modules tree."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE_DIR, CHECKOUT, build_qcow2
from guest_console import PROMPT, GuestConsole

from imagebuilder.kernel import profile as kernel_profiles

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def kernel_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kernel-image")
    (folder / "tuned.toml").write_text('extends = "minimal"\n[kernel]\nbuild = "minimal-vm"\n')
    return build_qcow2(folder / "tuned.toml", folder / "out")


def test_an_image_boots_the_minimal_vm_kernel_with_the_profile_s_options(kernel_image: Path, artifacts: Path) -> None:
    manifest = json.loads((kernel_image.parent / "manifest.json").read_text())
    release = manifest["kernel"]["version"]
    assert release.endswith("-rastos-minimal-vm"), release
    assert not any(p["name"] == "linux-image-amd64" for p in manifest.get("packages", [])), "Debian's is not in"
    wanted = {name: value for name, value in kernel_profiles.load("minimal-vm").options.items() if value == "y"}
    guest = GuestConsole(kernel_image)
    try:
        assert guest.wait_for(PROMPT, 300), "root is logged in on the serial console"
        assert guest.run("echo RELEASE=$(uname -r)", "RELEASE") == release
        guest.assert_up()
        # The whole running configuration, copied out through the console as one base64 line.
        encoded = guest.run("echo CONFIG=$(base64 -w0 /proc/config.gz)", "CONFIG", 120)
    finally:
        guest.close(artifacts / "console.log")
    running = gzip.decompress(base64.b64decode(encoded)).decode()
    lines = set(running.splitlines())
    missing = [name for name in wanted if f"CONFIG_{name}=y" not in lines]
    assert missing == [], f"options of the profile not in the running kernel: {missing}"
    assert "CONFIG_SOUND=y" not in lines and "CONFIG_USB=y" not in lines, "no hardware the VM does not have"


def test_the_kernel_cli_answers_from_its_cache_and_exports_a_tree(kernel_image: Path, tmp_path: Path) -> None:
    """The image's build left minimal-vm in the cache: the CLI builds nothing and says so."""
    result = subprocess.run(
        [sys.executable, "-m", "imagebuilder", "kernel", "build", "minimal-vm", "--json", "--strict",
         "--cache-dir", str(CACHE_DIR), "--output", str(tmp_path / "out"), "--tree"],
        capture_output=True, text=True, cwd=CHECKOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout.splitlines()[-1])
    assert built["cached"] is True and built["misses"] == []
    release = built["release"]
    tree = tmp_path / "out" / "tree"
    assert (tree / f"boot/vmlinuz-{release}").is_file()
    assert (tree / f"lib/modules/{release}/modules.builtin").is_file()
    assert (tmp_path / "out" / built["package"]).is_file() and (tmp_path / "out" / f"config-{release}").is_file()
