"""rastosd's configuration: /etc/rastos/daemon.toml, then command-line overrides (the test seams).

Every key is consumed; an unknown key or a wrong type is an error naming it, never a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rastos.errors import RastosError

DEFAULT_CONFIG = Path("/etc/rastos/daemon.toml")
IMAGE_INFO = Path("/etc/rastos/image.json")


@dataclass(frozen=True)
class DaemonConfig:
    root: Path = Path("/")  # the root subvolume the ops change and the snapshots copy
    snapshots_dir: Path | None = None  # default: ROOT/.snapshots
    state_dir: Path = Path("/var/lib/rastos")
    esp: Path = Path("/efi")
    admin_group: str = "rastos"  # members may call mutating methods, as root may
    keep_pairs: int = 10  # pre/post snapshot pairs kept by retention
    boot_tries: int = 3  # tries a rollback entry gets
    bus_address: str | None = None  # default: the system bus
    booted_entry: str | None = None  # test seam: the entry systemd-boot selected (default: its EFI variable)
    critical_units: tuple[str, ...] = ()  # a boot with one of these failed is not good (health check)
    kernel_cmdline: str | None = None  # test seam: this boot's kernel command line (default: /proc/cmdline)
    # ws:// or wss:// URLs of the hub's agent socket, one per hub process, tried in order; (): no hub
    hub_urls: tuple[str, ...] = ()
    hub_token_file: Path = Path("/etc/rastos/hub-token")  # this host's token (rastos-hub host add)
    hub_ca: Path | None = None  # the CA a wss:// hub's certificate must chain to; None: the system's store
    # Test seam: the scratch root's kernel and services are the ones beside the daemon (a test runs it
    # in network and UTS namespaces of its own), so runtime actions (nft, sysctl) are made. None: root is /.
    root_runtime: bool | None = None
    updates_dir: Path | None = None  # where bundles are downloaded; default: STATE_DIR/updates
    update_keys_dir: Path = Path("/etc/rastos/update-keys.d")  # the keys a bundle's signature may be by
    config_file: Path = DEFAULT_CONFIG  # the file these came from (or would have): Hub.Join writes [hub] there

    def boot_cmdline(self) -> str:
        if self.kernel_cmdline is not None:
            return self.kernel_cmdline
        try:
            return Path("/proc/cmdline").read_text()
        except OSError:
            return ""

    @property
    def hub_url(self) -> str | None:
        """The first hub URL; None: no hub."""
        return self.hub_urls[0] if self.hub_urls else None

    @property
    def snapshot_directory(self) -> Path:
        return self.snapshots_dir if self.snapshots_dir is not None else self.root / ".snapshots"

    @property
    def download_directory(self) -> Path:
        return self.updates_dir if self.updates_dir is not None else self.state_dir / "updates"

    @property
    def database(self) -> Path:
        return self.state_dir / "state.db"


# file key -> (field, type, check)
_KEYS: dict[str, tuple[str, type]] = {
    "access.admin_group": ("admin_group", str),
    "snapshots.keep_pairs": ("keep_pairs", int),
    "boot.tries": ("boot_tries", int),
    "boot.esp": ("esp", Path),
    "paths.root": ("root", Path),
    "paths.state_dir": ("state_dir", Path),
    "paths.snapshots_dir": ("snapshots_dir", Path),
    "health.critical_units": ("critical_units", tuple),
    "hub.url": ("hub_urls", list),
    "hub.token_file": ("hub_token_file", Path),
    "hub.ca": ("hub_ca", Path),
    "updates.directory": ("updates_dir", Path),
    "updates.keys_dir": ("update_keys_dir", Path),
}


def load_config(path: Path | None) -> DaemonConfig:
    source = path if path is not None else DEFAULT_CONFIG
    if path is None and not source.exists():
        return DaemonConfig(boot_tries=_image_boot_tries())
    try:
        text = source.read_text()
    except OSError as error:
        raise RastosError(f"{source}: cannot read the daemon configuration: {error}") from None
    return parse_config(text, source)


def parse_config(text: str, source: Path) -> DaemonConfig:
    """The configuration `text` (the file `source`) says, over the defaults; RastosError naming the key."""
    # Imported here, where there is a file to read: most hosts have none, and under emulation each
    # module is tens of milliseconds of rastosd's start at boot.
    import tomllib

    from rastos.hub_settings import HubUrlProblem, hub_urls

    config = DaemonConfig(boot_tries=_image_boot_tries(), config_file=source)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RastosError(f"{source}: cannot read the daemon configuration: {error}") from None
    changes: dict[str, Any] = {}
    for key, value in _flatten(document):
        if key not in _KEYS:
            raise RastosError(f"{source}: unknown key {key!r}", hint=f"known keys: {', '.join(_KEYS)}")
        field, kind = _KEYS[key]
        if kind is list:  # hub.url: one URL or a list of them
            try:
                value = hub_urls(value)
            except HubUrlProblem as problem:
                raise RastosError(f"{source}: {key}{problem.at} {problem.problem}") from None
        elif kind is tuple:
            if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                raise RastosError(f"{source}: {key} must be a list of unit names, got {value!r}")
            value = tuple(value)
        elif kind is Path:
            if not isinstance(value, str) or not value.startswith("/"):
                raise RastosError(f"{source}: {key} must be an absolute path, got {value!r}")
            value = Path(value)
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise RastosError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
        changes[field] = value
    config = replace(config, **changes)
    if config.hub_ca is not None and config.hub_url is not None and not config.hub_url.startswith("wss://"):
        raise RastosError(f"{source}: hub.ca needs a wss:// hub.url (TLS), got {config.hub_url!r}")
    if config.keep_pairs < 1 or not 1 <= config.boot_tries <= 9:
        raise RastosError(f"{source}: snapshots.keep_pairs must be >= 1 and boot.tries between 1 and 9")
    return config


def _flatten(document: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in document.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _image_boot_tries() -> int:
    """The image profile's boot.tries, recorded by the image builder."""
    try:
        tries = json.loads(IMAGE_INFO.read_text()).get("boot_tries", 3)
    except (OSError, ValueError):
        return 3
    return tries if isinstance(tries, int) and 1 <= tries <= 9 else 3
