"""The hub's image files: update bundles (rastos/bundle.py), each checked whole before it is kept.

A bundle arrives as a file (`rastos-hub image add`) or as an upload's body, streamed to a temporary
file beside the kept ones and hashed on the way, never held in memory. It is kept only if it is a
complete bundle: its manifest and signature at the start, every member in the format's order, every
part the size and sha256 the manifest says. If the hub has trusted keys (`--trusted-keys DIR`), the
signature must be by one of them; without, the key the signature names is only recorded. Hosts
check the signature again in any case, against their own keys.

Kept bundles are `DIR/SHA256.rbundle`: one file per content, whatever it was called or uploaded as.
The manifests are in the database (hub/rollout_store.py); this module knows only files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hub.errors import HubError, Unprocessable
from hub.files import sync_directory
from rastos.bundle import (
    SUFFIX,
    BundleError,
    Manifest,
    check_stored_parts,
    load_public_key,
    part_offsets,
    read_head,
    verify_signature,
)

log = logging.getLogger("rastos-hub.images")

PARTIAL_PREFIX = ".upload-"  # a bundle on its way in; left over after a crash, removed at the next start
STALE_PARTIAL = 3600.0  # seconds
WRITE_BYTES = 1 << 20  # an upload is written to disk in pieces of this size, off the event loop
KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class TooLarge(HubError):
    status = 413


@dataclass(frozen=True)
class Checked:
    """A complete bundle, checked, at `path` (still its temporary name until `ImageFiles.keep`)."""

    path: Path
    sha256: str
    size: int
    manifest: Manifest
    manifest_json: dict[str, Any]  # manifest.json as the bundle carries it
    key_id: str
    signature_checked: bool

    @property
    def id(self) -> str:
        return self.sha256[:16]


@dataclass(frozen=True)
class ImageFiles:
    directory: Path  # DATA/images
    max_bytes: int  # the largest bundle the hub takes
    trusted_keys: Path | None = None  # a directory of *.pub files; None: signatures are not checked

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}{SUFFIX}"

    def clean(self, kept: Collection[str]) -> None:
        """Remove what a crash left behind (at the hub's start): uploads cut off, and bundles whose row
        was removed but not yet their file (RolloutStore.remove_image); `kept` is the sha256 of every
        image the database has. One younger than an hour is spared: it may be `rastos-hub image add`
        at work, which keeps the file before it adds the row."""
        stale = time.time() - STALE_PARTIAL
        leftovers = list(self.directory.glob(f"{PARTIAL_PREFIX}*"))
        leftovers += [path for path in self.directory.glob(f"*{SUFFIX}") if path.name.removesuffix(SUFFIX) not in kept]
        for leftover in leftovers:
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
                    log.info("removed %s, which no image of the database names", leftover)

    @contextlib.contextmanager
    def _partial(self) -> Iterator[tuple[Path, IO[bytes]]]:
        """A new temporary file beside the kept ones; removed unless `keep` renamed it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            with os.fdopen(fd, "wb") as file:
                if os.geteuid() == 0:  # `rastos-hub image add` as root: the file is the hub's, as its directory
                    owner = self.directory.stat()
                    os.fchown(file.fileno(), owner.st_uid, owner.st_gid)
                yield path, file
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    async def receive(self, chunks: AsyncIterator[bytes], declared: int | None) -> Checked:
        """An upload's body, to disk and checked; refused (413) past `max_bytes` without reading on."""
        if declared is not None and declared > self.max_bytes:
            raise TooLarge(self._too_large(declared))
        with self._partial() as (path, file):
            digest, size, pending = hashlib.sha256(), 0, bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLarge(self._too_large())
                digest.update(chunk)
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    await asyncio.to_thread(file.write, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(_finish, file, bytes(pending))
            return await asyncio.to_thread(self.check, path, digest.hexdigest(), size)

    def copy_in(self, source: Path) -> Checked:
        """A bundle file, copied beside the kept ones and checked (`rastos-hub image add`)."""
        try:
            reader = source.open("rb")
        except OSError as error:
            raise HubError(f"bundle: cannot read {source}: {error.strerror}") from None
        with reader, self._partial() as (path, file):
            digest, size = hashlib.sha256(), 0
            while chunk := reader.read(WRITE_BYTES):
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLarge(self._too_large())
                digest.update(chunk)
                file.write(chunk)
            _finish(file, b"")
            return self.check(path, digest.hexdigest(), size)

    def _too_large(self, declared: int | None = None) -> str:
        size = "" if declared is None else f"{declared} bytes, "
        return f"bundle: {size}larger than the {self.max_bytes} bytes the hub takes (--max-image-bytes)"

    def check(self, path: Path, sha256: str, size: int) -> Checked:
        """The bundle at `path` if it is complete and every part matches its manifest; 422 naming the
        problem otherwise (the body was well-formed bytes, just not a bundle the hub can keep)."""
        try:
            with path.open("rb") as file:
                head = read_head(file)
            check_stored_parts(path, head.manifest, part_offsets(path))
        except BundleError as error:
            raise Unprocessable(f"bundle: {_without_path(error.message, path)}") from None
        key_id, checked = self._signature(head.manifest_bytes, head.signature)
        return Checked(path, sha256, size, head.manifest, json.loads(head.manifest_bytes), key_id, checked)

    def _signature(self, manifest: bytes, signature: bytes) -> tuple[str, bool]:
        if self.trusted_keys is None:
            return signature_key(signature), False
        keys = trusted_keys(self.trusted_keys)
        try:
            return verify_signature(manifest, signature, keys), True
        except BundleError as error:
            if error.reason != "untrusted":
                raise Unprocessable(f"bundle: {error.message}") from None
            raise Unprocessable(
                f"bundle: signed by key {signature_key(signature)}, which the hub does not trust "
                f"(its {len(keys)} trusted keys are the *.pub files in {self.trusted_keys})"
            ) from None

    def keep(self, checked: Checked) -> Path:
        """Give a checked bundle its kept name (its sha256): the same content is one file however often
        it is added."""
        kept = self.path(checked.sha256)
        checked.path.replace(kept)
        sync_directory(self.directory)
        return kept

    def remove(self, sha256: str) -> None:
        """Remove a kept bundle whose row is gone. A file that stays (a read-only disk, say) is only
        space: the hub's next start sweeps it (`clean`)."""
        try:
            self.path(sha256).unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not remove %s: %s; the hub's next start does", self.path(sha256), error.strerror)

    def discard(self, checked: Checked) -> None:
        checked.path.unlink(missing_ok=True)


def _finish(file: IO[bytes], rest: bytes) -> None:
    file.write(rest)
    file.flush()
    os.fsync(file.fileno())


def _without_path(message: str, path: Path) -> str:
    """The bundle module names the file it read: here that is a temporary name nobody knows."""
    return message.replace(f"{path}: ", "").replace(str(path), "the bundle")


def signature_key(signature: bytes) -> str:
    """The key id manifest.sig names (not checked: the hub has no trusted keys to check it with)."""
    try:
        data = json.loads(signature)
    except ValueError as error:
        raise Unprocessable(f"bundle: manifest.sig is not a signature: {error}") from None
    key = data.get("key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not KEY_ID.match(key):
        raise Unprocessable("bundle: manifest.sig.key: not a key id (16 hex digits)")
    return key


def trusted_keys(directory: Path) -> dict[str, Any]:
    """The keys the hub trusts: every `*.pub` file in `directory`, read at each check so a key added
    or removed counts at once. A link, or a file another user could change (not owned by root or the
    hub's user, or writable by group or others), is skipped with a warning: a key is trust."""
    keys: dict[str, Any] = {}
    try:
        paths = sorted(directory.glob("*.pub"))
    except OSError as error:
        log.warning("cannot read the trusted keys in %s: %s", directory, error)
        return keys
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            log.warning("trusted key %s skipped: %s", path, error.strerror)
            continue
        with os.fdopen(fd, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_uid not in (0, os.getuid()) or status.st_mode & 0o022:
                log.warning("trusted key %s skipped: not a file only root or the hub's user can change", path)
                continue
            raw = file.read(16384)
        try:
            identifier, key = load_public_key(raw, str(path))
        except BundleError as error:
            log.warning("trusted key %s skipped: %s", path, error.message)
            continue
        keys[identifier] = key
    return keys
