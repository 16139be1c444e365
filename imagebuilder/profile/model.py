"""The resolved image profile: frozen dataclasses, one per TOML table.

Each field's metadata can carry:
  - "help":   one line shown by `rastos-image show --explain` and in docs/profiles.md;
  - "parse":  a pure function turning the TOML value into the field's value (sizes, for example);
  - "check":  a pure function returning an error message for an impossible value, or None;
  - "merge":  "append" when a child profile adds to its parent's list instead of replacing it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ops import get_op
from ops.errors import InvalidParams
from ops.params import check_param
from rastos.bundle import VERSION
from rastos.hub_settings import HubUrlProblem, hub_urls

MiB = 1024 * 1024
GiB = 1024 * MiB


class DistributionName(StrEnum):
    debian = "debian"
    arch = "arch"


class ImageFormat(StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


class InitramfsModules(StrEnum):
    # Only the drivers a QEMU guest needs to find its root: a small initramfs, quick to unpack.
    virtio = "virtio"
    # Every storage driver Debian knows: boots on real hardware too.
    generic = "generic"


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(value: object) -> int:
    """A size in bytes from an integer or a string such as "4G", "512M" or "300MiB"."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "4G" or "512M"')
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise ValueError(f'expected a size such as "4G" or "512M", got {value!r}')


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


# What rastos.bundle.VERSION allows, in words: a version names the bundle file and the host's deployment.
VERSION_RULE = "is not a valid image version: up to 64 letters, digits and . _ + ~ -, a letter or digit first"
_SUBVOLUME = re.compile(r"^@[A-Za-z0-9_.-]*$")
# Debian's (policy 5.6.7, with :arch) and Arch's (also _ and @); load.py refuses _ and @ for Debian.
_PACKAGE = re.compile(r"^[a-z0-9@_][a-z0-9@_+.-]+(:[a-z0-9]+)?$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a pacman.conf section name
_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNIT = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|socket|timer|target|path|mount|automount|swap|slice)$")
_GENERATOR = re.compile(r"^[a-z0-9][a-z0-9-]*-generator$")


def _check_all(pattern: re.Pattern[str], what: str) -> Any:
    def check(values: tuple[str, ...]) -> str | None:
        bad = [v for v in values if not pattern.match(v)]
        return f"not a valid {what}: {', '.join(map(repr, bad))}" if bad else None

    return check


