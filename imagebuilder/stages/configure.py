"""Stage `configure`: turn the bootstrapped tree into this profile's system.

The host settings an op manages (host name, sysctl, accounts with their keys and sudo rights) are set
by those ops (profile/host.py, ops/steps.py), exactly as rastosd would set them on a running host.
The rest is this stage's own, what no op does: time zone, fstab by UUID for the btrfs subvolumes and
the ESP, the module blacklist, networking, password hashes, console autologin, units to enable or
mask. Files are written from the host; programs that must run inside the image (chpasswd, systemctl)
run there through bubblewrap.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from imagebuilder.chroot import chroot_run
from imagebuilder.context import BuildContext
from imagebuilder.files import write_file
from imagebuilder.profile.host import host_steps
from imagebuilder.profile.model import HUB_CA_IN_IMAGE, InitramfsModules, Profile
from ops.errors import OpFailed
from ops.steps import checked_steps, run_step
from ops.target import Target
from rastos.errors import RastosError

log = logging.getLogger("rastos.build.configure")


def configure(ctx: BuildContext) -> str:
    root, profile = ctx.rootfs, ctx.profile
    write_base_hosts(root)
    changed = apply_host_settings(root, profile)
    write_timezone(root, profile.system.timezone)
    write_file(root / "etc/fstab", fstab(ctx))
    write_kernel_tuning(root, profile)
    write_watchdog(root, profile)
    write_daemon_config(root, profile)
    write_network(root)
    if profile.system.autologin and profile.boot.console:
        write_autologin(root, profile.boot.console)
    for user in profile.users:
        if user.password_hash is not None:
            chroot_run(root, ["chpasswd", "--encrypted"], input=f"{user.name}:{user.password_hash}\n")
    units = apply_units(root, profile)
    mark_updated(root)
    return f"{changed} host settings by their ops, {len(profile.users)} users, {units} units enabled or masked"


def write_base_hosts(root: Path) -> None:
    """localhost's lines, where the tree has no /etc/hosts; the hostname op adds the host's own."""
    if not (root / "etc/hosts").exists():
        write_file(
            root / "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
        )


def apply_host_settings(root: Path, profile: Profile) -> int:
    """The profile's host settings, each by its op on the image's tree; how many changed it."""
    target = Target(root, runtime=False)
    changed = 0
    for step in checked_steps(host_steps(profile)):
        step.op.check(target, step.params)  # what only the image can tell (a group exists in it)
        try:
            plan = run_step(step, target, functools.partial(_log, step.op.name))
        except OpFailed as error:
            raise RastosError(f"profile {profile.name}: the {step.op.name} op failed in the image: {error}") from None
        changed += bool(plan.actions)
    return changed


def _log(op: str, line: str) -> None:
    log.info("%s: %s", op, line)


def write_timezone(root: Path, timezone: str) -> None:
    zone = Path("/usr/share/zoneinfo") / timezone
    localtime = root / "etc/localtime"
    if not (root / zone.relative_to("/")).exists():
        if timezone == "UTC":
            # Without tzdata the system clock is UTC anyway; there is nothing to link to.
            localtime.unlink(missing_ok=True)
            return
        raise RastosError(
            f"time zone {timezone!r} is not in the image's /usr/share/zoneinfo",
            hint="add 'tzdata' to packages.include, or check the zone's spelling",
        )
    localtime.unlink(missing_ok=True)
    localtime.symlink_to(Path("..") / zone.relative_to("/"))
    write_file(root / "etc/timezone", timezone + "\n")


def fstab(ctx: BuildContext) -> str:
    btrfs = ctx.profile.btrfs
    uuid = ctx.ids.root_fs_uuid
    options = "noatime" + (f",compress={btrfs.compression}" if btrfs.compression else "")
    lines = [
        "# Written by rastos-image. The root subvolume is chosen by the boot entry",
        "# (rootflags=subvol=...), so / names none here: any deployment or snapshot can boot.",
        f"UUID={uuid}\t/\tbtrfs\t{options}\t0 0",
    ]
    for subvolume, mountpoint in ctx.profile.subvolumes().items():
        if mountpoint != "/":
            lines.append(f"UUID={uuid}\t{mountpoint}\tbtrfs\tsubvol=/{subvolume},{options}\t0 0")
    # The ESP is mounted on first use only: nothing at boot waits for it.
    lines.append(
        f"UUID={ctx.ids.esp_fs_uuid}\t/efi\tvfat\tumask=0077,noauto,x-systemd.automount,x-systemd.idle-timeout=60\t0 0"
    )
    return "\n".join(lines) + "\n"


def write_kernel_tuning(root: Path, profile: Profile) -> None:
    kernel = profile.kernel
    blacklist_file = root / "etc/modprobe.d/rastos-blacklist.conf"
    if kernel.blacklist:
        # `blacklist` only stops loading by alias; `install ... /bin/false` also stops explicit loads.
        body = "".join(f"blacklist {m}\ninstall {m} /bin/false\n" for m in kernel.blacklist)
        write_file(blacklist_file, f"# From profile {profile.name}\n{body}")


def write_watchdog(root: Path, profile: Profile) -> None:
    """systemd feeds the hardware watchdog (where the machine has one) while it runs; a kernel or
    PID 1 that hangs stops feeding it and the machine resets: the only way out of a hard hang with no
    one at the console. RebootWatchdogSec bounds a reboot that hangs on the way down."""
    if profile.boot.watchdog:
        write_file(
            root / "etc/systemd/system.conf.d/50-rastos-watchdog.conf",
            f"# From profile {profile.name} ([boot] watchdog)\n"
            f"[Manager]\nRuntimeWatchdogSec={profile.boot.watchdog}s\nRebootWatchdogSec=2min\n",
        )


def write_daemon_config(root: Path, profile: Profile) -> None:
    """rastosd's hub. The URL, and the CA its certificate chains to, are the same for a whole fleet
    and go into the image; each host's token does not (one image, many hosts): it comes as a
    credential at boot or in /etc/rastos."""
    if not profile.hub.url:
        return
    urls = profile.hub.url
    # One URL as before; several as a TOML list (json.dumps of a list of plain URLs is one).
    body = f"[hub]\nurl = {json.dumps(urls[0]) if len(urls) == 1 else json.dumps(list(urls))}\n"
    if profile.hub.ca:
        write_file(root / HUB_CA_IN_IMAGE.lstrip("/"), Path(profile.hub.ca).read_text())
        body += f'ca = "{HUB_CA_IN_IMAGE}"\n'
    write_file(root / "etc/rastos/daemon.toml", f"# From profile {profile.name} ([hub])\n{body}")


def write_network(root: Path) -> None:
    write_file(
        root / "etc/systemd/network/80-rastos-dhcp.network",
        "# Written by rastos-image: DHCP on every wired interface.\n"
        "[Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nUseDomains=yes\n",
    )


def write_autologin(root: Path, console: str) -> None:
    write_file(
        root / f"etc/systemd/system/serial-getty@{console}.service.d/autologin.conf",
        "[Service]\nExecStart=\n"
        "ExecStart=-/sbin/agetty -o '-f -- \\\\u' --noreset --noclear --keep-baud "
        "--autologin root 115200,57600,38400,9600 - $TERM\n",
    )


def apply_units(root: Path, profile: Profile) -> int:
    system = profile.system
    missing = [u for u in system.enable if not _unit_exists(root, u)]
    if missing:
        raise RastosError(
            f"profile {profile.name}: system.enable names units the image does not have: {', '.join(missing)}",
            hint="add the package that ships them to packages.include",
        )
    # No image has a display manager; graphical.target would only add a step to every boot.
    chroot_run(root, ["systemctl", "--root=/", "--quiet", "set-default", "multi-user.target"])
    if system.enable:
        chroot_run(root, ["systemctl", "--root=/", "--quiet", "enable", *system.enable])
    masked = (*system.mask, *implied_masks(profile))
    if masked:
        chroot_run(root, ["systemctl", "--root=/", "--quiet", "mask", *masked])
    skip_generators(root, profile)
    return len(system.enable) + len(masked) + len(system.skip_generators)


def implied_masks(profile: Profile) -> tuple[str, ...]:
    """Units the image's own parts make redundant. rastOS's initrd mounts / with the options fstab
    gives it (imagebuilder/initrd/init), so systemd's remount of / would change nothing; it is a
    process on the way to sysinit.target, about 0.3 s of each boot under emulation."""
    if profile.kernel.initramfs is InitramfsModules.virtio:
        return ("systemd-remount-fs.service",)
    return ()


GENERATORS = "usr/lib/systemd/system-generators"


def skip_generators(root: Path, profile: Profile) -> None:
    """A generator linked to /dev/null in /etc is not run, as systemd documents: each one is a process
    PID 1 waits for before it loads a unit, which costs a fraction of a second under emulation."""
    names = profile.system.skip_generators
    missing = [name for name in names if not (root / GENERATORS / name).exists()]
    if missing:
        raise RastosError(
            f"profile {profile.name}: system.skip_generators names generators the image does not have: "
            f"{', '.join(missing)}",
            hint=f"the image's generators are in /{GENERATORS}",
        )
    for name in names:
        link = root / "etc/systemd/system-generators" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _unit_exists(root: Path, unit: str) -> bool:
    dirs = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
    return any((root / d / unit).exists() for d in dirs)


def mark_updated(root: Path) -> None:
    """Tell systemd that /etc and /var are up to date with /usr.

    Units with ConditionNeedsUpdate= (ldconfig, hwdb and catalog rebuilds, systemd-update-done)
    compare /usr's modification time with these files; without them every first boot redoes work
    the build already did, which costs seconds in an emulated VM.
    """
    usr = (root / "usr").stat()
    for directory in ("etc", "var"):
        stamp = root / directory / ".updated"
        write_file(stamp, f"# Written by rastos-image\nTIMESTAMP_NSEC={usr.st_mtime_ns}\n")
        os.utime(stamp, ns=(usr.st_atime_ns, usr.st_mtime_ns))
