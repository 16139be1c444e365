"""The builder's half of image updates (docs/updates.md): signing keys, and two real builds of
`minimal` whose bundles verify, whose image holds its version's received root, and whose delta
applies where the first version is and nowhere else."""

from __future__ import annotations

import contextlib
import json
import logging
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from imagebuilder import cli
from imagebuilder.keys import host_key
from imagebuilder.profile.load import PROFILE_DIR
from rastos.bundle import Bundle, Manifest, SigningKey, load_public_key, trusted_keys, write_bundle
from tests.conftest import CACHE_DIR, BuildRun, build, host_state, rastos_image, require_root
from tests.test_build import leftovers, manifest_of

# The builds share the bootstrap cache with test_build's, on one xdist worker.
BUILDS = (pytest.mark.root, pytest.mark.network, pytest.mark.slow, pytest.mark.xdist_group("image-build"))
Test = TypeVar("Test", bound=Callable[..., None])
STREAM = "root.btrfs.zst"
ADDED = "hello"  # one small package, with no dependency minimal lacks


def with_builds(test: Test) -> Test:
    for mark in BUILDS:
        test = mark(test)
    return test


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def test_key_generate_makes_a_pair_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "signing"
    assert cli.main(["key", "generate", str(path)]) == 0
    printed = capsys.readouterr().out
    public = path.with_name("signing.pub")
    identifier, _ = load_public_key(public.read_bytes(), str(public))
    assert f"public key: {public}\n" in printed and f"key id: {identifier}\n" in printed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).id == identifier
    assert SigningKey.load(path).public_pem() == public.read_bytes()

    before = path.read_bytes()
    assert cli.main(["key", "generate", str(path)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert cli.main(["key", "generate", str(tmp_path / "no-such-dir" / "k")]) == 1
    assert "cannot write the key" in capsys.readouterr().err


def test_an_image_version_is_checked_as_a_bundle_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parser().parse_args(["build", "--image-version", "2.1+rc1"]).image_version == "2.1+rc1"
    for wrong in ("two words", "-1", "x" * 65):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["build", "--image-version", wrong])
        assert "is not a valid image version" in capsys.readouterr().err


def test_the_host_key_is_made_on_first_use_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rastos.build")
    path = tmp_path / "var/lib/rastos-image/signing-key"
    made = host_key(path)
    assert f"made this build host's signing key {path} (id {made.id})" in caplog.text
    caplog.clear()
    path.with_name("signing-key.pub").unlink()  # the public half lost: written again from the private one
    assert host_key(path).id == made.id and caplog.text == ""
    identifier, _ = load_public_key(path.with_name("signing-key.pub").read_bytes(), "pub")
    assert identifier == made.id


@dataclass(frozen=True)
class Versions:
    """Version 1 of `minimal` and version 2, with one package more, as a delta from 1, signed alike."""

    key: Path
    first: BuildRun
    second: BuildRun
    second_stdout: str
    profiles: Path

    def bundle(self, run: BuildRun, kind: str = "bundle") -> Path:
        return run.output_dir / str(manifest_of(run)["outputs"][kind]["file"])

    def trusted(self) -> dict[str, Any]:
        return dict([load_public_key(self.key.with_name(self.key.name + ".pub").read_bytes(), "key")])


def minimal_profile(directory: Path, packages: tuple[str, ...] = ()) -> Path:
    """The shipped minimal under its own name (a delta is of one profile), with a raw image to read."""
    text = (PROFILE_DIR / "minimal.toml").read_text()
    text = text.replace("[disk]\n", '[disk]\nformats = ["raw", "qcow2"]\n', 1)
    text = text.replace("[packages]\n", f"[packages]\ninclude = {json.dumps(list(packages))}\n", 1)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "minimal.toml"
    path.write_text(text)
    return path


# Session-wide: xdist interleaves this module's tests with test_build's on their worker, and a
# module's fixture would be made again each time the worker came back to the module.
@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Versions]:
    require_root()
    top = tmp_path_factory.mktemp("versions")
    key = top / "signing-key"
    assert rastos_image("key", "generate", key).returncode == 0
    first = build(minimal_profile(top / "v1"), top / "out1", "--image-version", "1", "--signing-key", str(key))
    assert first.returncode == 0, first.stderr
    old = first.output_dir / "rastos-minimal-1.rbundle"
    second = rastos_image(
        "build", minimal_profile(top / "v2", (ADDED,)), "--output-dir", top / "out2", "--image-version", "2",
        "--signing-key", key, "--delta-from", old, "--cache-dir", CACHE_DIR,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    yield Versions(key, first, BuildRun(0, [], second.stderr, top / "out2"), second.stdout, top)


@contextlib.contextmanager
def mounted(image: Path, where: Path, *options: str) -> Iterator[Path]:
    """A btrfs file (or a partition of a disk file, with offset= and sizelimit=), top level mounted."""
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "btrfs", "-o", ",".join(["loop", "subvolid=5", *options]), image, where)
    try:
        yield where
    finally:
        run("umount", where)


