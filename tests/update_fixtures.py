"""Real update bundles and a real host layout for the image update tests, on btrfs loop files.

The builder side (made once per session): versions 1, 2 and 3 of a tiny root tree as read-only
subvolumes on a scratch btrfs, each with its /usr/lib/rastos/image.json; 2 is a snapshot of 1 brought
forward (so its delta from 1 is small), 3 carries a 48 MiB file of random bytes (to fill a small file
system). They are sent (full, and 2 as a delta from 1), zstd-compressed, and written as signed
bundles with rastos.bundle.write_bundle, beside a fake kernel and initrd of their own.

The host side (made per test): a btrfs whose @images holds version 1 received from its full stream,
`@` a writable snapshot of it (as an installed image has), @snapshots, and an ESP whose running entry
boots `@` with its kernel in /rastos/6.1.0-test/.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from rastos.bundle import Manifest, Parent, SigningKey, generate_key, write_bundle
from tests.daemon_fixtures import ETC_FILES, ScratchRoot, require_root

KERNEL = "6.1.0-test"
RUNNING_ENTRY = (
    "title rastOS test\n"
    f"version {KERNEL}\n"
    "sort-key rastos\n"
    f"linux /rastos/{KERNEL}/linux\n"
    f"initrd /rastos/{KERNEL}/initrd\n"
    "options root=UUID=host-root rootflags=subvol=@ rw quiet\n"
)
ENTRY_TEMPLATE = (
    "title rastOS test {version}\nversion {kernel}\nsort-key rastos\n"
    "options root=UUID=builder-root rootflags=subvol=@ rw quiet console=ttyS0\n"
)
BIG_FILE = 48 << 20


@dataclass(frozen=True)
class Version:
    version: str
    name: str  # the subvolume's name, in the stream and in @images
    uuid: str  # the version's identity


@dataclass(frozen=True)
class Bundles:
    directory: Path
    keys: Path  # a trusted keys directory holding the signing key's .pub
    versions: dict[str, Version]
    streams: dict[str, Path]  # full root streams, by version
    full: dict[str, Path]  # full bundles, by version
    delta: Path  # version 2 as a delta from version 1
    untrusted: Path  # version 2 (full), signed by a key the host does not trust

    def copy(self, which: Path, destination: Path) -> Path:
        target = destination / which.name
        shutil.copyfile(which, target)
        return target


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def _write_tree(root: Path, version: str, identity: str, name: str) -> None:
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    for file, (content, mode) in ETC_FILES.items():
        (etc / file).write_text(content)
        (etc / file).chmod(mode)
    (etc / "login.defs").write_text(Path("/etc/login.defs").read_text())
    (root / "home").mkdir(exist_ok=True)
    info = root / "usr/lib/rastos/image.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"profile": "test", "version": version, "subvolume": {"name": name, "uuid": identity}}))
    (root / "usr/share/rastos-test").mkdir(parents=True, exist_ok=True)
    (root / "usr/share/rastos-test/version").write_text(f"{version}\n")


def _subvolume_uuid(path: Path) -> str:
    return str(uuid.UUID(bytes=btrfsutil.subvolume_info(path).uuid))


def _send(path: Path, output: Path, parent: Path | None = None) -> None:
    argv = ["btrfs", "send", "-q", *(["-p", str(parent)] if parent else []), str(path)]
    with output.open("wb") as out:
        sender = subprocess.Popen(argv, stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-q", "-c"], stdin=sender.stdout, stdout=out, check=True)
        assert sender.wait() == 0


def make_bundles(directory: Path) -> Bundles:
    image, builder = directory / "builder.img", directory / "builder"
    builder.mkdir()
    _run("truncate", "-s", "512M", image)
    _run("mkfs.btrfs", "-q", image)
    _run("mount", "-o", "loop", image, builder)
    try:
        versions: dict[str, Version] = {}
        previous: Path | None = None
        for number in ("1", "2", "3"):
            name = f"rastos-test-{number}"
            path = builder / name
            if previous is None:
                _run("btrfs", "-q", "subvolume", "create", path)
            else:
                _run("btrfs", "-q", "subvolume", "snapshot", builder / "rastos-test-1", path)
            identity = _subvolume_uuid(path)
            _write_tree(path, number, identity, name)
            if number == "2":
                (path / "usr/share/rastos-test/new-in-2").write_text("added in version 2\n")
            if number == "3":
                with (path / "usr/share/rastos-test/big").open("wb") as big:
                    for _ in range(BIG_FILE >> 20):
                        big.write(os.urandom(1 << 20))
            btrfsutil.set_subvolume_read_only(path, True)
            versions[number] = Version(number, name, identity)
            previous = path
        streams = {number: directory / f"root-{number}.btrfs.zst" for number in versions}
        for number, stream in streams.items():
            _send(builder / versions[number].name, stream)
        delta_stream = directory / "root-2-from-1.btrfs.zst"
        _send(builder / versions["2"].name, delta_stream, parent=builder / versions["1"].name)
    finally:
        _run("umount", "--lazy", builder)
        image.unlink()
    signing, _ = generate_key(directory / "signing-key")
    other, _ = generate_key(directory / "other-key")
    keys = directory / "keys"
    keys.mkdir()
    shutil.copyfile(signing, keys / "builder.pub")
    key, untrusted_key = SigningKey.load(directory / "signing-key"), SigningKey.load(directory / "other-key")
    del other

    def bundle(number: str, stream: Path, signer: SigningKey, name: str, parent: Version | None = None) -> Path:
        parts = {}
        for part, content in (("linux", f"linux of version {number}\n" * 64),
                              ("initrd", f"initrd of version {number}\n" * 128),
                              ("entry.conf", ENTRY_TEMPLATE.format(version=number, kernel=KERNEL))):  # fmt: skip
            parts[part] = directory / f"{part}-{number}"
            parts[part].write_text(content)
        parts["root.btrfs.zst"] = stream
        version = versions[number]
        manifest = Manifest(
            profile="test", version=number, built_at="2024-05-01T12:00:00Z", rastos_version="0.1.0",
            kernel_version=KERNEL, subvolume_name=version.name, subvolume_uuid=version.uuid,
            parent=None if parent is None else Parent(parent.version, parent.uuid),
            packages=(("bash", "5.2.15-2"),),
        )  # fmt: skip
        destination = directory / name
        write_bundle(destination, manifest, signer, parts)
        return destination

    full = {number: bundle(number, streams[number], key, f"rastos-test-{number}.rbundle") for number in versions}
    delta = bundle("2", delta_stream, key, "rastos-test-2-from-1.rbundle", parent=versions["1"])
    untrusted = bundle("2", streams["2"], untrusted_key, "untrusted-2.rbundle")
    return Bundles(directory, keys, versions, streams, full, delta, untrusted)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """The session's bundles (a few seconds to make: version 3's 48 MiB of random bytes)."""
    require_root()
    return make_bundles(tmp_path_factory.mktemp("bundles"))


@contextlib.contextmanager
def host_layout(directory: Path, bundles: Bundles, size: str = "512M") -> Iterator[ScratchRoot]:
    """A host installed from version 1: @images/rastos-test-1 received, @ a writable snapshot of it."""
    image, top = directory / "host.img", directory / "top"
    top.mkdir()
    _run("truncate", "-s", size, image)
    _run("mkfs.btrfs", "-q", image)
    _run("mount", "-o", "loop", image, top)
    try:
        (top / "@images").mkdir()
        with bundles.streams["1"].open("rb") as stream:
            decompress = subprocess.Popen(["zstd", "-dcq"], stdin=stream, stdout=subprocess.PIPE)
            subprocess.run(["btrfs", "receive", "-q", top / "@images"], stdin=decompress.stdout, check=True)
            assert decompress.wait() == 0
        _run("btrfs", "-q", "subvolume", "snapshot", top / "@images" / bundles.versions["1"].name, top / "@")
        _run("btrfs", "-q", "subvolume", "create", top / "@snapshots")
        esp = directory / "esp"
        (esp / "loader" / "entries").mkdir(parents=True)
        (esp / "loader" / "loader.conf").write_text("timeout 0\ndefault rastos-*\n")
        (esp / "loader" / "entries" / "rastos-test.conf").write_text(RUNNING_ENTRY)
        kernel = esp / "rastos" / KERNEL
        kernel.mkdir(parents=True)
        (kernel / "linux").write_text("the running kernel\n")
        (kernel / "initrd").write_text("the running initrd\n")
        yield ScratchRoot(top, esp)
    finally:
        subprocess.run(["umount", "--lazy", top], check=False)
        image.unlink(missing_ok=True)


def leftovers(scratch: ScratchRoot) -> dict[str, list[str]]:
    """What a failed staging must not leave: subvolumes beyond version 1's image, deployments,
    update entries and kernel directories other than the running one's."""
    images = sorted(path.name for path in (scratch.top / "@images").iterdir())
    deployments = scratch.top / "@deployments"
    return {
        "images": [name for name in images if name != "rastos-test-1"],
        "deployments": sorted(p.name for p in deployments.iterdir()) if deployments.is_dir() else [],
        "entries": sorted(p.name for p in (scratch.esp / "loader/entries").iterdir() if p.name != "rastos-test.conf"),
        "kernels": sorted(str(p.relative_to(scratch.esp)) for p in scratch.esp.glob("*/*") if p.parent.name != "loader"
                          and p.name != KERNEL),
    }  # fmt: skip


NOTHING_LEFT: dict[str, list[str]] = {"images": [], "deployments": [], "entries": [], "kernels": []}


@dataclass
class Served:
    """What the test server saw of each request."""

    path: str
    range: str | None
    authorization: str | None


@dataclass
class BundleServer:
    """An HTTP server (a thread, on 127.0.0.1) for one file, with Range, an ETag and ways to misbehave:
    cut the connection after so many bytes (once), or send slowly."""

    content: bytes
    cut_after: int | None = None
    delay: float = 0.0  # seconds between 64 KiB pieces
    seen: list[Served] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/bundle"

    def __enter__(self) -> BundleServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.seen.append(Served(self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path.split("?")[0] != "/bundle":
                    self.send_error(404)
                    return
                content, start = owner.content, 0
                requested = self.headers.get("Range")
                if requested:
                    start = int(requested.removeprefix("bytes=").split("-")[0])
                    if start >= len(content):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(content) - start))
                self.send_header("ETag", '"bundle-1"')
                self.end_headers()
                body = content[start:]
                if owner.cut_after is not None:
                    cut, owner.cut_after = owner.cut_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for offset in range(0, len(body), 65536):
                    try:
                        self.wfile.write(body[offset : offset + 65536])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    time.sleep(owner.delay)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
