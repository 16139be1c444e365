"""mkosi's image of Debian trixie, built and booted on this machine: the other builder the image
benchmark sets rastOS beside, measured in the same run.

The image is the smallest bootable one mkosi makes of Debian (systemd, udev, dbus, systemd-boot, a
kernel; `--format disk`), with mkosi's defaults for everything else. It boots on the machine rastOS's
image boots on (imagebuilder.vm.machine_args) and is given what `mkosi qemu` gives it: the firstboot
credentials (without them systemd-firstboot waits for a key) and mkosi's kernel command line extras,
with the console on the serial port the bench reads instead of virtio's hvc0.

mkosi is not installed on the host. Trixie's mkosi needs trixie's tools, and bookworm-backports'
would upgrade the host's systemd, which tests/test_units_security.py rates our units with. So the
bench bootstraps a trixie tree holding mkosi and the tools it calls (a plain mmdebstrap, not mkosi's
own `ToolsTree=default`, and not counted in mkosi's build time) and runs mkosi chrooted in it, in a
mount namespace of its own: nothing is mounted on the host, and whatever mkosi mounts goes with the
namespace when it ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from imagebuilder.vm import DEFAULT_MEMORY, QEMU, Firmware, credential_args, default_cpus, machine_args
from rastos.process import run

TOOLS = (
    "mkosi", "systemd", "systemd-repart", "systemd-boot-efi", "systemd-ukify", "bubblewrap", "apt",
    "debian-archive-keyring", "dosfstools", "mtools", "e2fsprogs", "btrfs-progs", "squashfs-tools",
    "cpio", "zstd", "xz-utils", "kmod", "python3", "ca-certificates", "util-linux", "fdisk",
)  # fmt: skip
# mkosi's documentation boots Fedora's systemd-udev, systemd-boot and kernel-core. Debian's names
# differ, and its systemd only recommends a system bus, which mkosi (WithRecommends=no by default)
# leaves out: dbus is named, as rastOS's image has one.
PACKAGES = ("systemd", "systemd-boot", "linux-image-amd64", "udev", "dbus")
CREDENTIALS = (("firstboot.locale", "C.UTF-8"), ("firstboot.timezone", "UTC"))
# mkosi/qemu.py's finalize_kernel_command_line_extra() for a guest with no settings of its own, less
# the terminal's size and type, and with ttyS0 for hvc0.
CMDLINE_EXTRA = (
    "rw", "systemd.wants=network.target", "module_blacklist=vmw_vmci",
    "ip=enc0:any", "ip=enp0s1:any", "ip=enp0s2:any", "ip=host0:any", "ip=none",
    "loglevel=4", "SYSTEMD_SULOGIN_FORCE=1", "console=ttyS0",
)  # fmt: skip
# mkosi hands these to apt; the chroot's environment is otherwise empty.
PASSED_ENVIRONMENT = ("http_proxy", "https_proxy", "no_proxy")
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
exec chroot "$tree" "$@"
"""


def tools_tree(tree: Path, mirror: str) -> None:
    run(["mmdebstrap", "--mode=root", "--variant=apt", f"--include={','.join(TOOLS)}", "trixie", tree, mirror])


def in_tree(tree: Path, argv: list[str]) -> None:
    passed = [f"{name}={os.environ[name]}" for name in PASSED_ENVIRONMENT if name in os.environ]
    environment = ["env", "-i", "PATH=/usr/sbin:/usr/bin", "HOME=/root", *passed]
    namespace = ["unshare", "--mount", "--propagation", "private", "--fork"]
    run([*namespace, "sh", "-c", ENTER_TREE, "sh", tree, *environment, *argv])


def build(tree: Path, mirror: str) -> tuple[float, Path]:
    """mkosi's cold build of its image (it downloads every package itself, as rastOS's cold build
    does): its time, and the image's path on the host."""
    output = tree / OUTPUT.lstrip("/")
    output.mkdir(parents=True)
    started = time.monotonic()
    in_tree(
        tree,
        [
            "mkosi", "--directory", OUTPUT, "--output-directory", OUTPUT,
            # One repository, the suite's main, as rastOS's build has. Without it mkosi adds the
            # updates suite and, from their fixed hosts, security and debug, and the registry here
            # refuses trixie-debug. mkosi trusts a local mirror without checking its signature,
            # which rastOS's build does check: a little less work on mkosi's side.
            "--local-mirror", mirror,
            "--distribution", "debian", "--release", "trixie", "--format", "disk",
            "--package", ",".join(PACKAGES),
            "build",
        ],
    )  # fmt: skip
    return time.monotonic() - started, output / "image.raw"


def boot_argv(image: Path, *, accel: str, firmware: Firmware, vars_file: Path) -> list[str]:
    """QEMU for mkosi's image. Beside rastOS's (imagebuilder.vm.qemu_argv), the differences: a raw
    image rather than a qcow2, no discard, and none of rastOS's status port, QMP socket or watchdog,
    which mkosi's image has no use for."""
    extra = " ".join(CMDLINE_EXTRA).replace(",", ",,")
    return [
        QEMU,
        *machine_args(accel=accel, cpus=default_cpus(), memory=DEFAULT_MEMORY, firmware=firmware, vars_file=vars_file),
        "-serial", "stdio",
        "-drive", f"if=none,id=root,file={image},format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root,bootindex=0",
        "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        *credential_args(CREDENTIALS),
        # mkosi's image boots a Type #1 entry, through systemd-boot, which reads this one; the stub's
        # is for a UKI, should mkosi make one.
        "-smbios", f"type=11,value=io.systemd.boot.kernel-cmdline-extra={extra}",
        "-smbios", f"type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}",
    ]  # fmt: skip