def subvolume(path: Path) -> dict[str, str]:
    shown = run("btrfs", "subvolume", "show", path).stdout.splitlines()[1:]
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in shown)}


def root_partition(build_run: BuildRun) -> tuple[Path, int, int]:
    manifest = manifest_of(build_run)
    root = manifest["disk"]["partitions"][1]
    return build_run.output_dir / manifest["outputs"]["raw"]["file"], root["start"], root["size"]


@with_builds
def test_a_build_writes_a_signed_bundle_whose_parts_check(versions: Versions) -> None:
    manifest = manifest_of(versions.first)
    path = versions.bundle(versions.first)
    assert path.name == "rastos-minimal-1.rbundle"
    output = manifest["outputs"]["bundle"]
    assert output["size"] == path.stat().st_size
    assert output["sha256"] == run("sha256sum", path).stdout.split()[0]
    bundle = Bundle(path, versions.trusted())
    bundle.check_parts()
    signed = bundle.manifest
    assert (signed.profile, signed.version, signed.parent) == ("minimal", "1", None)
    assert (signed.subvolume_name, signed.subvolume_uuid) == (
        manifest["subvolume"]["name"],
        manifest["subvolume"]["uuid"],
    )
    assert signed.subvolume_name == "rastos-minimal-1"
    assert signed.kernel_version == manifest["kernel"]["version"]
    assert list(signed.packages) == [(p["name"], p["version"]) for p in manifest["packages"]]
    entry = bundle.read_part("entry.conf").decode()
    assert entry.startswith("title      rastOS minimal 1\noptions    ")
    options = entry.splitlines()[1].split()[1:]
    assert options == [o for o in manifest["kernel"]["cmdline"] if not o.startswith(("root=", "rootflags=subvol="))]
    assert "linux" not in entry and "initrd" not in entry
    assert run("tar", "tf", path).stdout.split() == ["manifest.json", "manifest.sig", "entry.conf", "linux",
                                                      "initrd", STREAM]  # fmt: skip


@with_builds
def test_the_image_root_is_the_version_made_in_place_and_a_writable_snapshot_of_it(
    versions: Versions, tmp_path: Path
) -> None:
    manifest = manifest_of(versions.first)
    bundle = Bundle(versions.bundle(versions.first), versions.trusted())
    identity = manifest["subvolume"]
    raw, start, size = root_partition(versions.first)
    with mounted(raw, tmp_path / "top", "ro", f"offset={start}", f"sizelimit={size}") as top:
        image = subvolume(top / "@images" / identity["name"])
        # Made here and sent from here: its own UUID is the version's identity, nothing was received.
        assert image["UUID"] == identity["uuid"] == bundle.manifest.subvolume_uuid
        assert image["Received UUID"] == "-" and image["Flags"] == "readonly"
        root = subvolume(top / "@")
        assert root["Parent UUID"] == image["UUID"] and root["Flags"] == "-"
        assert run("btrfs", "subvolume", "get-default", top).stdout.split()[-1] == "@"
        info = json.loads((top / "@/usr/lib/rastos/image.json").read_text())
        assert info == {"profile": "minimal", "version": "1", "subvolume": identity}
        keys = top / "@/etc/rastos/update-keys.d"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o755
        public = keys / f"{bundle.key}.pub"
        assert public.read_bytes() == versions.key.with_name("signing-key.pub").read_bytes()
        assert (public.stat().st_uid, stat.S_IMODE(public.stat().st_mode)) == (0, 0o644)
        assert list(trusted_keys(keys)) == [bundle.key]  # as rastosd reads them on the host
        kernel = top / f"@/boot/vmlinuz-{bundle.manifest.kernel_version}"
        assert kernel.read_bytes() == bundle.read_part("linux", limit=64 << 20)


