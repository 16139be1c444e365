"""The steps of staging one bundle, in order (docs/updates.md, "On the host"), each leaving nothing
behind if it fails or is cancelled:

1. fetch: a path is copied where only root writes; a URL is downloaded (fetch.py). The head is checked as soon as it
   is there: the signature against the trusted keys, then whether this host can take the version
   at all (a delta's parent present, not the running deployment's version).
2. verify: every part's sha256 against the signed manifest, before any of it is used.
3. receive: the root stream into @images/NAME (layout.py), unless an image of that identity is
   there already; a delta's parent is checked again first.
4. deploy: a writable snapshot @deployments/.incoming-ID, readied by `prepare_deployment` (files
   carried, host state re-applied), renamed to @deployments/VERSION and committed; VERSION@ID when an
   earlier deployment of the version is there, which is left as it is.
5. install: kernel and initrd to the ESP's /ENTRY-TOKEN/NAME/ (NAME the deployment's), then the
   entry, ordered first.
6. retire: an earlier deployment of the version, with its entry and kernel, once the new entry is
   written: until then the earlier one boots as it did.
A failure after the receive takes the image it received away again, and one after the deployment
was placed takes the deployment: a staging either ends staged or leaves the host as it found it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import btrfsutil

from daemon.boot import BootEntries, entry_id, update_entry_id
from daemon.errors import BootConfigError, UpdateFailed
from daemon.failpoints import failpoint
from daemon.updates.fetch import Download
from daemon.updates.layout import (
    DEPLOYMENTS,
    IMAGES,
    HostLayout,
    delete_subvolume,
    deployment_version,
    version_deployed,
)
from daemon.updates.model import PrepareDeployment, Staging, image_identity
from daemon.updates.retention import remove_deployment
from ops.errors import UnsafePath
from ops.rootfs import Links, Root
from rastos.bundle import PARTS, Bundle, BundleError, Head, Manifest, Part, read_head, trusted_keys, verify_signature

log = logging.getLogger("rastosd.updates")

ENTRY_TOKEN_FILE = "/etc/kernel/entry-token"
MAX_TEMPLATE = 64 * 1024


@dataclass(frozen=True)
class Context:
    """What the steps need of the daemon."""

    root: Path  # the running root (/ on a host)
    running: str  # its subvolume, from the top of the file system
    downloads: Path
    keys_dir: Path
    entries: BootEntries
    run_lock: threading.Lock  # held while host state is read for the new deployment: no job runs beside it
    prepare_deployment: PrepareDeployment
    progress: Callable[[str, int, int], None]
    versioned: Callable[[int, str], None]  # the staging's version is known (the state store records it)
    received: Callable[[int, str], None]  # the staging received this image (recorded: a cut leaves it to remove)
    deploying: Callable[[int, str], None]  # the staging places this deployment (recorded: whose entry a cut left)


class StagingRun:
    def __init__(self, context: Context, staging: Staging, layout: HostLayout) -> None:
        self.context = context
        self.staging = staging
        self.layout = layout
        self.keys = trusted_keys(context.keys_dir)
        self.key = ""
        self.downloaded: Path | None = None

    def run(self) -> dict[str, Any]:
        try:
            bundle = self.verify(self.fetch())
            manifest = bundle.manifest
            image, received = self.image(bundle)
            try:
                deployment, carried = self.deploy(manifest, image)
                try:
                    entry, token = self.install(bundle, deployment)
                except BaseException:
                    self._undo("the deployment", lambda: delete_subvolume(deployment))
                    raise
            except BaseException:
                if received:
                    self._undo("the image received", lambda: delete_subvolume(image))
                raise
        finally:
            if self.downloaded is not None:
                self.downloaded.unlink(missing_ok=True)
        replaced = self.retire_earlier(manifest.version, deployment, token)
        return {
            "id": self.staging.id, "source": self.staging.source.shown, "version": manifest.version,
            "profile": manifest.profile, "delta": manifest.delta,
            "parent": manifest.parent.version if manifest.parent else None, "key": self.key,
            "image": self.layout.subvolume(image), "received": received,
            "deployment": self.layout.subvolume(deployment), "entry": entry, "kernel": f"/{token}/{deployment.name}",
            "replaced": replaced, "carried": carried, "reboot": self.staging.reboot,
        }  # fmt: skip

    @staticmethod
    def _undo(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (OSError, btrfsutil.BtrfsUtilError) as error:
            log.error("could not remove %s of a failed staging (the next start tries again): %s", what, error)

    # 1. fetch, with the head checked first

    def fetch(self) -> Path:
        staging = self.staging
        if staging.source.url is None:
            path = Path(f"/proc/self/fd/{staging.fd}")
            with self.named(path), path.open("rb") as file:
                self.check_head(read_head(file))
            return self.private_copy(path)
        download = Download(
            staging.source, self.context.downloads, staging.headers, staging.cancelled,
            progress=lambda done, total: self.context.progress("downloading", done, total),
            check_head=self.check_head, tls=staging.tls,
        )  # fmt: skip
        staging.download = download
        self.context.progress("downloading", 0, 0)
        self.downloaded = download.complete
        return download.run()

    def private_copy(self, path: Path) -> Path:
        """The bundle copied where only root writes (the updates directory): whoever owns the file
        given could change it between the hash check and btrfs receive, which reads it again."""
        self.context.downloads.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy = self.context.downloads / f"local-{self.staging.id}.rbundle"
        self.downloaded = copy
        self.context.progress("downloading", 0, 0)
        with path.open("rb") as source, copy.open("wb") as target:
            while chunk := source.read(1 << 20):
                self.staging.check()
                target.write(chunk)
        return copy

    def check_head(self, head: Head) -> None:
        """Signed by a trusted key, and a version this host can take: checked before the rest of the
        bundle is fetched or read."""
        self.key = verify_signature(head.manifest_bytes, head.signature, self.keys)
        manifest = head.manifest
        self.staging.version = manifest.version
        self.context.versioned(self.staging.id, manifest.version)
        ours = {self.layout.subvolume(path) for path in self.layout.deployments_of(manifest.version)}
        if self.context.running in ours:
            raise UpdateFailed(
                f"version {manifest.version} is the running deployment ({self.context.running}): it stays as it is"
            )
        self.names_free(manifest.version)
        self.needs_parent(manifest)

    def names_free(self, version: str) -> None:
        """The version's entry and kernel directory are no other root's. The ESP is vfat, which folds
        case, and `+` in an entry's name becomes `_`: two versions can meet in one name there, and the
        staging of one would overwrite, then on failure remove, the other's kernel or entry."""
        entries = self.context.entries
        wanted = update_entry_id(version).casefold()
        try:
            files = entries.entry_files()
        except BootConfigError:
            return  # no ESP: install says so
        for path in files:
            if version_deployed(entries.root_of(path)) == version:
                continue  # an earlier staging of this very version: replaced once this one is in
            kernels = {deployment_version(kernel.name).casefold() for kernel in entries.referenced_directories(path)}
            if entry_id(path.name).casefold() == wanted or version.casefold() in kernels:
                raise UpdateFailed(
                    f"version {version} would share its boot entry or kernel directory with {path.name}, which "
                    f"boots {entries.root_of(path) or 'another root'} (the ESP's names ignore case, and + is _ there)",
                    hint="give the new version a name of its own",
                )

    def needs_parent(self, manifest: Manifest) -> None:
        """What a delta needs of its parent: its image (unless this version is here already), and the
        kernel or initrd it keeps, on the ESP (even then: the deployment is made again)."""
        self.parents_files(manifest)
        if manifest.parent is None or self.layout.find_image(manifest.subvolume_uuid) is not None:
            return
        if self.layout.find_image(manifest.parent.uuid) is None:
            raise BundleError(
                "parent",
                f"this host does not have version {manifest.parent.version} (uuid {manifest.parent.uuid}) "
                "that the delta needs; stage the full bundle",
            )
        self.parents_files(manifest)

    def parents_files(self, manifest: Manifest) -> dict[str, Path]:
        """The ESP's copies of the parts a delta leaves to its parent (its kernel, its initrd)."""
        found = {}
        for name, part in manifest.parts.items():
            if not part.in_parent:
                continue
            path = self.context.entries.file_with(name, part.size, part.sha256)
            if path is None:
                raise BundleError(
                    "parent",
                    f"the delta keeps version {manifest.parent.version if manifest.parent else '?'}'s {name}, "
                    "which is not on this host's ESP; stage the full bundle",
                )
            found[name] = path
        return found

    @contextlib.contextmanager
    def named(self, path: Path) -> Iterator[None]:
        """Errors about the bundle name its source, not the descriptor it is read through."""
        try:
            yield
        except BundleError as error:
            message = error.message.replace(str(path), self.staging.source.shown)
            raise BundleError(error.reason, message, hint=error.hint) from None

    # 2. verify

    def verify(self, path: Path) -> Bundle:
        with self.named(path):
            bundle = Bundle(path, self.keys)
            total = sum(part.stored for part in bundle.manifest.parts.values())
            done = 0
            self.context.progress("verifying", done, total)
            for name in PARTS:
                for chunk in [] if bundle.manifest.parts[name].in_parent else bundle.chunks(name):
                    self.staging.check()
                    done += len(chunk)
                    self.context.progress("verifying", done, total)
        return bundle

    # 3. receive

    def image(self, bundle: Bundle) -> tuple[Path, bool]:
        """The image subvolume of the bundle's identity, and whether this staging received it."""
        manifest = bundle.manifest
        present = self.layout.find_image(manifest.subvolume_uuid)
        if present is not None:
            log.info("version %s is here already (%s): not received again", manifest.version, present.name)
            return present, False
        self.needs_parent(manifest)
        self.staging.check()
        # Recorded before the receive: a cut after btrfs marks the image complete but before a record
        # written after it would leave an image nothing knows was this staging's (reconcile.py).
        # (Not when another image holds the name: receive refuses it, and it is not this staging's.)
        if not (self.layout.images / manifest.subvolume_name).exists():
            self.context.received(self.staging.id, f"{IMAGES}/{manifest.subvolume_name}")
        with self.named(bundle.path):
            image = self.layout.receive(
                bundle, self.staging.cancelled, lambda done, total: self.context.progress("receiving", done, total)
            )
        failpoint("update-received")
        return image, True

    # 4. deploy

    def deploy(self, manifest: Manifest, image: Path) -> tuple[Path, dict[str, Any]]:
        self.staging.check()
        self.context.progress("reapplying", 0, 0)
        incoming = self.layout.make_deployment(image, self.staging.id)
        try:
            pristine = self.pristine_image()
            with self.context.run_lock:
                carried = self.context.prepare_deployment(incoming, self.context.root, pristine)
            self.staging.check()
            name = self.layout.new_deployment_name(manifest.version, self.staging.id)
            self.context.deploying(self.staging.id, f"{DEPLOYMENTS}/{name}")
            deployment = self.layout.place_deployment(incoming, name)
        except BaseException:
            self._undo("the new deployment", lambda: delete_subvolume(incoming))
            raise
        failpoint("update-deployed")
        return deployment, carried

    def pristine_image(self) -> Path | None:
        """The running version's image as it was built: what hand changes are told from."""
        wanted = image_identity(self.context.root)
        return None if wanted is None else self.layout.find_image(wanted)

    # 5. install

    def install(self, bundle: Bundle, deployment: Path) -> tuple[str, str]:
        """The deployment's kernel and initrd in /TOKEN/NAME/ on the ESP, then its entry; returns the
        entry's id and the token."""
        self.staging.check()
        version = bundle.manifest.version
        entries = self.context.entries
        sizes = bundle.manifest.parts
        total = sizes["linux"].size + sizes["initrd"].size
        kept = self.parents_files(bundle.manifest)
        self.context.progress("installing", 0, total)
        try:
            configured = Root(self.context.root).read_text(ENTRY_TOKEN_FILE, links=Links.SYSTEM)
        except (UnsafePath, OSError):
            configured = None  # only wanted when the running entry does not say it
        token = entries.entry_token(self.context.running, configured)
        try:
            with self.named(bundle.path):
                template = self.template(bundle)
                done = [0]
                sources = {
                    name: _checked_file(kept[name], sizes[name]) if name in kept else bundle.chunks(name)
                    for name in ("linux", "initrd")
                }
                files = {name: self.counted(chunks, done, total) for name, chunks in sources.items()}
                entries.install_kernel(token, deployment.name, files)
            failpoint("update-kernel-written")
            self.staging.check()  # the last point a Cancel() reaches: after it the entry is written
            kernel = PurePosixPath("/", token, deployment.name)
            entry = entries.add_for_update(
                version, template, kernel, self.layout.subvolume(deployment), self.context.running
            )
        except BaseException:
            self._undo("the kernel", lambda: entries.drop_kernel_directory(token, deployment.name))
            raise
        failpoint("update-entry-written")
        return entry, token

    # 6. retire

    def retire_earlier(self, version: str, deployment: Path, token: str) -> list[str]:
        """The version's earlier deployments, now that the new one's entry stands in for theirs. The
        staging is staged already: a failure here is logged, and the next start finishes it."""
        retired = []
        for earlier in self.layout.deployments_of(version):
            subvolume = self.layout.subvolume(earlier)
            if earlier == deployment or subvolume == self.context.running:
                continue
            try:
                remove_deployment(self.layout, self.context.entries, earlier, token)
            except (OSError, btrfsutil.BtrfsUtilError, BootConfigError) as error:
                log.error("could not remove %s, which %s replaces (the next start does): %s", subvolume,
                          self.layout.subvolume(deployment), error)  # fmt: skip
                continue
            log.info("removed %s: %s replaces it", subvolume, self.layout.subvolume(deployment))
            retired.append(subvolume)
        return retired

    def counted(self, chunks: Iterable[bytes], done: list[int], total: int) -> Iterator[bytes]:
        for chunk in chunks:
            self.staging.check()
            done[0] += len(chunk)
            self.context.progress("installing", done[0], total)
            yield chunk

    @staticmethod
    def template(bundle: Bundle) -> str:
        try:
            return bundle.read_part("entry.conf", MAX_TEMPLATE).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError("format", "entry.conf: not UTF-8 text") from None


def _checked_file(path: Path, part: Part) -> Iterator[bytes]:
    """A file's bytes, checked against the part they stand for once read (the ESP is not ours alone)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            yield chunk
    if digest.hexdigest() != part.sha256:
        raise BundleError("parent", f"{path} changed while it was copied: stage the full bundle")
