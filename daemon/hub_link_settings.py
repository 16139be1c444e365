"""What the hub link connects with: the hub's URLs, this host's token and the CA a wss:// hub is
verified against, from rastosd's configuration and the credentials the machine was given at boot.

Apart from daemon/hub_link.py so that rastosd's start, which only asks whether a hub is configured,
does not import the link itself (its protocol, jobs and actions): under emulation each module is
tens of milliseconds of a boot, and a host without a hub never needs the link at all.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rastosd.hub")

HUB_UID = 0  # jobs run for the hub are the daemon's own (the hub's admin is in the hub's event log)


@dataclass(frozen=True)
class HubSettings:
    url: str  # the first hub
    token: str
    ca: Path | None = None  # the CA file a wss:// hub's certificate must chain to; None: the system's store
    token_file: Path | None = None  # read again before each connect; None: `token` (a credential) stays
    others: tuple[str, ...] = ()  # more processes of the same hub (one database), tried after `url` in order

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.others)

    @property
    def verified_against(self) -> str:
        return f"hub.ca {self.ca}" if self.ca is not None else "the system's CA store"

    def tls(self) -> ssl.SSLContext | None:
        """What a wss:// hub is verified with (None for ws://), made at each connect so that a CA file
        replaced meanwhile is read; TlsSetupError when it cannot be used."""
        if not self.url.startswith("wss://"):
            return None
        try:
            context = ssl.create_default_context(cafile=None if self.ca is None else str(self.ca))
        except (OSError, ssl.SSLError, ValueError) as error:
            what = f"hub.ca: cannot use {self.ca} as a CA file" if self.ca else "the system's CA store cannot be read"
            raise TlsSetupError(f"{what}: {error}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class TlsSetupError(Exception):
    """The CA file the hub is to be verified against cannot be read or holds no certificate."""


CREDENTIAL_URL = "rastos.hub.url"  # systemd credentials (ImportCredential=rastos.hub.* in rastosd.service)
CREDENTIAL_TOKEN = "rastos.hub.token"
# PEM of the CA a wss:// hub's certificate chains to: one agent image pointed at a TLS hub at boot.
CREDENTIAL_CA = "rastos.hub.ca"


def load_settings(
    urls: tuple[str, ...] | str | None, token_file: Path, credentials: Path | None, ca: Path | None = None
) -> HubSettings | None:
    """The link's settings, or None when no hub is configured or its token cannot be read (logged).
    Credentials given to the machine at boot (`rastos-image boot --credential`, or any systemd
    credential source) come before /etc/rastos/daemon.toml and the token file. The credential
    rastos.hub.url holds one URL or several separated by whitespace (a space, a newline); rastos.hub.ca,
    PEM, comes before hub.ca (the file is used where systemd keeps it, for the life of the service)."""
    given = _credential(credentials, CREDENTIAL_URL)
    if given is None and not urls:
        return None
    # Only a host with a hub gets here: the checks' modules (URL parsing among them) are no part of the
    # start of a host without one, where under emulation each module costs the boot tens of milliseconds.
    from rastos.hub_settings import HubUrlProblem, check_ca, hub_urls

    if given is not None:
        words = given.split()
        try:
            urls = hub_urls(words if len(words) > 1 else given)
        except HubUrlProblem as problem:
            log.error("credential %s%s %s: not connecting", CREDENTIAL_URL, problem.at, problem.problem)
            return None
    urls = (urls,) if isinstance(urls, str) else urls
    if not urls:
        return None
    url = urls[0]
    if _credential(credentials, CREDENTIAL_CA) is not None:
        assert credentials is not None
        ca = credentials / CREDENTIAL_CA
        try:
            check_ca(ca.read_text())
        except (OSError, ValueError) as error:
            log.error("credential %s %s: not connecting", CREDENTIAL_CA, error)
            return None
    if ca is not None and not url.startswith("wss://"):
        log.warning("hub.ca is set but the hub's URL %s is not wss://: the hub is reached without TLS", url)
    token = _credential(credentials, CREDENTIAL_TOKEN)
    from_file = token is None
    if token is None:
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            log.error("hub.token_file: cannot read %s (%s): not connecting to the hub", token_file, error.strerror)
            return None
    if not token:
        log.error("hub.token_file: %s is empty: not connecting to the hub", token_file)
        return None
    settings = HubSettings(url, token, ca, token_file if from_file else None, urls[1:])
    try:
        settings.tls()
    except TlsSetupError as error:  # said now, at start; the link says it again at each try
        log.error("%s", error)
    return settings


def _credential(directory: Path | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        return (directory / name).read_text().strip() or None
    except OSError:
        return None
