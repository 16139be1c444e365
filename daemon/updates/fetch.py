"""Downloading a bundle from an http(s) URL (a path is copied into the same directory: steps.py).

A URL is downloaded into the updates directory (/var/lib/rastos/updates, root's alone) as
`KEY.partial`, KEY a hash of the URL. A cut connection is resumed with `Range: bytes=N-` (a few times
within one staging, and by a later staging of the same URL); `If-Range` with the server's ETag makes a
changed file come whole. A 200 answer to a Range request, a 416, or a total that differs from the one
the partial file was begun with start the download again from nothing. The bundle's head (manifest
and signature) is checked as soon as it has arrived: a bundle that is not signed by a trusted key, or
that this host cannot take, stops the download and its partial file is deleted, before the rest is
fetched. The verified manifest also bounds the size: a server that sends more is cut off.

Extra request headers (the hub agent's `Authorization: Bearer ...`) go to the URL's own host only,
never to another one a redirect leads to, and are never logged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import socket
import ssl
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from daemon.errors import UpdateFailed, UpdateNoSpace
from daemon.updates.source import SCHEMES, Cancelled, Source
from rastos.bundle import MAX_HEAD_BYTES, PARTS, SIGNATURE, BundleError, Head, read_head

log = logging.getLogger("rastosd.updates")

CHUNK = 64 * 1024
TIMEOUT = 30.0  # seconds a connection may stay silent before it counts as cut
ATTEMPTS = 5  # tries in a row that bring no byte before the download fails
FIRST_DELAY = 0.5  # seconds before the first retry; doubled each time
TAR_BLOCK = 512
TAR_SLACK = 20 * TAR_BLOCK + tarfile.RECORDSIZE  # end-of-archive blocks, record padding, pax headers


def no_space(where: str) -> UpdateNoSpace:
    return UpdateNoSpace(f"no space left for the download in {where}")


def head_so_far(file: IO[bytes], size: int, complete: bool) -> Head | None:
    """The bundle's head from the first `size` bytes, or None while too few of them have arrived.
    What cannot be the start of a bundle is refused at once, not after a megabyte of it."""
    file.seek(0)
    if size >= TAR_BLOCK:
        try:
            tarfile.TarInfo.frombuf(file.read(TAR_BLOCK), "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            raise BundleError("corrupt", f"not a rastOS bundle: {error}") from None
        file.seek(0)
    try:
        return read_head(file)
    except BundleError as error:
        if error.reason == "corrupt" and not complete and size < MAX_HEAD_BYTES:
            return None
        raise


def size_bound(head: Head) -> int:
    """The most bytes a bundle with this (verified) manifest can hold."""
    start = head.offsets[SIGNATURE] + len(head.signature)
    parts = sum(TAR_BLOCK + -(-part.stored // TAR_BLOCK) * TAR_BLOCK for part in head.manifest.parts.values())
    return start + parts + TAR_SLACK + TAR_BLOCK * len(PARTS)


class _Connections:
    """The socket of the download's current connection, so that Cancel() can cut it from another
    thread at once instead of waiting for the next bytes to come."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socket = sock
            if self.cancelled.is_set():
                self._cut()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            self._cut()

    def _cut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)


