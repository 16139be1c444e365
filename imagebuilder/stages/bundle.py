"""Stage `bundle`: the version as update bundles (rastos/bundle.py, docs/updates.md): the full one,
`rastos-PROFILE-VERSION.rbundle`, and with `--delta-from` the delta from that version,
`rastos-PROFILE-VERSION-from-PARENT.rbundle`, both signed and written to the staging directory.

`open_parent` checks a `--delta-from` bundle before any work starts: signed by the key this build
signs with, a full bundle (a delta of a delta would need the whole chain on every host), of this
profile, of another version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from imagebuilder.context import BuildContext
from imagebuilder.profile.model import MiB
from rastos import __version__
from rastos.bundle import (
    PROFILE,
    REUSABLE,
    SUFFIX,
    Bundle,
    BundleError,
    Manifest,
    Parent,
    SigningKey,
    load_public_key,
    write_bundle,
)
from rastos.errors import RastosError

# What the host fills in itself: its own root file system, and the subvolume of the deployment.
HOST_OPTIONS = ("root=", "rootflags=subvol=")


def check_names(profile: str) -> None:
    """A profile's name names its bundles and root subvolumes: the format allows fewer than a file name."""
    if not PROFILE.match(profile):
        raise RastosError(
            f"profile {profile!r} cannot name an update bundle",
            hint="name the profile's file with lower-case letters, digits, - and _ (a letter or digit first)",
        )


def open_parent(path: Path, key: SigningKey, profile: str, version: str) -> Bundle:
    option = f"--delta-from {path}"
    if not path.is_file():
        raise RastosError(f"{option}: no such file", hint="give the full bundle (.rbundle) of an earlier build")
    trusted = dict([load_public_key(key.public_pem(), "the signing key")])
    try:
        bundle = Bundle(path, trusted)
    except BundleError as error:
        if error.reason == "untrusted":
            raise RastosError(
                f"{option}: the bundle is not signed by the key this build signs with ({key.id})",
                hint="sign with the key that signed it (--signing-key PATH), or build without --delta-from",
            ) from None
        raise RastosError(f"{option}: {error.message}", hint=error.hint) from None
    manifest = bundle.manifest
    if manifest.parent is not None:
        raise RastosError(
            f"{option}: the bundle is a delta (from version {manifest.parent.version}), not a full bundle",
            hint=f"give the full bundle of version {manifest.version}: a delta of a delta would need every host "
            "to hold the whole chain",
        )
    if manifest.profile != profile:
        raise RastosError(
            f"{option}: the bundle is of profile {manifest.profile}, this build is of {profile}",
            hint="a delta is made from an earlier version of the same profile",
        )
    if manifest.version == version:
        raise RastosError(
            f"{option}: the bundle is of version {version}, the version this build makes",
            hint="give this build a version of its own (--image-version, or the profile's `version`)",
        )
    return bundle


def entry_template(ctx: BuildContext) -> str:
    """entry.conf: the boot entry a host writes for the version, less what only the host knows (its
    root file system, the deployment's subvolume, where it puts the kernel and initrd)."""
    options = [option for option in ctx.cmdline if not option.startswith(HOST_OPTIONS)]
    return f"title      rastOS {ctx.profile.name} {ctx.version}\noptions    {' '.join(options)}\n"


def manifest(ctx: BuildContext) -> Manifest:
    assert ctx.kernel is not None
    return Manifest(
        profile=ctx.profile.name,
        version=ctx.version,
        built_at=ctx.built_at.isoformat(timespec="seconds"),
        rastos_version=__version__,
        kernel_version=ctx.kernel.version,
        subvolume_name=ctx.subvolume_name,
        subvolume_uuid=ctx.subvolume_uuid,
        parent=None,
        packages=tuple((package["name"], package["version"]) for package in ctx.packages),
    )


def write_bundles(ctx: BuildContext) -> str:
    assert ctx.kernel is not None and ctx.signing_key is not None
    entry = ctx.work_dir / "entry.conf"
    entry.write_text(entry_template(ctx))
    # The ESP's own, which the image boots: the same bytes a host installs for the version.
    kernel_dir = ctx.esp_tree / ctx.entry_token / ctx.kernel.version
    parts = {"entry.conf": entry, "linux": kernel_dir / "linux", "initrd": kernel_dir / "initrd"}
    full = ctx.staging_dir / f"{ctx.subvolume_name}{SUFFIX}"
    whole = manifest(ctx)
    written = write_bundle(full, whole, ctx.signing_key, {**parts, "root.btrfs.zst": ctx.root_stream})
    ctx.bundles["bundle"] = full
    note = f"{full.name} {_mib(full)}"
    if ctx.parent is not None:
        parent = ctx.parent.manifest
        delta = ctx.staging_dir / f"{ctx.subvolume_name}-from-{parent.version}{SUFFIX}"
        from_parent = dataclasses.replace(whole, parent=Parent(parent.version, parent.subvolume_uuid))
        # A kernel or initrd the parent has byte for byte stays out: hosts install it from their ESP.
        kept = frozenset(name for name in REUSABLE if parent.parts[name].sha256 == written.parts[name].sha256)
        write_bundle(delta, from_parent, ctx.signing_key, {**parts, "root.btrfs.zst": ctx.delta_stream},
                     in_parent=kept)  # fmt: skip
        ctx.bundles["delta"] = delta
        note += f", {delta.name} {_mib(delta)}"
    return f"{note}, signed by key {ctx.signing_key.id}"


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / MiB:.1f} MiB"
