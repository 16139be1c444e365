"""The hub's TLS: its certificate and key (`--tls-cert`, `--tls-key`), checked at start and read again
on SIGHUP, and the rule that plain HTTP, which carries every token in the clear, is served only on
a loopback address unless `--insecure-listen` says so (a TLS proxy in front, on a network of its own).

The certificate may be any a CA issued for the names agents reach the hub by; the certs op's
`hub_names` issues one from the host's own CA (/var/lib/rastos-hub/tls/hub.crt and hub.key, the
hub's user's), and the agents are given that CA's certificate (/var/lib/rastos-hub/tls/ca.crt) as
`hub.ca`.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from rastos.errors import RastosError

log = logging.getLogger("rastos-hub.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
RENEW_WARNING = datetime.timedelta(days=14)  # a certificate this close to its end is warned of at start


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # PEM: the hub's certificate, then any intermediate ones
    key: Path  # PEM: its private key, without a passphrase

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MINIMUM_VERSION
        self.load(context)
        return context

    def load(self, context: ssl.SSLContext) -> None:
        """Check the pair and put it in `context` (new handshakes use it); RastosError naming the
        option at fault otherwise."""
        certificate = self._certificate()
        key = self._key()
        if not _same_key(certificate, key):
            raise RastosError(f"--tls-key: {self.key} is not the key of the certificate in --tls-cert {self.cert}")
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            raise RastosError(f"--tls-cert: {self.cert} with --tls-key {self.key} cannot be used: {error}") from None
        _warn_of_dates(self.cert, certificate)

    def _certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificates(self.cert.read_bytes())[0]
        except OSError as error:
            raise RastosError(f"--tls-cert: cannot read {self.cert}: {error.strerror}") from None
        except ValueError:
            raise RastosError(f"--tls-cert: {self.cert} holds no PEM certificate") from None

    def _key(self) -> PrivateKeyTypes:
        try:
            return serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        except OSError as error:
            raise RastosError(f"--tls-key: cannot read {self.key}: {error.strerror}") from None
        except (ValueError, TypeError):
            raise RastosError(
                f"--tls-key: {self.key} holds no PEM private key, or one with a passphrase (the hub takes none)"
            ) from None


def _same_key(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == certificate.public_key().public_bytes(*spki)


def _warn_of_dates(path: Path, certificate: x509.Certificate) -> None:
    """An expired certificate is served (the hub's UI and API stay reachable for whoever accepts it),
    but every agent refuses it: said loudly at start."""
    now = datetime.datetime.now(datetime.UTC)
    ends, starts = certificate.not_valid_after_utc, certificate.not_valid_before_utc
    if ends <= now:
        log.error("--tls-cert: %s expired on %s: agents refuse the hub until it is renewed", path, ends)
    elif starts > now:
        log.error("--tls-cert: %s is valid only from %s: agents refuse the hub until then", path, starts)
    elif ends - now < RENEW_WARNING:
        log.warning("--tls-cert: %s expires on %s: renew it (the hub reads it again on SIGHUP)", path, ends)


def check_listen(host: str, tls: bool, insecure: bool) -> None:
    """Plain HTTP only on loopback, unless asked for: anywhere else it shows every token to the network."""
    if tls or insecure or is_loopback(host):
        return
    raise RastosError(
        f"--listen: {host} is not a loopback address, and plain HTTP there carries every token in the clear",
        hint="give --tls-cert and --tls-key, or --insecure-listen to serve plain HTTP anyway (behind a TLS proxy)",
    )


def is_loopback(host: str) -> bool:
    """An address on loopback, or a name all of whose addresses are."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in found)