def _opener(
    connections: _Connections, headers: Mapping[str, str], origin: tuple[str, str], tls: ssl.SSLContext | None
) -> Any:
    """urllib's opener whose connections report their sockets, whose https is verified with `tls`
    (the system's store if None), and whose redirects carry the extra headers only while they stay
    on the URL's own scheme, host and port."""
    context = tls or ssl.create_default_context()

    class Http(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            connections.attach(self.sock)

    class Https(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            connections.attach(self.sock)

    class HttpHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Http, req)

    class HttpsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Https, req, context=context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(
            self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
        ) -> urllib.request.Request | None:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is None:
                return None
            if urllib.parse.urlsplit(new.full_url).scheme not in SCHEMES:
                raise urllib.error.URLError(f"a redirect to {urllib.parse.urlsplit(new.full_url).scheme}: refused")
            if _origin(new.full_url) == origin:
                for name, value in headers_of(req).items():
                    new.add_unredirected_header(name, value)
            return new

    def headers_of(req: urllib.request.Request) -> dict[str, str]:
        return {name: value for name, value in req.unredirected_hdrs.items() if name.lower() != "host"}

    return urllib.request.build_opener(HttpHandler(), HttpsHandler(context=context), Redirects())


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class _Cut(Exception):
    """The connection ended before the whole file came; worth another try."""


@dataclass
class Download:
    """One URL into the updates directory; `run` returns the complete file."""

    source: Source
    directory: Path
    headers: Mapping[str, str]
    cancelled: threading.Event
    progress: Callable[[int, int], None]  # bytes so far, bytes in all (0: not known yet)
    check_head: Callable[[Head], None]  # raises BundleError (or another error) to stop the download
    tls: ssl.SSLContext | None = None  # verifies an https URL (the hub's own CA); None: the system's store

    def __post_init__(self) -> None:
        assert self.source.url is not None
        self.url = self.source.url
        key = hashlib.sha256(self.url.encode()).hexdigest()[:32]
        self.partial = self.directory / f"{key}.partial"
        self.meta = self.directory / f"{key}.partial.json"
        self.complete = self.directory / f"{key}.rbundle"
        self.connections = _Connections(self.cancelled)
        self.opener = _opener(self.connections, self.headers, _origin(self.url), self.tls)
        self.head: Head | None = None
        self.bound = 0
        self.resumed_from = 0  # where the last Range request started (0: none was made)

    def cancel(self) -> None:
        self.connections.cancel()

    def run(self) -> Path:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.complete.unlink(missing_ok=True)
            return self._attempts()
        except OSError as error:
            if error.errno == errno.ENOSPC:
                self.forget()  # the space it took is wanted back more than a later resume
                raise no_space(str(self.directory)) from None
            raise
        except (BundleError, Cancelled):
            self.forget()  # a bundle this host will not take, or a staging called off: nothing kept
            raise

    def forget(self) -> None:
        for path in (self.partial, self.meta, self.complete):
            path.unlink(missing_ok=True)

    def _attempts(self) -> Path:
        failures, delay = 0, FIRST_DELAY
        while True:
            before = self._size()
            try:
                self._attempt()
                self.partial.replace(self.complete)
                self.meta.unlink(missing_ok=True)
                return self.complete
            except _Cut as cut:
                if self.cancelled.is_set():
                    raise Cancelled from None
                if self._size() > before:
                    failures, delay = 0, FIRST_DELAY
                failures += 1
                if failures >= ATTEMPTS:
                    raise UpdateFailed(f"{self.source.shown}: the download failed {ATTEMPTS} times: {cut}") from None
                log.warning("download of %s cut (%s); resuming in %.1f s", self.source.shown, cut, delay)
                if self.cancelled.wait(delay):
                    raise Cancelled from None
                delay *= 2

    def _size(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0

    def _saved(self) -> dict[str, Any]:
        try:
            saved = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _save(self, total: int, etag: str | None) -> None:
        temporary = self.meta.with_suffix(".tmp")
        temporary.write_text(json.dumps({"total": total, "etag": etag}))
        temporary.replace(self.meta)

    def _restart(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        self.head, self.bound = None, 0

    def _request(self, have: int) -> urllib.request.Request:
        request = urllib.request.Request(self.url)
        for name, value in self.headers.items():
            request.add_unredirected_header(name, value)
        if have:
            request.add_unredirected_header("Range", f"bytes={have}-")
            etag = self._saved().get("etag")
            if isinstance(etag, str) and not etag.startswith("W/"):
                request.add_unredirected_header("If-Range", etag)
        return request

    def _attempt(self) -> None:
        have = self._size()
        if have and not self._saved():
            self._restart()  # a partial file without its record: its total is unknown, so start over
            have = 0
        self.resumed_from = have
        response = self._open(have)
        with response:
            total, have = self._answer(response, have)
            self.progress(have, total)
            with self.partial.open("ab" if have else "wb") as out, self.partial.open("rb") as reader:
                if have:
                    self._look_at_head(reader, have, complete=False)
                self._receive(response, out, reader, have, total)

    def _open(self, have: int) -> http.client.HTTPResponse:
        if self.cancelled.is_set():
            raise Cancelled
        try:
            response: http.client.HTTPResponse = self.opener.open(self._request(have), timeout=TIMEOUT)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and have:  # the server has less than we do: start over
                self._restart()
                raise _Cut("the server refused the range asked for; starting again") from None
            if error.code in (408, 429) or error.code >= 500:
                raise _Cut(f"the server answered {error.code} {error.reason}") from None
            raise UpdateFailed(f"{self.source.shown}: the server answered {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, ssl.SSLCertVerificationError):
                raise UpdateFailed(f"{self.source.shown}: {error.reason.verify_message or error.reason}") from None
            raise _Cut(str(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise _Cut(str(error) or type(error).__name__) from None
        return response

    def _answer(self, response: http.client.HTTPResponse, have: int) -> tuple[int, int]:
        """(total size, bytes already here) from the response's status and headers."""
        etag = response.headers.get("ETag")
        try:
            length = int(response.headers.get("Content-Length") or 0)
        except ValueError:
            shown = response.headers["Content-Length"][:40]
            raise _Cut(f"the server sent a Content-Length that is not a number: {shown!r}") from None
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range") or ""
            try:
                first = int(content_range.split()[1].split("-")[0])
                total = int(content_range.rsplit("/", 1)[1])
            except (IndexError, ValueError):
                first, total = -1, -1
            if first == have and total == self._saved().get("total"):
                return total, have
            log.warning("download of %s: the server's file changed (%r); starting again", self.source.shown,
                        content_range)  # fmt: skip
            self._restart()
            raise _Cut("the server's file changed since the download began")
        if response.status != 200:
            raise _Cut(f"the server answered {response.status}")
        if have:
            log.info("download of %s: the server sent the whole file again; starting again", self.source.shown)
            self._restart()
        self._save(length, etag)
        return length, 0

    def _receive(
        self, response: http.client.HTTPResponse, out: IO[bytes], reader: IO[bytes], have: int, total: int
    ) -> None:
        while True:
            if self.cancelled.is_set():
                raise Cancelled
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as error:
                if self.cancelled.is_set():
                    raise Cancelled from None
                raise _Cut(str(error) or type(error).__name__) from None
            if not chunk:
                break
            out.write(chunk)
            have += len(chunk)
            self.progress(have, total)
            if self.head is None:
                out.flush()
                self._look_at_head(reader, have, complete=False)
            if self.bound and have > self.bound:
                raise BundleError(
                    "corrupt", f"{self.source.shown}: larger than its manifest allows ({self.bound} bytes)"
                )
        out.flush()
        if self.cancelled.is_set():
            raise Cancelled
        if total and have < total:
            raise _Cut(f"the connection ended after {have} of {total} bytes")
        if self.head is None:
            self._look_at_head(reader, have, complete=True)

    def _look_at_head(self, reader: IO[bytes], size: int, *, complete: bool) -> None:
        if self.head is not None:
            return
        head = head_so_far(reader, size, complete)
        if head is None:
            return
        try:
            self.check_head(head)
        except UpdateFailed:
            self.forget()  # a version this host will not take (the one it runs): nothing to resume
            raise
        self.head, self.bound = head, size_bound(head)
        log.info("download of %s: the head of version %s is signed by a trusted key; fetching the rest",
                 self.source.shown, head.manifest.version)  # fmt: skip
