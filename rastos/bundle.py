"""Update bundles: one file that carries a deployment's root tree as a btrfs send stream, its kernel,
initrd and boot entry, and a signed manifest that says what it is and how to check every part.

The file is a POSIX tar archive (readable with `tar tvf`) whose members come in a fixed order:
    manifest.json   what the bundle is (see `Manifest`), with the size and sha256 of every part
    manifest.sig    an ed25519 signature over manifest.json's exact bytes, and the signing key's id
    entry.conf      the boot entry template (title, options; linux/initrd are filled in on the host)
    linux, initrd   the deployment's kernel and initrd
    root.btrfs.zst  `btrfs send` of the root subvolume (with `-p PARENT` for a delta), zstd-compressed
The manifest and its signature come first, so a reader checks the signature from the first few
kilobytes, before a byte of the rest is trusted or a download goes on. Each part is then checked
against the manifest's sha256 as it is read.

Identity: a version's root subvolume has one UUID for ever (`subvolume.uuid`): the builder's
read-only subvolume that both its full and its delta streams were sent from. A host that received
either stream holds it as the received UUID of its image subvolume, which is what `btrfs receive`
looks the parent of a delta up by (docs/updates.md).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rastos.errors import RastosError
from rastos.lazy import Lazy

# cryptography costs the daemon ~9 MB resident; a host only pays for it when it checks a bundle.
ed25519 = Lazy("cryptography.hazmat.primitives.asymmetric.ed25519")
serialization = Lazy("cryptography.hazmat.primitives.serialization")
crypto_exceptions = Lazy("cryptography.exceptions")

FORMAT = 1
SUFFIX = ".rbundle"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
PARTS = ("entry.conf", "linux", "initrd", "root.btrfs.zst")
REUSABLE = ("linux", "initrd")  # the parts a delta may leave to the parent's copy on the host
MEMBERS = (MANIFEST, SIGNATURE, *PARTS)
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
# Enough for the head of any bundle: two tar headers, a manifest at its limit, the signature.
MAX_HEAD_BYTES = 3 * 512 + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + 1024
KEY_SUFFIX = ".pub"
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$")
SUBVOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PROFILE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_PART_BYTES = 1 << 40
CHUNK = 1 << 20


class BundleError(RastosError):
    """A bundle that cannot be trusted or used; `reason` is a short machine-readable word
    (corrupt, signature, untrusted, parent, format) that the daemon maps to its error names."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclass(frozen=True)
class Part:
    file: str
    size: int  # of the content
    sha256: str  # of the content
    # A delta's kernel or initrd that is its parent's, byte for byte: the member is empty and the host
    # uses the copy it has on its ESP, found by this sha256 (most updates keep the kernel).
    in_parent: bool = False

    @property
    def stored(self) -> int:
        """Bytes of the part inside the bundle file."""
        return 0 if self.in_parent else self.size


@dataclass(frozen=True)
class Parent:
    version: str
    uuid: str


