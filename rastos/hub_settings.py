"""What a host needs to reach its hub, checked the same way wherever it is given: by rastosd before it
writes them (`org.rastos.Daemon1.Hub.Join`) and by `rastos-hub host enrol` before it makes the host.

- the agent URL: ws:// or wss://, a host, no user or password (the token is the host's credential),
  no query or fragment, the path ending in /api/v1/agent (the agent finds the hub's downloads beside it);
- the token: a bearer token (RFC 6750's b64token), never echoed in an error;
- the CA: PEM certificates only (a private key is refused: it must not leave the hub), each valid now.

And, for daemon.toml, an image profile and the credential rastos.hub.url, the hubs a host may connect
to: one URL or several (`hub_urls`), several being the processes of one hub on one database.

A problem is a `ValueError` whose text says what is wrong; the caller names the field.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

AGENT_PATH = "/api/v1/agent"
MAX_URL = 2048
TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN, MAX_TOKEN = 16, 512
MAX_CA_BYTES = 256 * 1024
MAX_CERTIFICATES = 16
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
SHOWN = 64  # characters of a caller's value an error repeats


def shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN else value[: SHOWN - 3] + "...")


def check_agent_url(url: str) -> str:
    """The URL if it is a hub's agent socket; ValueError saying why not."""
    if not url:
        raise ValueError("is required: the hub's agent socket, ws(s)://HUB[:PORT]/api/v1/agent")
    if len(url) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters, got {len(url)}")
    if not (url.isascii() and url.isprintable()) or " " in url:
        raise ValueError(f"must be printable ASCII without spaces, got {shown(url)}")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"must start with ws:// or wss://, got {shown(url)}")
    try:
        parts.port  # noqa: B018  (a port out of range or not a number raises here)
    except ValueError:
        raise ValueError(f"has a port that is not one, got {shown(url)}") from None
    if not parts.hostname:
        raise ValueError(f"names no host, got {shown(url)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password: the host's token is its credential")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"must have no query or fragment, got {shown(url)}")
    if not parts.path.rstrip("/").endswith(AGENT_PATH):
        raise ValueError(f"must be the hub's agent socket, a path ending in {AGENT_PATH}, got {shown(url)}")
    return url


def agent_url(text: str) -> str:
    """The agent URL for what an admin typed: the hub's base or its agent socket, http(s) or ws(s)
    (https://hub:8470 -> wss://hub:8470/api/v1/agent)."""
    parts = urlsplit(text)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if parts.scheme in ("http", "https", "ws", "wss") and not path.endswith(AGENT_PATH):
        path += AGENT_PATH
    return check_agent_url(urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment)))


class HubUrlProblem(ValueError):
    """What is wrong with a hub URL setting; `at` is "[i]" for the i-th of a list, "" for one URL."""

    def __init__(self, at: str, problem: str) -> None:
        super().__init__(f"{at} {problem}" if at else problem)
        self.at = at
        self.problem = problem


def hub_urls(value: object) -> tuple[str, ...]:
    """The hubs a host may connect to, tried in order: one URL (a string) or several (a list), each
    ws:// or wss://, all of one scheme (one hub.ca verifies every hub); HubUrlProblem naming the item.
    A URL holds no whitespace: the credential rastos.hub.url separates several with it."""
    if isinstance(value, list):
        if not value:
            raise HubUrlProblem("", "must name at least one hub: a URL or a list of URLs")
        urls: tuple[object, ...] = tuple(value)
    elif isinstance(value, str):
        urls = (value,)
    else:
        raise HubUrlProblem("", f"must be a URL or a list of URLs, got {type(value).__name__}")
    for index, url in enumerate(urls):
        at = f"[{index}]" if isinstance(value, list) else ""
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")) or any(c.isspace() for c in url):
            got = shown(url) if isinstance(url, str) else type(url).__name__
            raise HubUrlProblem(at, f"must be a ws:// or wss:// URL, got {got}")
        if url.count("://") > 1:  # "ws://a/api/v1/agent,ws://b/api/v1/agent", say
            raise HubUrlProblem(at, "holds more than one URL: give several as a list (in the credential "
                                "rastos.hub.url, separated by whitespace)")  # fmt: skip
        first = str(urls[0]).split(":", 1)[0]
        if url.split(":", 1)[0] != first:
            raise HubUrlProblem(at, f"must start with {first}:// as [0] does: every hub is reached the same way "
                                "(one hub.ca verifies them all)")  # fmt: skip
    return tuple(str(url) for url in urls)


