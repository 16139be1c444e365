"""Stage `install-rastos`: the project's own code, from this checkout, into the image.

The Python packages go to /usr/lib/rastos/python, a directory of our own that the /usr/bin wrappers put
first on sys.path: a top-level package named `daemon` in dist-packages would collide with Debian's
python3-daemon. Their dependencies come from the distribution (bootstrap stage; no pip inside an image).
Units, D-Bus policy, activation, sysusers and polkit files go where systemd, dbus and polkitd look, and
every unit with an [Install] section is enabled. The public half of the key the build signs its bundles with goes
into /etc/rastos/update-keys.d/: the image takes the updates signed by it.
"""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import chroot_run
from imagebuilder.context import BuildContext
from imagebuilder.files import write_file
from imagebuilder.stages.hub_server import install_hub_server
from rastos import __version__

PYTHON_PACKAGES = ("rastos", "ops", "daemon")
GUEST_FILES = CHECKOUT / "imagebuilder" / "guest"
SITE_PACKAGES = "usr/lib/rastos/python"
INTERFACE_XML = CHECKOUT / "daemon" / "bus" / "org.rastos.Daemon1.xml"
UPDATE_KEYS = "etc/rastos/update-keys.d"

# Where each kind of file in units/ belongs inside the image, and the suffix it gets there.
UNIT_DESTINATIONS = {
    ".service": ("usr/lib/systemd/system", ".service"),
    ".target": ("usr/lib/systemd/system", ".target"),
    ".timer": ("usr/lib/systemd/system", ".timer"),
    ".socket": ("usr/lib/systemd/system", ".socket"),
    ".path": ("usr/lib/systemd/system", ".path"),
    ".conf": ("usr/share/dbus-1/system.d", ".conf"),
    ".dbus-service": ("usr/share/dbus-1/system-services", ".service"),
    ".sysusers": ("usr/lib/sysusers.d", ".conf"),
    # polkit's actions and rules: read by polkitd where the profile installs it (Debian's polkitd),
    # inert files otherwise.
    ".policy": ("usr/share/polkit-1/actions", ".policy"),
    ".rules": ("usr/share/polkit-1/rules.d", ".rules"),
}

ENTRY_POINTS = {
    "rastosd": ("daemon.cli", "daemon_main"),
    "rastosctl": ("daemon.cli", "ctl_main"),
}
# The hub appliance's (hub_server.enable) only: no other image holds hub code.
HUB_PACKAGE = "hub"
HUB_ENTRY_POINTS = {"rastos-hub": ("hub.cli", "main")}


def install_rastos(ctx: BuildContext) -> str:
    root = ctx.rootfs
    install_python(root, PYTHON_PACKAGES, ENTRY_POINTS)
    for helper in sorted(GUEST_FILES.iterdir()):
        if helper.is_file():
            write_file(root / "usr/lib/rastos" / helper.name, helper.read_text(), mode=0o755)
    write_file(root / "usr/share/dbus-1/interfaces" / INTERFACE_XML.name, INTERFACE_XML.read_text())
    enabled = install_units(root, CHECKOUT / "units")
    # The admin group exists from the first boot on; sysusers would make it then, the policy needs it now.
    chroot_run(root, ["systemd-sysusers", "/usr/lib/sysusers.d/rastos.conf"])
    write_file(root / "etc/rastos/image.json", image_info(ctx))
    trust_signing_key(ctx)
    packages: tuple[str, ...] = PYTHON_PACKAGES
    if ctx.profile.hub_server.enable:
        packages += (HUB_PACKAGE,)
        install_python(root, (HUB_PACKAGE,), HUB_ENTRY_POINTS)
        enabled += install_units(root, CHECKOUT / "units" / "hub")
        install_hub_server(root)
    # Byte-compile now: the first start of the daemon on a slow VM should not pay for it.
    chroot_run(root, ["python3", "-m", "compileall", "-q", *[f"/{SITE_PACKAGES}/{p}" for p in packages]])
    write_file(root / READAHEAD_LIST, daemon_start_files(root))
    return f"rastos {__version__}, {len(enabled)} units enabled"


