"""What Stage() is given: an absolute path or an http(s) URL, and the request headers for a URL,
checked before anything else happens (each refusal is InvalidParams naming what is wrong).

A path is opened at once, without following a link anywhere on the way (ops/rootfs.py), and must be
a regular file; the staging reads it through that descriptor, so a file swapped in at the path later
is never the one staged.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import InvalidParams
from ops.errors import UnsafePath
from ops.rootfs import Root

MAX_SOURCE = 4096
SCHEMES = ("http", "https")
HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Cancelled(Exception):
    """Cancel() was called: the staging stops at the next point it looks."""


@dataclass(frozen=True)
class Source:
    text: str
    url: str | None  # set for an http(s) URL; otherwise `text` is an absolute path

    @property
    def shown(self) -> str:
        """The source as status, events and errors show it to anyone: a URL's query and fragment may
        carry a token (a signed link), so they are left out."""
        if self.url is None:
            return self.text
        parts = urllib.parse.urlsplit(self.url)
        hidden = "?..." if parts.query or parts.fragment else ""
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + hidden


def parse_source(text: str) -> Source:
    """An absolute path or an http(s) URL, or InvalidParams naming what is wrong with it."""
    if not text:
        raise InvalidParams("source", "is empty: give an absolute path or an http(s) URL")
    if len(text) > MAX_SOURCE:
        raise InvalidParams("source", f"must be at most {MAX_SOURCE} characters, got {len(text)}")
    if not text.isprintable():
        raise InvalidParams("source", "must be one path or URL without control characters")
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if text.startswith("/"):
        return Source(text, None)
    if " " in text:
        raise InvalidParams("source", "a URL holds no spaces (write them %20)")
    if not scheme.isascii() or not scheme.isalpha():
        raise InvalidParams("source", f"{text[:64]!r} is neither an absolute path nor an http(s) URL")
    if scheme not in SCHEMES:
        raise InvalidParams("source", f"{scheme[:16]!r} URLs are not fetched: give an http(s) URL or an absolute path")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise InvalidParams("source", f"not a URL: {error}") from None
    if not parts.hostname or not text.lower().startswith(f"{scheme}://"):
        raise InvalidParams("source", "the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidParams("source", "the URL holds a user name or password: those go in a header, never in a URL")
    del port
    return Source(text, text)


def check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers as HTTP allows them: a token for a name, no line break in a value."""
    checked = {}
    for name, value in headers.items():
        if not name or not set(name) <= HEADER_NAME or len(name) > 256:
            raise InvalidParams("headers", f"{name[:64]!r} is not a header name")
        if any(char in value for char in "\r\n\0") or len(value) > 8192:
            raise InvalidParams(f"headers.{name}", "must be one line of at most 8192 characters")
        checked[name] = value
    return checked


def open_local(path: str) -> int:
    """A descriptor of the bundle at `path`: a regular file, reached without following a link."""
    try:
        return Root(Path("/")).open_regular(path)
    except UnsafePath as error:
        raise InvalidParams("source", str(error)) from None
    except FileNotFoundError:
        raise InvalidParams("source", f"{path}: no such file") from None
    except OSError as error:
        raise InvalidParams("source", f"{path}: {error.strerror}") from None
