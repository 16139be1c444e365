"""Hub.Join: this host told which hub to connect to, with its token (`rastos-hub host enrol`, or an
admin's `rastosctl hub join`).

Every argument is checked before anything is written (rastos/hub_settings.py), each refusal naming its
field and never repeating the token. Then, each file written atomically, root's, through the file
access that follows no link (ops/rootfs.py): the CA, when one is given, as hub-ca.pem beside
daemon.toml (/etc/rastos/hub-ca.pem); the token, mode 0600, where daemon.toml's hub.token_file says;
last daemon.toml itself, its [hub] url (and ca) changed and every other setting kept
(daemon/config_write.py). Without a CA, a wss:// hub keeps the ca the host has (an image may ship
one) and a ws:// hub drops it (a CA is for TLS only). What is written is what rastosd reads at its
next start too; the caller (core.py) starts the link on it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import DaemonConfig, parse_config
from daemon.config_write import with_hub_keys
from daemon.errors import DaemonError, HubCredentials, InvalidParams
from daemon.hub_link_settings import CREDENTIAL_CA, CREDENTIAL_TOKEN, CREDENTIAL_URL
from ops.rootfs import Root
from rastos.errors import RastosError
from rastos.hub_settings import CheckedCa, HubUrlProblem, check_agent_urls, check_ca, check_token

CA_NAME = "hub-ca.pem"  # beside daemon.toml: /etc/rastos/hub-ca.pem


@dataclass(frozen=True)
class Joined:
    """What Join wrote; as the caller and the event log see it (the token is not in it)."""

    url: str  # the hubs' URLs, separated by a space when there are several (as Join takes them)
    config_file: Path
    token_file: Path
    ca_file: Path | None  # what hub.ca names now; None: a wss:// hub is checked against the system's store
    ca: CheckedCa | None  # the certificates written, if a CA was given

    def as_json(self) -> dict[str, Any]:
        certificates = [] if self.ca is None else self.ca.certificates
        return {
            "url": self.url, "config_file": str(self.config_file), "token_file": str(self.token_file),
            "ca_file": None if self.ca_file is None else str(self.ca_file),
            "ca": [{"subject": c.subject, "sha256": c.sha256, "not_after": c.not_after} for c in certificates],
        }  # fmt: skip


def check_arguments(url: str, token: str, ca_pem: str) -> tuple[tuple[str, ...], CheckedCa | None]:
    """The hubs' URLs (`url` holds one, or several separated by whitespace, tried in that order) and the
    checked CA (None when none is given); InvalidParams naming the first bad argument."""
    try:
        urls = check_agent_urls(url)
    except HubUrlProblem as error:
        raise InvalidParams(f"url{error.at}", error.problem) from None
    try:
        check_token(token)
    except ValueError as error:
        raise InvalidParams("token", str(error)) from None
    if not ca_pem:
        return urls, None
    try:
        checked = check_ca(ca_pem)
    except ValueError as error:
        raise InvalidParams("ca_pem", str(error)) from None
    if not urls[0].startswith("wss://"):
        raise InvalidParams("ca_pem", "a CA is for a wss:// hub (TLS); the url is ws://: give none, or a wss:// url")
    return urls, checked


def refuse_credentials(credentials: Path | None) -> None:
    """Credentials given at boot come before daemon.toml and the token file: what Join writes would be
    ignored at the next start. Refused rather than undone unseen."""
    if credentials is None:
        return
    present = [name for name in (CREDENTIAL_URL, CREDENTIAL_TOKEN, CREDENTIAL_CA) if (credentials / name).exists()]
    if present:
        raise HubCredentials(
            f"this host takes its hub settings from the systemd credentials {' and '.join(present)}, which come "
            "before daemon.toml and the token file: remove them (rastos-image boot --credential, or the unit's "
            "LoadCredential=/SetCredential=), then join again; nothing was changed"
        )


def join(config: DaemonConfig, credentials: Path | None, url: str, token: str, ca_pem: str) -> Joined:
    """Check, then write the CA, the token and daemon.toml (module docstring). Not on the event loop:
    it reads and fsyncs files."""
    urls, ca = check_arguments(url, token, ca_pem)
    refuse_credentials(credentials)
    files = Root(Path("/"))
    source = config.config_file
    try:
        before = _read(files, source)
        token_file = parse_config(before, source).hub_token_file
        ca_file = source.parent / CA_NAME
        changes: dict[str, str | list[str] | None] = {"url": urls[0] if len(urls) == 1 else list(urls)}
        if ca is not None:
            changes["ca"] = str(ca_file)
        elif not urls[0].startswith("wss://"):
            changes["ca"] = None
        after = with_hub_keys(before, source, changes)
    except RastosError as error:  # daemon.toml was edited since rastosd started, and is not valid now
        raise DaemonError(f"{error.message}: fix it first; nothing was changed") from None
    if ca is not None:
        _write(files, ca_file, ca.pem, 0o644)
    _write(files, token_file, token + "\n", 0o600)
    _write(files, source, after, _mode_of(files, source))
    return Joined(" ".join(urls), source, token_file, parse_config(after, source).hub_ca, ca)


def _read(files: Root, path: Path) -> str:
    try:
        return files.read_text(str(path)) or ""
    except OSError as error:
        raise DaemonError(f"cannot read {path}: {error.strerror or error}; nothing was changed") from None


def _write(files: Root, path: Path, text: str, mode: int) -> None:
    try:
        files.write(str(path), text, mode)
    except OSError as error:
        raise DaemonError(f"cannot write {path}: {error.strerror or error}") from None


def _mode_of(files: Root, path: Path) -> int:
    status = files.lstat(str(path))
    return 0o644 if status is None else status.st_mode & 0o7777
