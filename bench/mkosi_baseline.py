"""mkosi's image of Debian trixie, built and booted on this machine: the other builder the image
benchmark sets rastOS beside, measured in the same run.

The image is the smallest bootable one mkosi's documentation builds (systemd, udev, systemd-boot, a
kernel; `--format disk`), with mkosi's defaults for everything else. It boots on the same emulated
machine, accelerator, firmware and devices as rastOS's image, and is given what `mkosi qemu` gives
it: the firstboot credentials (without them systemd-firstboot waits for a key) and `loglevel=4`,
with the console on the serial port the bench reads instead of virtio's hvc0.

mkosi is not installed on the host. Trixie's mkosi needs trixie's tools, and bookworm-backports'
would upgrade the host's systemd, which tests/test_units_security.py rates our units with. So the
bench bootstraps a trixie tree holding mkosi and its tools (bare mmdebstrap, as mkosi's own tools
tree would be) and runs mkosi chrooted in it, in a mount namespace of its own: nothing is mounted
on the host, and whatever mkosi mounts goes with the namespace when it ends.
"""

from __future__ import annotations

import time
from pathlib import Path

from imagebuilder.vm import MACHINE, Firmware, accelerator_args, credential_args, firmware_args
from rastos.process import run

TOOLS = (
    "mkosi", "systemd", "systemd-repart", "systemd-boot-efi", "systemd-ukify", "bubblewrap", "apt",
    "debian-archive-keyring", "dosfstools", "mtools", "e2fsprogs", "btrfs-progs", "squashfs-tools",
    "cpio", "zstd", "xz-utils", "kmod", "python3", "ca-certificates", "util-linux", "fdisk",
)  # fmt: skip
PACKAGES = ("systemd", "systemd-boot", "linux-image-amd64", "udev", "dbus")
CREDENTIALS = (("firstboot.locale", "C.UTF-8"), ("firstboot.timezone", "UTC"))
CMDLINE_EXTRA = "console=ttyS0 loglevel=4"
# Where the image is built, inside the tools tree.
OUTPUT = "/root/mkosi"

# mkosi's sandbox makes / a slave mount, which fails (EINVAL) unless / is a mount point: hence the
# tree bound onto itself before the chroot.
ENTER_TREE = """
set -e
tree=$1
shift
mount --bind "$tree" "$tree"
mount --rbind /dev "$tree/dev"
mount -t proc proc "$tree/proc"
mount --rbind /sys "$tree/sys"
mount -t tmpfs tmpfs "$tree/tmp"
mount -t tmpfs tmpfs "$tree/run"
exec chroot "$tree" env -i PATH=/usr/sbin:/usr/bin HOME=/root "$@"
"""


def tools_tree(tree: Path, mirror: str) -> None:
    run(["mmdebstrap", "--mode=root", "--variant=apt", f"--include={','.join(TOOLS)}", "trixie", tree, mirror])


def in_tree(tree: Path, argv: list[str]) -> None:
    run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", ENTER_TREE, "sh", tree, *argv])


def build(tree: Path, mirror: str) -> tuple[float, Path]:
    """mkosi's cold build of its image (it downloads every package itself, as rastOS's cold build
    does): its time, and the image's path on the host."""
    (tree / OUTPUT.lstrip("/")).mkdir(parents=True)
    started = time.monotonic()
    in_tree(
        tree,
        [
            "mkosi", "--directory", OUTPUT, "--output-directory", OUTPUT,
            # One repository, the suite's main, as rastOS's build has: with --mirror, mkosi adds
            # the security, updates and debug suites, and the registry here refuses trixie-debug.
            "--local-mirror", mirror,
            "--distribution", "debian", "--release", "trixie", "--format", "disk",
            "--package", ",".join(PACKAGES),
            "build",
        ],
    )  # fmt: skip
    return time.monotonic() - started, tree / OUTPUT.lstrip("/") / "image.raw"


def boot_argv(image: Path, *, accel: str, cpus: int, memory: str, firmware: Firmware, vars_file: Path) -> list[str]:
    """QEMU for mkosi's image: the machine rastOS's image boots on (imagebuilder.vm.qemu_argv), less
    rastOS's status port and watchdog, which mkosi's image has nothing for."""
    extra = CMDLINE_EXTRA.replace(",", ",,")
    return [
        "qemu-system-x86_64", *MACHINE, *accelerator_args(accel), "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        *firmware_args(firmware, vars_file),
        "-drive", f"if=none,id=root,file={image},format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root,bootindex=0",
        "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        *credential_args(CREDENTIALS),
        # mkosi's image boots a Type #1 entry through systemd-boot, which reads this one; the stub's
        # is for a UKI, should mkosi make one.
        "-smbios", f"type=11,value=io.systemd.boot.kernel-cmdline-extra={extra}",
        "-smbios", f"type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}",
    ]  # fmt: skip
