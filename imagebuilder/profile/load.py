"""Read profiles from TOML: resolve `extends`, merge, check every key and value, build a `Profile`.

Every error names the file that set the offending key, the key, and the reason, and is raised before
any build work starts. Unknown keys are errors, not warnings: a typo must not silently do nothing.

Merging: tables merge key by key; a child's scalar or list replaces its parent's, except for fields
marked `merge="append"` (packages, kernel arguments, sysctl, users, ...), which add to the parent's.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagebuilder.profile.merge import Origins, ProfileError, build, merge_table, plain
from imagebuilder.profile.model import DistributionName, InitramfsModules, MiB, Profile, format_size
from rastos.errors import RastosError

log = logging.getLogger("rastos.profile")
PROFILE_DIR = Path(__file__).resolve().parents[2] / "profiles"
MAX_EXTENDS_DEPTH = 16


def available_profiles(directory: Path = PROFILE_DIR) -> list[Path]:
    return sorted(directory.glob("*.toml"))


def load_profile(name_or_path: str | Path, directory: Path = PROFILE_DIR) -> Profile:
    """Load a profile by name (from `directory`) or by path to a .toml file."""
    path = _locate(str(name_or_path), directory)
    chain = _read_chain(path, directory)
    merged: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    for source, raw in chain:
        merge_table(Profile, merged, raw, source, "", origins)
    merged["name"] = path.stem
    merged["sources"] = [str(p) for p, _ in chain]
    origins["name"] = path
    origins["sources"] = path
    found = Origins(origins, path)
    profile: Profile = build(Profile, merged, "", found)
    profile = _resolve_desired_state(profile, found)
    profile = _resolve_hub_ca(profile, found)
    profile = _resolve_distribution(profile, found)
    _check_kernel_build(profile, found)
    _check_whole(profile, found)
    return profile


def _resolve_desired_state(profile: Profile, origins: Origins) -> Profile:
    """The rastos.toml a profile names, found beside the file that named it and checked now, so a wrong
    step fails before any build work (its error names the file and the key)."""
    if not profile.system.desired_state:
        return profile
    named_in = origins.of("system.desired_state")
    path = (named_in.parent / profile.system.desired_state).resolve()
    from ops.declared import desired_state_steps

    try:
        declared = desired_state_steps(path)
    except RastosError as error:
        raise ProfileError(f"{named_in}: key 'system.desired_state': {error}") from None
    from imagebuilder.profile.host import overlaps

    if twice := overlaps(profile, declared):
        log.warning("%s: key 'system.desired_state': %s sets %s again, which the profile's own keys set; the desired "
                    "state is applied last and wins", named_in, path.name, ", ".join(twice))  # fmt: skip
    system = dataclasses.replace(profile.system, desired_state=str(path))
    return dataclasses.replace(profile, system=system)


def _resolve_hub_ca(profile: Profile, origins: Origins) -> Profile:
    """The hub's CA file, found beside the profile that named it and checked now: certificates in PEM,
    none expired, and a wss:// hub to check (a ws:// hub has no certificate)."""
    if not profile.hub.ca:
        return profile
    named_in = origins.of("hub.ca")
    if not profile.hub.url or not profile.hub.url[0].startswith("wss://"):  # all are of one scheme
        shown = ", ".join(profile.hub.url) or "none"
        raise ProfileError(f"{named_in}: key 'hub.ca': needs a wss:// hub.url, got {shown}")
    path = (named_in.parent / profile.hub.ca).resolve()
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as error:
        raise ProfileError(f"{named_in}: key 'hub.ca': cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise ProfileError(f"{named_in}: key 'hub.ca': {path} holds no PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    for certificate in certificates:
        if certificate.not_valid_after_utc <= now:
            raise ProfileError(f"{named_in}: key 'hub.ca': the certificate {certificate.subject.rfc4514_string()} "
                               f"in {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")  # fmt: skip
    return dataclasses.replace(profile, hub=dataclasses.replace(profile.hub, ca=str(path)))


def _check_kernel_build(profile: Profile, origins: Origins) -> None:
    """A kernel profile named is loaded now, and its features checked, so a typo fails before the build."""
    kernel = profile.kernel
    if not kernel.build:
        if kernel.features:
            raise ProfileError(f"{origins.of('kernel.features')}: key 'kernel.features': needs kernel.build")
        return
    from imagebuilder.kernel import profile as kernel_profiles

    try:
        built = kernel_profiles.load(kernel.build)
    except RastosError as error:
        raise ProfileError(f"{origins.of('kernel.build')}: key 'kernel.build': {error}") from None
    for index, feature in enumerate(kernel.features):
        if feature not in built.features:
            known = ", ".join(sorted(built.features)) or "none"
            raise ProfileError(
                f"{origins.of('kernel.features')}: key 'kernel.features[{index}]': kernel profile {built.name} "
                f"has no feature {feature!r}; it has: {known}"
            )


# --- each distribution's own keys -------------------------------------------------------------

ARCH_MIRROR = "https://geo.mirror.pkgbuild.com/$repo/os/$arch"
ARCH_REPOSITORIES = ("core", "extra")
ARCH_KERNEL = "linux"
_DEBIAN_ONLY = {
    "distribution.suite": "Arch Linux is a rolling release and has no suites: remove the key",
    "distribution.components": "archive components are Debian's; Arch's are distribution.repositories",
    "kernel.build": "builds from Debian's linux-source; an Arch image takes a kernel package (kernel.package)",
    "hub_server.enable": "the hub appliance is made of Debian's packages (PostgreSQL, the hub's Python libraries)",
}


def _resolve_distribution(profile: Profile, origins: Origins) -> Profile:
    """Refuses a key of the other distribution; fills Arch's defaults where no file set the key (an Arch
    profile resolves with an empty suite and no components, so `show` prints nothing of Debian's)."""
    d, given = profile.distribution, origins.by_key
    if d.name is DistributionName.debian:
        if "distribution.repositories" in given:
            problem = "Arch's; Debian's are distribution.components"
            raise _wrong_distribution(origins, "distribution.repositories", problem)
        if not d.components:
            raise _wrong_distribution(origins, "distribution.components", "must not be empty")
        if "$repo" in d.mirror or "$arch" in d.mirror:
            raise _wrong_distribution(origins, "distribution.mirror", "a pacman Server URL ($repo, $arch) is Arch's")
        for key, names in (
            ("packages.include", profile.packages.include),
            ("kernel.package", (profile.kernel.package,)),
        ):
            if unfit := [name for name in names if "_" in name or "@" in name]:
                problem = f"{', '.join(unfit)}: Debian's package names hold no _ or @ (Arch's may)"
                raise _wrong_distribution(origins, key, problem)
        for key in ("distribution.check_signatures", "distribution.keyring"):
            if key in given:
                problem = "Arch's; mmdebstrap always checks Debian's signatures against the suite's keyring"
                raise _wrong_distribution(origins, key, problem)
        return profile
    for key, problem in _DEBIAN_ONLY.items():
        if key in given:
            raise _wrong_distribution(origins, key, problem)
    if profile.kernel.initramfs is InitramfsModules.generic:
        problem = "'generic' is Debian's initramfs-tools; an Arch image boots rastOS's 'virtio' initrd (docs/arch.md)"
        raise _wrong_distribution(origins, "kernel.initramfs", problem)
    mirror = d.mirror if "distribution.mirror" in given else ARCH_MIRROR
    if "$repo" not in mirror:
        example = f"an Arch mirror is a pacman Server URL with $repo (and $arch), e.g. {ARCH_MIRROR}"
        raise _wrong_distribution(origins, "distribution.mirror", example)
    if "distribution.repositories" in given and not d.repositories:
        raise _wrong_distribution(origins, "distribution.repositories", "must not be empty")
    distribution = dataclasses.replace(
        d, suite="", mirror=mirror, components=(), repositories=d.repositories or ARCH_REPOSITORIES
    )
    kernel = profile.kernel
    if "kernel.package" not in given:
        kernel = dataclasses.replace(kernel, package=ARCH_KERNEL)
    return dataclasses.replace(profile, distribution=distribution, kernel=kernel)


def _wrong_distribution(origins: Origins, key: str, problem: str) -> ProfileError:
    source, named_in = origins.of(key), origins.of("distribution.name")
    hint = None
    if source != named_in:
        hint = f"{source.name} sets it for another distribution than {named_in.name} chooses: do not extend it"
    return ProfileError(f"{source}: key '{key}': {problem}", hint=hint)


def _check_whole(profile: Profile, origins: Origins) -> None:
    """Checks that span several keys; the error names the file of the key that must change."""
    if profile.disk.esp_size + 256 * MiB > profile.disk.size:
        raise ProfileError(
            f"{origins.of('disk.size')}: key 'disk.size': {format_size(profile.disk.size)} leaves less "
            f"than 256M for the root file system beside a {format_size(profile.disk.esp_size)} ESP"
        )
    names = [name for name, _ in profile.layout()]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        table = "hub_server" if duplicate in dict(profile.hub_server.layout()) else "btrfs"
        raise ProfileError(
            f"{origins.of(table)}: table '{table}': subvolume '{duplicate}' is named for two mount points"
        )
    users = [u.name for u in profile.users]
    if len(set(users)) != len(users):
        raise ProfileError(f"{origins.of('users')}: key 'users': a user is listed twice")


def _locate(name: str, directory: Path) -> Path:
    candidate = Path(name)
    if candidate.suffix == ".toml" or "/" in name:
        if not candidate.is_file():
            raise ProfileError(f"profile file {candidate} does not exist")
        return candidate.resolve()
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = [p.stem for p in available_profiles(directory)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known profiles: {', '.join(known)}"
        raise ProfileError(f"no profile named '{name}' in {directory}", hint=hint)
    return path.resolve()


def _find_parent(child: Path, parent: str, directory: Path) -> Path:
    """A parent is looked up beside its child first, then among the shipped profiles."""
    for folder in dict.fromkeys([child.parent, directory]):
        candidate = folder / f"{parent}.toml"
        if candidate.is_file():
            return candidate.resolve()
    raise ProfileError(f"{child}: key 'extends': no profile named '{parent}' in {child.parent} or {directory}")


def _read_chain(path: Path, directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The profile and its ancestors, the most distant ancestor first."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        if current in seen:
            cycle = " -> ".join(p.stem for p in [*seen, current])
            raise ProfileError(f"{path}: profiles extend each other in a cycle: {cycle}")
        if len(seen) >= MAX_EXTENDS_DEPTH:
            raise ProfileError(f"{path}: 'extends' chain is deeper than {MAX_EXTENDS_DEPTH}")
        seen.append(current)
        raw = _read_toml(current)
        chain.append((current, raw))
        parent = raw.get("extends")
        if parent is None:
            current = None
        elif not isinstance(parent, str) or not parent:
            raise ProfileError(f"{current}: key 'extends': expected a profile name, got {parent!r}")
        else:
            current = _find_parent(current, parent, directory)
    return list(reversed(chain))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot be read: {e.strerror}") from None


# --- serialising ------------------------------------------------------------------------------


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """The resolved profile as plain data (for `show`, the manifest and the JSON round-trip)."""
    return plain(profile)  # type: ignore[no-any-return]


def profile_from_dict(data: Mapping[str, Any], source: Path = Path("<json>")) -> Profile:
    """Rebuild a profile from `profile_to_dict` output, with the same checks as a TOML file."""
    return build(Profile, data, "", Origins({}, source))  # type: ignore[no-any-return]