def check_agent_urls(text: str) -> tuple[str, ...]:
    """The hubs' agent sockets in `text`, one URL or several separated by whitespace (as the credential
    rastos.hub.url holds them), each checked as check_agent_url does, all of one scheme; HubUrlProblem
    saying why not, its `at` naming the item ("[1]") when there are several."""
    urls = text.split()
    if len(urls) <= 1:
        try:
            return (check_agent_url(urls[0] if urls else ""),)
        except ValueError as error:
            raise HubUrlProblem("", str(error)) from None
    for index, url in enumerate(urls):
        try:
            check_agent_url(url)
        except ValueError as error:
            raise HubUrlProblem(f"[{index}]", str(error)) from None
    return hub_urls(urls)


def agent_urls(texts: list[str]) -> str:
    """The agent sockets for what an admin typed for each hub (agent_url's forms), separated by spaces
    as Hub.Join takes them; HubUrlProblem naming the item as check_agent_urls does."""
    urls = []
    for text in texts:
        try:
            urls.append(agent_url(text))
        except ValueError as error:
            raise HubUrlProblem("", str(error)) from None
    return " ".join(check_agent_urls(" ".join(urls)))


def check_token(token: str) -> str:
    """The token if it has a bearer token's form; ValueError saying why not, without repeating it."""
    form = f"a hub agent token ({MIN_TOKEN} to {MAX_TOKEN} characters of letters, digits, '-._~+/', '=' at the end)"
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        raise ValueError(f"must be {form}, got {len(token)} characters")
    if not TOKEN.fullmatch(token):
        raise ValueError(f"must be {form}, got other characters (not shown)")
    return token


@dataclass(frozen=True)
class Certificate:
    subject: str
    sha256: str  # the fingerprint, as `openssl x509 -fingerprint -sha256` shows it
    not_after: str


@dataclass(frozen=True)
class CheckedCa:
    pem: str  # the certificates alone, re-encoded (any prose around them dropped)
    certificates: tuple[Certificate, ...]


def check_ca(text: str, now: datetime.datetime | None = None) -> CheckedCa:
    """PEM certificates a TLS client can verify a hub with; ValueError saying what is wrong."""
    import ssl  # as cryptography (~9 MB resident): only when a CA is given, not at rastosd's start

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    if len(text.encode(errors="replace")) > MAX_CA_BYTES:
        raise ValueError(f"must be at most {MAX_CA_BYTES} bytes of PEM")
    if not text.isascii():
        raise ValueError("must be PEM text (ASCII)")
    kinds = [match[1] for match in PEM_BLOCK.finditer(text)]
    if any("PRIVATE KEY" in kind for kind in kinds):
        raise ValueError("holds a private key: give the CA's certificate only (its key stays with the hub)")
    if not kinds:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if others := sorted({kind for kind in kinds if kind != "CERTIFICATE"}):
        raise ValueError(f"holds PEM blocks that are not certificates: {', '.join(others)}")
    if len(kinds) > MAX_CERTIFICATES:
        raise ValueError(f"holds {len(kinds)} certificates; at most {MAX_CERTIFICATES} are accepted")
    try:
        loaded = x509.load_pem_x509_certificates(text.encode())
    except ValueError as error:
        raise ValueError(f"holds a certificate that cannot be read: {error}") from None
    now = now or datetime.datetime.now(datetime.UTC)
    certificates = []
    for number, certificate in enumerate(loaded, 1):
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        if certificate.not_valid_after_utc < now:
            raise ValueError(f"certificate {number} ({subject}) expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        if certificate.not_valid_before_utc > now:
            raise ValueError(f"certificate {number} ({subject}) is not valid before "
                             f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC (this clock says "
                             f"{now:%Y-%m-%d %H:%M:%S})")  # fmt: skip
        fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
        certificates.append(Certificate(subject, fingerprint, f"{certificate.not_valid_after_utc:%Y-%m-%d}"))
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in loaded)
    try:
        ssl.create_default_context(cadata=pem)
    except ssl.SSLError as error:  # cryptography read it, OpenSSL's verifier would not take it
        raise ValueError(f"is not usable to verify a hub: {error}") from None
    return CheckedCa(pem, tuple(certificates))