@dataclass(frozen=True)
class Manifest:
    profile: str
    version: str
    built_at: str
    rastos_version: str
    kernel_version: str
    subvolume_name: str  # the name the root subvolume is sent (and received) under
    subvolume_uuid: str  # the version's identity, the received UUID on every host that has it
    parent: Parent | None  # set for a delta: only a host holding this version can take it
    packages: tuple[tuple[str, str], ...]  # (name, version)
    parts: Mapping[str, Part] = field(default_factory=dict)

    @property
    def delta(self) -> bool:
        return self.parent is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "profile": self.profile,
            "version": self.version,
            "built_at": self.built_at,
            "rastos_version": self.rastos_version,
            "kernel": {"version": self.kernel_version},
            "subvolume": {"name": self.subvolume_name, "uuid": self.subvolume_uuid},
            "parent": None if self.parent is None else dataclasses.asdict(self.parent),
            "packages": [{"name": name, "version": version} for name, version in self.packages],
            "parts": {name: dataclasses.asdict(part) for name, part in self.parts.items()},
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """The manifest, checked field by field; a BundleError names the first field that is wrong."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError("format", f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise BundleError("format", f"{MANIFEST} is not JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        read = _Fields(data, "manifest")
        if read.integer("format") != FORMAT:
            raise BundleError("format", f"manifest.format: this rastOS reads bundle format {FORMAT} only")
        kernel = _Fields(read.value("kernel", dict), "manifest.kernel")
        subvolume = _Fields(read.value("subvolume", dict), "manifest.subvolume")
        parent_data = read.value("parent", (dict, type(None)))
        parent = None
        if parent_data is not None:
            fields = _Fields(parent_data, "manifest.parent")
            parent = Parent(fields.text("version", VERSION), fields.text("uuid", UUID))
        packages = []
        for index, item in enumerate(read.value("packages", list)):
            package = _Fields(item, f"manifest.packages[{index}]")
            packages.append((package.text("name", None, 256), package.text("version", None, 256)))
        parts = {}
        parts_data = read.value("parts", dict)
        for name in PARTS:
            if name not in parts_data:
                raise BundleError("format", f"manifest.parts: the part {name} is missing")
            part = _Fields(parts_data[name], f"manifest.parts.{name}")
            size = part.integer("size")
            if not 0 <= size <= MAX_PART_BYTES:
                raise BundleError("format", f"manifest.parts.{name}.size: {size} is out of range")
            if part.text("file", None, 64) != name:
                raise BundleError("format", f"manifest.parts.{name}.file: must be {name}")
            in_parent = part.data.get("in_parent", False)
            if not isinstance(in_parent, bool):
                raise BundleError("format", f"manifest.parts.{name}.in_parent: must be true or false")
            if in_parent and (parent is None or name not in REUSABLE):
                raise BundleError("format", f"manifest.parts.{name}.in_parent: only a delta's {' or '.join(REUSABLE)}")
            parts[name] = Part(name, size, part.text("sha256", SHA256), in_parent)
        if unknown := set(parts_data) - set(PARTS):
            raise BundleError("format", f"manifest.parts: unknown part {sorted(unknown)[0]}")
        return cls(
            profile=read.text("profile", PROFILE),
            version=read.text("version", VERSION),
            built_at=read.text("built_at", None, 64),
            rastos_version=read.text("rastos_version", None, 64),
            kernel_version=kernel.text("version", None, 128),
            subvolume_name=subvolume.text("name", SUBVOLUME_NAME),
            subvolume_uuid=subvolume.text("uuid", UUID),
            parent=parent,
            packages=tuple(packages),
            parts=parts,
        )


class _Fields:
    """Reads one JSON object's fields, each error naming its path (`manifest.parts.linux.size`)."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError("format", f"{where}: must be an object")
        self.data, self.where = data, where

    def value(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise BundleError("format", f"{self.where}.{key}: missing")
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError("format", f"{self.where}.{key}: wrong type {type(value).__name__}")
        return value

    def integer(self, key: str) -> int:
        return int(self.value(key, int))

    def text(self, key: str, pattern: re.Pattern[str] | None, limit: int = 256) -> str:
        value = str(self.value(key, str))
        if len(value) > limit or (pattern is not None and not pattern.match(value)):
            raise BundleError("format", f"{self.where}.{key}: {value[:80]!r} is not a valid {key}")
        return value


# -- keys and signatures ----------------------------------------------------------------------------


def key_id(public_raw: bytes) -> str:
    """A key's short id: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def generate_key(private_path: Path) -> tuple[Path, str]:
    """A new ed25519 signing key at `private_path` (PEM, mode 0600, never overwritten) and its public
    half beside it as `NAME.pub`, the file a host trusts. Returns the public file and the key id."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_path = private_path.with_name(private_path.name + KEY_SUFFIX)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise RastosError(f"{path} exists already", hint="choose another name; a key is never overwritten")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = private.public_key()
    public_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public_path, key_id(_public_raw(public))


@dataclass(frozen=True)
class SigningKey:
    key: Any  # Ed25519PrivateKey
    id: str

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise RastosError(f"cannot read the signing key {path}: {error}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise RastosError(f"the signing key {path} is not an ed25519 key")
        return cls(key, key_id(_public_raw(key.public_key())))

    def public_pem(self) -> bytes:
        """The public half, as the PEM file a host trusts (what `generate_key` writes as NAME.pub)."""
        public = self.key.public_key()
        return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, manifest: bytes) -> bytes:
        signature = base64.b64encode(self.key.sign(manifest)).decode()
        return (json.dumps({"algorithm": "ed25519", "key": self.id, "signature": signature}) + "\n").encode()


def load_public_key(raw: bytes, source: str) -> tuple[str, Any]:
    """(key id, key) from a PEM public key file's bytes."""
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as error:
        raise BundleError("untrusted", f"{source}: not a PEM public key: {error}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError("untrusted", f"{source}: not an ed25519 public key")
    return key_id(_public_raw(key)), key


def trusted_keys(directory: Path) -> dict[str, Any]:
    """The keys a host trusts: every `*.pub` in `directory` (/etc/rastos/update-keys.d). A link or a
    file not owned by root is skipped, so no local user can add a key."""
    keys: dict[str, Any] = {}
    try:
        paths = sorted(directory.iterdir())
    except FileNotFoundError:
        return keys
    for path in paths:
        if not path.name.endswith(KEY_SUFFIX):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_uid != 0 or status.st_mode & 0o022:
                continue
            raw = file.read(16384)
        try:
            identifier, key = load_public_key(raw, str(path))
        except BundleError:
            continue
        keys[identifier] = key
    return keys


def verify_signature(manifest: bytes, signature: bytes, keys: Mapping[str, Any]) -> str:
    """The id of the trusted key that signed `manifest`; a BundleError otherwise."""
    if not keys:
        raise BundleError(
            "untrusted",
            "no update key is trusted on this host",
            hint="put the builder's public key (rastos-image key generate) in /etc/rastos/update-keys.d/",
        )
    try:
        data = json.loads(signature)
        fields = _Fields(data, "manifest.sig")
        algorithm = fields.text("algorithm", None, 32)
        identifier = fields.text("key", re.compile(r"^[0-9a-f]{16}$"))
        raw = base64.b64decode(fields.text("signature", None, 200), validate=True)
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError("signature", f"manifest.sig is not a signature: {error}") from None
    if algorithm != "ed25519":
        raise BundleError("signature", f"manifest.sig.algorithm: {algorithm!r} is not ed25519")
    if identifier not in keys:
        raise BundleError(
            "untrusted",
            f"the bundle is signed by key {identifier}, which this host does not trust",
            hint="add the key's .pub file to /etc/rastos/update-keys.d/ if it is yours",
        )
    try:
        keys[identifier].verify(raw, manifest)
    except crypto_exceptions.InvalidSignature:
        raise BundleError("signature", f"the manifest's signature by key {identifier} does not match it") from None
    return identifier


# -- the file ---------------------------------------------------------------------------------------


def file_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_bundle(
    destination: Path,
    manifest: Manifest,
    key: SigningKey,
    parts: Mapping[str, Path],
    *,
    in_parent: frozenset[str] = frozenset(),
) -> Manifest:
    """Write the bundle (to `destination` through a temporary name, so a reader never sees half of
    one). The manifest's parts are filled in from the files; those named in `in_parent` (a delta's
    kernel or initrd that its parent has too) are described but not stored. Returns the manifest as
    written."""
    if set(parts) != set(PARTS):
        raise RastosError(f"a bundle needs exactly the parts {', '.join(PARTS)}")
    if in_parent and (manifest.parent is None or not in_parent <= set(REUSABLE)):
        raise RastosError(f"only a delta's {' or '.join(REUSABLE)} can be left to its parent")
    measured = {name: Part(name, *file_sha256(parts[name]), name in in_parent) for name in PARTS}
    manifest = dataclasses.replace(manifest, parts=measured)
    raw = manifest.to_bytes()
    signature = key.sign(raw)
    partial = destination.with_name(f".{destination.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST, raw), (SIGNATURE, signature)):
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
        for name in PARTS:
            with parts[name].open("rb") as file:
                tar.addfile(_member(name, measured[name].stored), None if measured[name].in_parent else file)
    partial.replace(destination)
    return manifest


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


@dataclass(frozen=True)
class Head:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    offsets: Mapping[str, int]  # where each part's data starts in the file, for the parts seen


def read_head(file: IO[bytes], *, limit: int = MAX_HEAD_BYTES) -> Head:
    """The manifest and signature from the start of a bundle (a file, or the first bytes of one being
    downloaded), not yet verified: check with `verify_signature` before using anything else."""
    members: dict[str, bytes] = {}
    offsets: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=_Bounded(file, limit), mode="r|") as tar:
            for expected, info in zip((MANIFEST, SIGNATURE), tar, strict=False):
                if info.name != expected or not info.isfile():
                    raise BundleError("format", f"not a rastOS bundle: member {info.name!r} where {expected} belongs")
                cap = MAX_MANIFEST_BYTES if expected == MANIFEST else MAX_SIGNATURE_BYTES
                if info.size > cap:
                    raise BundleError("format", f"{expected} is larger than {cap} bytes")
                extracted = tar.extractfile(info)
                assert extracted is not None
                members[expected] = extracted.read()
                offsets[expected] = info.offset_data
    except (tarfile.TarError, EOFError) as error:
        raise BundleError("corrupt", f"not a rastOS bundle, or cut short: {error}") from None
    if set(members) != {MANIFEST, SIGNATURE}:
        raise BundleError("corrupt", "not a rastOS bundle, or cut short: no manifest and signature at its start")
    return Head(Manifest.from_bytes(members[MANIFEST]), members[MANIFEST], members[SIGNATURE], offsets)


class _Bounded(io.RawIOBase):
    """A reader that stops a tar reader from pulling more than `limit` bytes out of the source."""

    def __init__(self, file: IO[bytes], limit: int) -> None:
        self.file, self.left = file, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            return 0
        data = self.file.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


def part_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Each member's (data offset, size) in a complete bundle file, in the order they come; the
    order and the names must be the format's."""
    found: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile() or info.name not in MEMBERS or info.name in found:
                    raise BundleError("corrupt", f"{path}: unexpected member {info.name!r}")
                found[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError) as error:
        raise BundleError("corrupt", f"{path}: not a complete bundle: {error}") from None
    if tuple(found) != MEMBERS:
        missing = [name for name in MEMBERS if name not in found]
        raise BundleError("corrupt", f"{path}: cut short or out of order; missing {', '.join(missing) or 'nothing'}")
    return found


def stored_chunks(path: Path, name: str, part: Part, place: tuple[int, int]) -> Iterator[bytes]:
    """The bytes of part `name`, stored at `place` (data offset, size) in the bundle file at `path`;
    raises BundleError if they are not the manifest's: at once for the size, at the end for the sha256.
    Whoever reads a part reads it through this, so every reader checks it the same way."""
    if part.in_parent:
        raise BundleError("format", f"{path}: part {name} is the parent's: the host has it, the bundle not")
    offset, size = place
    _check_size(path, name, part, size)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(offset)
        left = size
        while left:
            chunk = file.read(min(CHUNK, left))
            if not chunk:
                raise BundleError("corrupt", f"{path}: part {name} is cut short")
            digest.update(chunk)
            left -= len(chunk)
            yield chunk
    if digest.hexdigest() != part.sha256:
        raise BundleError("corrupt", f"{path}: part {name} does not match its sha256 in the manifest")


def check_stored_parts(path: Path, manifest: Manifest, offsets: Mapping[str, tuple[int, int]]) -> None:
    """Every part of the bundle file at `path` as its manifest says: its size, and the sha256 of what
    is stored (a part left to the parent stores nothing)."""
    for name in PARTS:
        part = manifest.parts[name]
        if part.in_parent:
            _check_size(path, name, part, offsets[name][1])
            continue
        for _ in stored_chunks(path, name, part, offsets[name]):
            pass


def _check_size(path: Path, name: str, part: Part, size: int) -> None:
    if size != part.stored:
        raise BundleError("corrupt", f"{path}: part {name} has {size} bytes, the manifest says {part.stored}")


class Bundle:
    """A complete bundle file whose signature has been checked: its parts, each read through a
    hash check against the manifest."""

    def __init__(self, path: Path, keys: Mapping[str, Any]) -> None:
        self.path = path
        with path.open("rb") as file:
            head = read_head(file)
        self.key = verify_signature(head.manifest_bytes, head.signature, keys)
        self.manifest = head.manifest
        self.offsets = part_offsets(path)
        for name, part in self.manifest.parts.items():
            _check_size(path, name, part, self.offsets[name][1])

    def chunks(self, name: str) -> Iterator[bytes]:
        """The part's bytes; raises BundleError at the end if they do not hash to the manifest's."""
        return stored_chunks(self.path, name, self.manifest.parts[name], self.offsets[name])

    def read_part(self, name: str, limit: int = 256 << 20) -> bytes:
        if self.offsets[name][1] > limit:
            raise BundleError("corrupt", f"{self.path}: part {name} is larger than {limit} bytes")
        return b"".join(self.chunks(name))

    def check_parts(self) -> None:
        """Hash every part against the manifest before any of it is used."""
        check_stored_parts(self.path, self.manifest, self.offsets)