@with_builds
def test_a_delta_applies_where_its_parent_is_and_only_there(versions: Versions, tmp_path: Path) -> None:
    first, second = manifest_of(versions.first), manifest_of(versions.second)
    full = Bundle(versions.bundle(versions.second), versions.trusted())
    delta_path = versions.bundle(versions.second, "delta")
    assert delta_path.name == "rastos-minimal-2-from-1.rbundle"
    assert f"delta: {delta_path} (" in versions.second_stdout
    assert "MiB), for hosts that run version 1\n" in versions.second_stdout
    delta = Bundle(delta_path, versions.trusted())
    delta.check_parts()
    assert delta.manifest.parent is not None
    assert (delta.manifest.parent.version, delta.manifest.parent.uuid) == ("1", first["subvolume"]["uuid"])
    # One identity per version: the full and the delta stream are sent from the same subvolume.
    assert delta.manifest.subvolume_uuid == full.manifest.subvolume_uuid == second["subvolume"]["uuid"]
    assert second["delta_from"] == {"version": "1", "uuid": first["subvolume"]["uuid"]}
    assert delta.manifest.parts[STREAM].size < full.manifest.parts[STREAM].size / 5
    stream = tmp_path / STREAM
    stream.write_bytes(b"".join(delta.chunks(STREAM)))

    # A host made from version 1: a copy of its image's root file system.
    raw, start, size = root_partition(versions.first)
    host = tmp_path / "host.btrfs"
    run("dd", f"if={raw}", f"of={host}", "bs=1M", "iflag=skip_bytes,count_bytes", f"skip={start}", f"count={size}",
        "conv=sparse", "status=none")  # fmt: skip
    with mounted(host, tmp_path / "host") as top:
        receive(stream, top / "@images")
        received = top / "@images/rastos-minimal-2"
        assert subvolume(received)["Received UUID"] == second["subvolume"]["uuid"]
        assert (received / "usr/bin" / ADDED).is_file() and not (top / "@/usr/bin" / ADDED).exists()
        assert json.loads((received / "usr/lib/rastos/image.json").read_text())["version"] == "2"

    elsewhere = tmp_path / "elsewhere.btrfs"
    with elsewhere.open("wb") as file:
        file.truncate(1 << 30)
    run("mkfs.btrfs", "--quiet", elsewhere)
    with mounted(elsewhere, tmp_path / "elsewhere") as top, pytest.raises(subprocess.CalledProcessError) as failed:
        receive(stream, top)
    assert f"cannot find parent subvolume {first['subvolume']['uuid']}" in failed.value.stderr


def receive(stream: Path, directory: Path) -> None:
    with subprocess.Popen(["zstd", "-d", "-c", "-q", stream], stdout=subprocess.PIPE) as unpack:
        run_receive = subprocess.run(["btrfs", "receive", directory], stdin=unpack.stdout, capture_output=True,
                                     text=True, check=False)  # fmt: skip
    run_receive.check_returncode()


@with_builds
def test_delta_from_takes_only_a_full_bundle_of_this_profile_signed_by_this_key(
    versions: Versions, tmp_path: Path
) -> None:
    """Each refused before any work: no output directory, nothing built."""
    old = versions.bundle(versions.first)
    other_key = tmp_path / "other-key"
    assert rastos_image("key", "generate", other_key).returncode == 0
    profile, key = versions.profiles / "v2/minimal.toml", str(versions.key)
    renamed = minimal_profile(tmp_path / "renamed").rename(tmp_path / "renamed/other.toml")
    cases = [
        (profile, ["--signing-key", str(other_key), "--delta-from", str(old)],
         "not signed by the key this build signs with", "--signing-key"),
        (profile, ["--signing-key", key, "--delta-from", str(versions.bundle(versions.second, "delta"))],
         "is a delta (from version 1), not a full bundle", "give the full bundle of version 2"),
        (renamed, ["--signing-key", key, "--delta-from", str(old)],
         "the bundle is of profile minimal, this build is of other", "same profile"),
        (profile, ["--signing-key", key, "--delta-from", str(old), "--image-version", "1"],
         "the bundle is of version 1", "--image-version"),
    ]  # fmt: skip
    for index, (path, extra, problem, hint) in enumerate(cases):
        out = tmp_path / f"out{index}"
        refused = rastos_image("build", path, "--output-dir", out, *extra)
        assert refused.returncode == 1, refused.stderr
        assert problem in refused.stderr and "hint: " in refused.stderr and hint in refused.stderr, refused.stderr
        assert "--delta-from" in refused.stderr
        assert not out.exists()


@with_builds
def test_a_delta_from_a_stream_btrfs_refuses_fails_and_leaves_nothing(
    versions: Versions, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Signed by the right key, but its root stream is no send stream: the build fails inside the
    mounted scratch file system, and leaves no mount, loop device or file behind."""
    parts = {name: tmp_path / name for name in ("entry.conf", "linux", "initrd")}
    for path in parts.values():
        path.write_text("x\n")
    (tmp_path / "garbage").write_bytes(uuid.uuid4().bytes * 4096)
    run("zstd", "-q", tmp_path / "garbage", "-o", tmp_path / STREAM)
    forged = tmp_path / "rastos-minimal-0.rbundle"
    manifest = Manifest("minimal", "0", "2026-01-01T00:00:00+00:00", "0", "6.12", "rastos-minimal-0",
                        str(uuid.uuid4()), None, ())  # fmt: skip
    write_bundle(forged, manifest, SigningKey.load(versions.key), {**parts, STREAM: tmp_path / STREAM})
    before = host_state(tmp_path_factory)
    failed = build(versions.profiles / "v2/minimal.toml", tmp_path / "out", "--image-version", "3",
                   "--signing-key", str(versions.key), "--delta-from", str(forged))  # fmt: skip
    assert failed.returncode == 1
    assert [e["stage"] for e in failed.events if e["event"] == "stage-failed"] == ["root"]
    assert "the --delta-from bundle's root stream cannot be received" in failed.stderr
    assert "hint: give the full bundle of an earlier build" in failed.stderr
    assert leftovers(tmp_path / "out") == []
    assert host_state(tmp_path_factory) == before