def _check_one(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str | None:
        return None if pattern.match(value) else f"not a valid {what}: {value!r}"

    return check


class KeyProblem(Exception):
    """A check's finding below the key it checks (`suffix`: "[2]", ".vm.swappiness")."""

    def __init__(self, suffix: str, problem: str) -> None:
        super().__init__(problem)
        self.suffix = suffix
        self.problem = problem


def _op_param(op: str, name: str, as_param: Any = None) -> Any:
    """A check that is the op's own for its param `name`: a profile key that is an op's param is
    refused in the op's words, at the key (and item) that holds the value."""

    def check(value: Any) -> str | None:
        if value is None:
            return None
        try:
            check_param(get_op(op).schema, name, as_param(value) if as_param else value, "")
        except InvalidParams as error:
            raise KeyProblem(error.field, str(error).removeprefix(f"{error.field}: ")) from None
        return None

    return check


def _meta(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class DistributionConfig:
    name: DistributionName = field(default=DistributionName.debian, metadata=_meta("package-based distribution"))
    # Arch: suite and components are Debian's, repositories Arch's; load.py refuses the other
    # distribution's keys and fills Arch's defaults (mirror, repositories, kernel package).
    suite: str = field(default="trixie", metadata=_meta("Debian release to install, e.g. trixie ('' for Arch)"))
    mirror: str = field(
        default="http://deb.debian.org/debian",
        metadata=_meta(
            "package repository URL (for Arch a pacman Server URL with $repo and $arch)",
            check=lambda v: None if re.match(r"^(https?|file)://", v) else f"not a URL: {v!r}",
        ),
    )
    components: tuple[str, ...] = field(default=("main",), metadata=_meta("Debian archive components"))
    repositories: tuple[str, ...] = field(
        default=(),
        metadata=_meta('Arch repositories, default ["core", "extra"]', check=_check_all(_REPO, "repository name")),
    )
    check_signatures: bool = field(
        default=True,
        metadata=_meta("Arch: check every package's signature against the build host's pacman keyring"),
    )
    keyring: str = field(
        default="/etc/pacman.d/gnupg",
        metadata=_meta(
            "Arch: that keyring (pacman-key --gpgdir), e.g. one that trusts your own repository's key",
            check=lambda v: None if v.startswith("/") else f"not an absolute path: {v!r}",
        ),
    )
    architecture: str = field(
        default="amd64",
        metadata=_meta(
            "CPU architecture",
            check=lambda v: None if v == "amd64" else f"only amd64 is supported, not {v!r}",
        ),
    )


@dataclass(frozen=True)
class PackagesConfig:
    include: tuple[str, ...] = field(
        default=(),
        metadata=_meta("packages to install", merge="append", check=_check_all(_PACKAGE, "package name")),
    )
    docs: bool = field(default=True, metadata=_meta("keep /usr/share/doc, man pages and translations"))


@dataclass(frozen=True)
class KernelConfig:
    package: str = field(
        default="linux-image-amd64",
        metadata=_meta("distribution kernel package", check=_check_one(_PACKAGE, "package name")),
    )
    cmdline: tuple[str, ...] = field(default=(), metadata=_meta("kernel command line arguments", merge="append"))
    sysctl: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_meta(
            "sysctl settings: the sysctl op's `settings`, written by it to /etc/sysctl.d/90-rastos.conf",
            merge="append",
            check=_op_param("sysctl", "settings", dict),
        ),
    )
    blacklist: tuple[str, ...] = field(
        default=(),
        metadata=_meta("kernel modules that must never load", merge="append", check=_check_all(_MODULE, "module name")),
    )
    initramfs: InitramfsModules = field(
        default=InitramfsModules.virtio,
        metadata=_meta("drivers in the initramfs: 'virtio' (VMs, small) or 'generic' (hardware)"),
    )
    build: str = field(
        default="",
        metadata=_meta(
            "a kernel profile (profiles/kernel/) built from the suite's linux-source and installed instead of "
            "`package`; empty: the distribution's kernel",
            check=lambda v: None if v == "" or re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", v) else f"not a name: {v!r}",
        ),
    )
    features: tuple[str, ...] = field(
        default=(),
        metadata=_meta('optional parts of the kernel profile to build in, e.g. ["kasan"] (with `build`)'),
    )


@dataclass(frozen=True)
class UserConfig:
    """An account, made by the user op with these of its params (docs/profiles.md); the password
    hash, which no op sets, is the image builder's own."""

    name: str = field(default="", metadata=_meta("login name", check=_op_param("user", "name")))
    uid: int | None = field(
        default=None, metadata=_meta("numeric user id (chosen by useradd when absent)", check=_op_param("user", "uid"))
    )
    groups: tuple[str, ...] = field(
        default=(), metadata=_meta("supplementary groups", check=_op_param("user", "groups", list))
    )
    shell: str = field(default="/bin/bash", metadata=_meta("login shell", check=_op_param("user", "shell")))
    sudo: bool = field(default=False, metadata=_meta("may use sudo (adds the package sudo)"))
    sudo_nopasswd: bool | None = field(
        default=None,
        metadata=_meta("sudo without the password (absent: so when the user has no password, keys alone)"),
    )
    authorized_keys: tuple[str, ...] = field(
        default=(),
        metadata=_meta("authorized ssh public keys", check=_op_param("user", "authorized_keys", list)),
    )
    ssh_keys: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "deprecated spelling of authorized_keys (the user op's name)",
            check=_op_param("user", "authorized_keys", list),
            deprecated="authorized_keys",
        ),
    )
    password_hash: str | None = field(
        default=None,
        metadata=_meta(
            "crypt(3) hash; absent means the password is locked (ssh keys only)",
            check=lambda v: (
                None
                if v is None or v.startswith("$") or v == ""
                else "must be a crypt(3) hash starting with '$' (or empty for no password)"
            ),
        ),
    )

    @property
    def keys(self) -> tuple[str, ...]:
        return self.authorized_keys + tuple(key for key in self.ssh_keys if key not in self.authorized_keys)

    def op_params(self) -> dict[str, Any]:
        """The user op's params for this account."""
        params: dict[str, Any] = {"name": self.name, "groups": list(self.groups), "authorized_keys": list(self.keys)}
        params["shell"] = self.shell
        if self.uid is not None:
            params["uid"] = self.uid
        if self.sudo:
            nopasswd = self.sudo_nopasswd if self.sudo_nopasswd is not None else not self.password_hash
            params |= {"sudo": True, "sudo_nopasswd": nopasswd}
        return params