# What rastosd's start reads, for the initrd to read into the page cache while the early boot leaves a
# CPU idle (imagebuilder/initrd/init): the interpreter, its libraries, and every module imported.
READAHEAD_LIST = "usr/lib/rastos/readahead.list"
START_FILES = f"""
import os, sys
sys.path.insert(0, "/{SITE_PACKAGES}")
import daemon.cli, daemon.service
files = set()
for module in list(sys.modules.values()):
    spec = getattr(module, "__spec__", None)
    cached = getattr(spec, "cached", None)
    path = cached if cached and os.path.isfile(cached) else getattr(spec, "origin", None)
    if path and path.startswith("/") and os.path.isfile(path):
        files.add(path)
for line in open("/proc/self/maps"):
    fields = line.split()
    if len(fields) == 6 and fields[5].startswith("/") and os.path.isfile(fields[5]):
        files.add(fields[5])
print("\\n".join(sorted(files)))
"""


def daemon_start_files(root: Path) -> str:
    """The files rastosd's start reads, one path per line, relative to the root."""
    listed = chroot_run(root, ["python3", "-I", "-c", START_FILES], capture=True).stdout.split()
    return "".join(f"{path.lstrip('/')}\n" for path in listed)


def install_python(root: Path, packages: tuple[str, ...], entry_points: dict[str, tuple[str, str]]) -> None:
    for package in packages:
        target = root / SITE_PACKAGES / package
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CHECKOUT / package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name, (module, function) in entry_points.items():
        write_file(
            root / "usr/bin" / name,
            f"#!/usr/bin/python3 -I\nimport sys\nsys.path.insert(0, '/{SITE_PACKAGES}')\n"
            f"from {module} import {function}\nsys.exit({function}())\n",
            mode=0o755,
        )


def trust_signing_key(ctx: BuildContext) -> None:
    """The image takes the next bundles signed with the key this one is built with; rastosd trusts only
    root-owned files there that no one else may write (rastos.bundle.trusted_keys)."""
    if ctx.signing_key is None:
        return
    keys = ctx.rootfs / UPDATE_KEYS
    write_file(keys / f"{ctx.signing_key.id}.pub", ctx.signing_key.public_pem().decode())
    keys.chmod(0o755)


def install_units(root: Path, units_dir: Path) -> list[str]:
    enabled = []
    for source in sorted(units_dir.iterdir()):
        if source.is_dir() and source.name.endswith(".d"):  # a drop-in directory for a distribution unit
            for dropin in sorted(source.glob("*.conf")):
                write_file(root / "usr/lib/systemd/system" / source.name / dropin.name, dropin.read_text())
            continue
        if source.suffix not in UNIT_DESTINATIONS or not source.is_file():
            continue
        destination, suffix = UNIT_DESTINATIONS[source.suffix]
        write_file(root / destination / (source.stem + suffix), source.read_text())
        if destination.endswith("systemd/system") and _has_install_section(source):
            enabled.append(source.name)
    if enabled:
        chroot_run(root, ["systemctl", "--root=/", "--quiet", "enable", *enabled])
    return enabled


def _has_install_section(unit: Path) -> bool:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser.has_section("Install")


def image_info(ctx: BuildContext) -> str:
    """What the daemon reads to know which image and deployment it runs on."""
    return (
        json.dumps(
            {
                "profile": ctx.profile.name,
                "builder_version": __version__,
                "root_subvolume": ctx.profile.btrfs.root,
                "snapshots_subvolume": ctx.profile.btrfs.snapshots,
                "entry_id": ctx.entry_id,
                "boot_tries": ctx.profile.boot.tries,
            },
            indent=2,
        )
        + "\n"
    )
