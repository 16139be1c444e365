"""The certs op's X.509 work, apart from any target: reading a key and certificate pair, making a CA,
issuing a host certificate, what a certificate says (its names, its issuer). A name that is an IP
address goes in a certificate as an iPAddress entry: a client reaching a host by its address checks
that entry, never a DNS one. cryptography is imported
at its first use, not at every start of the daemon (it is ~9 MB)."""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import exceptions, x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
else:  # imported when a certificate is first read or made, not at every start of the daemon
    from rastos.lazy import Lazy

    exceptions = Lazy("cryptography.exceptions")
    x509 = Lazy("cryptography.x509")
    hashes = Lazy("cryptography.hazmat.primitives.hashes")
    serialization = Lazy("cryptography.hazmat.primitives.serialization")
    ec = Lazy("cryptography.hazmat.primitives.asymmetric.ec")
    ExtendedKeyUsageOID = Lazy("cryptography.x509.oid", "ExtendedKeyUsageOID")
    NameOID = Lazy("cryptography.x509.oid", "NameOID")

CA_DAYS = 3650
SKEW = datetime.timedelta(minutes=5)  # valid from a little before now: clocks of clients differ
PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class Pair:
    """A key and its certificate as found; `problem` says why they cannot be used."""

    key: ec.EllipticCurvePrivateKey | None
    cert: x509.Certificate | None
    problem: str | None


def parse_pair(key_pem: bytes, cert_pem: bytes, key_path: str, cert_path: str) -> Pair:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        return Pair(None, None, f"cannot be read ({error})")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Pair(None, cert, f"{key_path} is not an EC key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return Pair(None, cert, f"{key_path} does not match {cert_path}")
    return Pair(key, cert, None)


def common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """The CA's name as issuer and the CA's key's signature on it."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, exceptions.InvalidSignature):
        return False
    return True


def sans(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is for, in its order (an address as `ip_address`
    writes it)."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    kinds = (x509.DNSName, x509.IPAddress)
    return [str(name.value) for name in extension.value if isinstance(name, kinds)]


def ip_address(name: str) -> str | None:
    """`name` as the one spelling of an IP address, or None when it is not one."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


def general_name(name: str) -> x509.GeneralName:
    address = ip_address(name)
    return x509.IPAddress(ipaddress.ip_address(address)) if address is not None else x509.DNSName(name)


def pem_bodies(text: str) -> list[str]:
    """The base64 of each certificate in PEM text, without line breaks: compared, not parsed (the
    system bundle holds certificates that a strict parser refuses)."""
    return ["".join(body.split()) for body in PEM.findall(text)]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(name: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rastOS local CA")])  # fmt: skip
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: tuple[str, ...], not_after: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server (and client) certificate for `names` (DNS names and IP addresses), signed by the CA;
    valid at most as long as it."""
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    first = names[0].removeprefix("*.")
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([general_name(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def read_certificate(pem: bytes) -> x509.Certificate | None:
    """A PEM certificate, or None when it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
