"""An Arch Linux image, built end to end through libalpm, boots and runs rastosd.

This machine reaches no Arch mirror (docs/arch.md), so the test makes the repository: the userland
of the Debian root that the builder bootstraps for `minimal` (one package), and its kernel in Arch's
layout (the `linux` package: /usr/lib/modules/VERSION/vmlinuz beside `pkgbase`, its modules
recompressed with zstd as Arch ships them, no modules.dep), plus an empty package for each other name
an Arch image asks for, each signed with a throwaway packager key that the profile's keyring trusts.
From there on everything is the Arch path of the builder: the libalpm bootstrap checking every
signature, with its scriptlets' namespaces, depmod, the kernel found in Arch's place, rastOS's initrd
with the zstd modules decompressed, the inventory from libalpm's database, the boot loader and disk.
The contents are Debian's; the layout, the package manager and every stage are Arch's.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CACHE_DIR, build_qcow2
from guest_console import PROMPT, GuestConsole

from imagebuilder.profile.load import load_profile
from imagebuilder.stages.bootstrap import bootstrap_inputs, cache_key
from imagebuilder.stages.bootstrap_arch import package_set
from tests.pacman_keys import Keys

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.network]

USERLAND = "rastos-test-userland"
BUILT = 1700000000
# Index files depmod writes; Arch's kernel packages ship only the lists depmod reads.
KEPT_MODULE_LISTS = {"modules.builtin", "modules.builtin.modinfo", "modules.order"}

PROFILE = """description = "Arch layout from a local repository (qemu-tests/test_arch_image.py)"
[distribution]
name = "arch"
mirror = "file://{repo}/$repo"
repositories = ["test"]
keyring = "{keyring}"
[packages]
include = ["iproute2", "less", "procps"]
docs = false
[kernel]
initramfs = "virtio"
cmdline = ["quiet", "loglevel=3", "systemd.show_status=error", "panic=10", "8250.nr_uarts=1", "tsc=reliable",
           "no_timer_check", "mitigations=off"]
[system]
hostname = "rastos"
autologin = true
enable = ["systemd-networkd.service"]
mask = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
        "fstrim.timer", "systemd-boot-random-seed.service", "getty@tty1.service"]