@dataclass(frozen=True)
class SystemConfig:
    hostname: str = field(
        default="rastos", metadata=_meta("host name, set by the hostname op", check=_op_param("hostname", "hostname"))
    )
    timezone: str = field(default="UTC", metadata=_meta("time zone, e.g. Europe/Berlin"))
    autologin: bool = field(default=False, metadata=_meta("log root in on the serial console without a password"))
    enable: tuple[str, ...] = field(
        default=(), metadata=_meta("systemd units to enable", merge="append", check=_check_all(_UNIT, "unit name"))
    )
    mask: tuple[str, ...] = field(
        default=(), metadata=_meta("systemd units to mask", merge="append", check=_check_all(_UNIT, "unit name"))
    )
    skip_generators: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "systemd generators not to run at boot (file names in /usr/lib/systemd/system-generators)",
            merge="append",
            check=_check_all(_GENERATOR, "generator name"),
        ),
    )
    desired_state: str = field(
        default="",
        metadata=_meta(
            "a rastos.toml (desired state per op; path relative to the profile's file) the image is built to "
            "and ships as /etc/rastos/rastos.toml, for `rastosctl apply-config` on the host"
        ),
    )


@dataclass(frozen=True)
class DiskConfig:
    size: int = field(
        default=4 * GiB,
        metadata=_meta(
            "whole disk size",
            parse=parse_size,
            check=lambda v: None if v >= 512 * MiB else "must be at least 512M",
        ),
    )
    esp_size: int = field(
        default=256 * MiB,
        metadata=_meta(
            "EFI system partition size (holds a kernel and initrd per bootable deployment)",
            parse=parse_size,
            check=lambda v: None if 64 * MiB <= v <= 4 * GiB else "must be between 64M and 4G",
        ),
    )
    formats: tuple[ImageFormat, ...] = field(
        default=(ImageFormat.qcow2,),
        metadata=_meta("output formats: raw, qcow2", check=lambda v: None if v else "must not be empty"),
    )


def _subvolume(default: str, help: str) -> Any:
    return field(
        default=default,
        metadata=_meta(help, check=_check_one(_SUBVOLUME, "subvolume name (must start with @)")),
    )


@dataclass(frozen=True)
class BtrfsConfig:
    root: str = _subvolume("@", "subvolume of the first deployment's root")
    snapshots: str = _subvolume("@snapshots", "subvolume holding snapshots, at /.snapshots")
    home: str = _subvolume("@home", "subvolume for /home (never rolled back)")
    var_log: str = _subvolume("@var_log", "subvolume for /var/log (never rolled back)")
    state: str = _subvolume("@rastos", "subvolume for the daemon's state, /var/lib/rastos (never rolled back)")
    compression: str = field(
        default="zstd:1",
        metadata=_meta(
            "mount-time compression ('' for none)",
            check=lambda v: None if re.match(r"^((zstd|zlib)(:\d+)?|lzo|)$", v) else f"unknown compression {v!r}",
        ),
    )

    def layout(self) -> list[tuple[str, str]]:
        """(subvolume, mount point) pairs, the root first; names may repeat in an invalid profile."""
        return [
            (self.root, "/"),
            (self.snapshots, "/.snapshots"),
            (self.home, "/home"),
            (self.var_log, "/var/log"),
            (self.state, "/var/lib/rastos"),
        ]


@dataclass(frozen=True)
class BootConfig:
    tries: int = field(
        default=3,
        metadata=_meta(
            "boot attempts of a new entry before falling back (0 turns boot counting off)",
            check=lambda v: None if 0 <= v <= 9 else "must be between 0 and 9",
        ),
    )
    menu_timeout: int = field(
        default=0,
        metadata=_meta(
            "seconds the boot menu waits (0: hidden, shown while a key is held)",
            check=lambda v: None if 0 <= v <= 60 else "must be between 0 and 60",
        ),
    )
    watchdog: int = field(
        default=30,
        metadata=_meta(
            "seconds without a ping before the hardware watchdog resets a hung system (0: off)",
            check=lambda v: None if v == 0 or 10 <= v <= 600 else "must be 0 (off) or between 10 and 600",
        ),
    )
    console: str = field(
        default="ttyS0",
        metadata=_meta(
            "serial console device ('' for none)",
            check=lambda v: None if re.match(r"^(ttyS\d+|hvc\d+|)$", v) else f"not a console device: {v!r}",
        ),
    )


HUB_CA_IN_IMAGE = "/etc/rastos/hub-ca.pem"
_HUB_URL = re.compile(r"^wss?://[A-Za-z0-9.:\[\]-]+(:\d+)?(/[A-Za-z0-9._~/-]*)?$")


def parse_hub_urls(value: object) -> tuple[str, ...]:
    """hub.url: '' or [] (no hub), one URL, or a list of them (the processes of one hub, tried in order)."""
    if value in ("", []):
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(url, str) for url in value):
        return tuple(value)
    raise ValueError("expected a URL or a list of URLs")


def _check_hub_urls(urls: tuple[str, ...]) -> str | None:
    def at(index: int) -> str:
        return f"[{index}]" if len(urls) > 1 else ""

    for index, url in enumerate(urls):
        if not _HUB_URL.match(url):
            raise KeyProblem(at(index), f"not a ws:// or wss:// URL: {url!r}")
    if not urls:
        return None
    try:
        hub_urls(list(urls))  # all of one scheme, as rastosd checks them
    except HubUrlProblem as problem:
        raise KeyProblem(problem.at if len(urls) > 1 else "", problem.problem) from None
    return None


@dataclass(frozen=True)
class HubConfig:
    url: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "ws:// or wss:// URL of the hub's agent socket ('' for none), or a list of them, one per process of "
            "a hub on one database, all ws:// or all wss://: the host fails over between them in order; the "
            "host's token is not baked in: give it as the credential rastos.hub.token or in /etc/rastos/hub-token",
            parse=parse_hub_urls,
            check=_check_hub_urls,
        ),
    )
    ca: str = field(
        default="",
        metadata=_meta(
            "a PEM file (path relative to the profile's file) of the CA a wss:// hub's certificate chains to, "
            f"shipped as {HUB_CA_IN_IMAGE} for rastosd's hub.ca ('': the system's CA store)"
        ),
    )


@dataclass(frozen=True)
class HubServerConfig:
    enable: bool = field(
        default=False,
        metadata=_meta(
            "make the image a fleet hub appliance: rastos-hub as rastos-hub.service (units/hub/), on a local "
            "PostgreSQL database from the distribution, backed up each night; serves on 127.0.0.1:8470 until "
            "/etc/rastos-hub/hub.env says otherwise (Debian only)"
        ),
    )
    # The appliance's state lives outside its root, as the daemon's does on @rastos: an image update
    # makes a new root, and a rollback goes back to an old one, while the fleet's database must stay.
    database: str = _subvolume(
        "@postgresql", "subvolume for PostgreSQL's clusters, /var/lib/postgresql (kept across updates and rollbacks)"
    )
    state: str = _subvolume(
        "@rastos-hub", "subvolume for the hub's state, /var/lib/rastos-hub (kept across updates and rollbacks)"
    )

    def layout(self) -> list[tuple[str, str]]:
        """(subvolume, mount point) pairs of the appliance's state; none unless the image is one."""
        return [(self.database, "/var/lib/postgresql"), (self.state, "/var/lib/rastos-hub")] if self.enable else []


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = field(default="", metadata=_meta("one line shown by `rastos-image profiles`"))
    extends: str | None = field(default=None, metadata=_meta("profile this one builds on"))
    version: str = field(
        default="",
        metadata=_meta(
            "the image's version, in its bundle's name and /usr/lib/rastos/image.json ('': the build's UTC time, "
            "YYYYMMDD.HHMMSS); `rastos-image build --image-version` overrides it",
            check=lambda v: None if v == "" or VERSION.match(v) else f"{v!r} {VERSION_RULE}",
        ),
    )
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    packages: PackagesConfig = field(default_factory=PackagesConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    users: tuple[UserConfig, ...] = field(default=(), metadata=_meta("user accounts", merge="append"))
    disk: DiskConfig = field(default_factory=DiskConfig)
    btrfs: BtrfsConfig = field(default_factory=BtrfsConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    hub_server: HubServerConfig = field(default_factory=HubServerConfig)
    sources: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def layout(self) -> list[tuple[str, str]]:
        """Every (subvolume, mount point) of the image, the root first; names may repeat in an invalid profile."""
        return self.btrfs.layout() + self.hub_server.layout()

    def subvolumes(self) -> dict[str, str]:
        """Subvolume name -> where it is mounted. The root comes first."""
        return dict(self.layout())