[disk]
size = "2G"
esp_size = "128M"
[boot]
tries = 3
menu_timeout = 0
console = "ttyS0"
"""


def write_package(
    path: Path, name: str, version: str, depends: list[str], add: Callable[[tarfile.TarFile], None]
) -> Path:
    """An uncompressed package, .PKGINFO first, as libalpm and repo-add read any libarchive format."""
    info = [f"pkgname = {name}", f"pkgbase = {name}", f"pkgver = {version}", f"pkgdesc = {name} (test)",
            f"builddate = {BUILT}", "packager = rastOS tests", "size = 1", "arch = x86_64",
            *[f"depend = {d}" for d in depends]]  # fmt: skip
    data = ("\n".join(info) + "\n").encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        entry = tarfile.TarInfo(".PKGINFO")
        entry.size, entry.mtime = len(data), BUILT
        archive.addfile(entry, io.BytesIO(data))
        add(archive)
    return path


def add_tree(archive: tarfile.TarFile, root: Path, skip: Callable[[str], bool]) -> None:
    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if skip(member.name) else member

    for top in sorted(root.iterdir()):
        archive.add(top, arcname=top.name, recursive=True, filter=keep)


def userland_skips(name: str) -> bool:
    volatile = ("dev/", "proc/", "sys/", "run/", "tmp/", "boot/")
    return name.startswith(volatile) or name == "usr/lib/modules" or name.startswith("usr/lib/modules/")


def arch_kernel_tree(debian_root: Path, scratch: Path) -> tuple[str, Path]:
    """Debian's kernel and modules laid out as Arch's `linux` package has them."""
    (vmlinuz,) = sorted((debian_root / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    tree = scratch / "linux"
    modules = tree / "usr/lib/modules" / version
    shutil.copytree(debian_root / "usr/lib/modules" / version, modules, symlinks=True)
    for index in modules.glob("modules.*"):
        if index.name not in KEPT_MODULE_LISTS:
            index.unlink()
    compressed = [str(p) for p in modules.rglob("*.ko.xz")]
    assert compressed, "Debian's modules are xz-compressed"
    subprocess.run(["xz", "--decompress", "--threads=0", *compressed], check=True)
    plain = [p.removesuffix(".xz") for p in compressed]
    subprocess.run(["zstd", "--quiet", "--rm", "-T0", "-3", *plain], check=True)
    shutil.copy2(vmlinuz, modules / "vmlinuz")
    (modules / "pkgbase").write_text("linux\n")
    return version, tree


@pytest.fixture(scope="module")
def arch_image(tmp_path_factory: pytest.TempPathFactory, minimal_image: Path) -> tuple[Path, str, str]:
    """The Arch image, the kernel release it must run, and its packages' version. `minimal_image`
    leaves the Debian root bootstrapped for `minimal` in the cache, where this takes it from."""
    key = cache_key(bootstrap_inputs(load_profile("minimal")))
    debian_root = CACHE_DIR / "bootstrap" / key / "root"
    assert (debian_root / "usr/bin/busybox").is_file(), debian_root
    version = f"1.{key[:12]}-1"
    folder = tmp_path_factory.mktemp("arch")
    repo = folder / "mirror" / "test"
    repo.mkdir(parents=True)
    profile = folder / "arch-local.toml"
    keys = Keys.make(folder / "keys")
    profile.write_text(PROFILE.format(repo=folder / "mirror", keyring=keys.keyring))
    release, kernel_tree = arch_kernel_tree(debian_root, folder / "scratch")
    made = [
        write_package(repo / f"{USERLAND}-{version}-x86_64.pkg.tar", USERLAND, version, [],
                      lambda a: add_tree(a, debian_root, userland_skips)),
        write_package(repo / f"linux-{version}-x86_64.pkg.tar", "linux", version, [USERLAND],
                      lambda a: add_tree(a, kernel_tree, lambda name: False)),
    ]  # fmt: skip
    wanted = set(package_set(load_profile(profile))) - {"linux"}
    made += [write_package(repo / f"{n}-1-1-x86_64.pkg.tar", n, "1-1", [USERLAND], lambda a: None) for n in wanted]
    for package in made:  # every signature is checked against the keyring in the bootstrap
        keys.sign(package)
    subprocess.run(["repo-add", "--quiet", repo / "test.db.tar.gz", *made], check=True)
    shutil.rmtree(folder / "scratch")
    try:
        # A cache of its own: libalpm keeps downloads by file name, and a package made again (its
        # directories dated anew) is another file under the same name; each run's bootstrap has its
        # own key (the mirror is in its folder) and would push the shared cache's entries out.
        return build_qcow2(profile, folder / "out", folder / "cache"), release, version
    finally:
        keys.close()


def test_an_arch_image_from_a_local_repository_boots_with_rastosd(
    arch_image: tuple[Path, str, str], artifacts: Path
) -> None:
    image, release, version = arch_image
    manifest = json.loads((image.parent / "manifest.json").read_text())
    assert manifest["kernel"]["version"] == release
    packages = {p["name"]: p["version"] for p in manifest["packages"]}
    assert packages["linux"] == version and packages[USERLAND] == version, "the inventory is libalpm's"
    assert {"base", "python-sdbus", "busybox"} <= set(packages)
    guest = GuestConsole(image)
    try:
        assert guest.wait_for(PROMPT, 300), "root is logged in on the serial console"
        assert guest.run("echo RELEASE=$(uname -r)", "RELEASE") == release
        guest.assert_up()
        # The root is the one libalpm made: its database and pacman.conf, the modules as Arch ships them.
        assert guest.run("echo REPOS=$(grep -c '^\\[test\\]' /etc/pacman.conf)", "REPOS") == "1"
        signatures = guest.run("echo SIGLEVEL=$(grep '^SigLevel' /etc/pacman.conf)", "SIGLEVEL")
        assert signatures == "SigLevel = Required DatabaseOptional", "the image checks what the build checked"
        assert guest.run("echo OWNED=$(ls /var/lib/pacman/local | grep '^linux-')", "OWNED") == f"linux-{version}"
        modules = f"/usr/lib/modules/{release}/kernel/fs/btrfs"
        assert guest.run(f"echo BTRFS=$(ls {modules})", "BTRFS") == "btrfs.ko.zst"
        assert guest.run("echo ROOT=$(findmnt -no FSTYPE /)", "ROOT") == "btrfs"
    finally:
        guest.close(artifacts / "console.log")
