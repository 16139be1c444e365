"""The bundle format: signing, verification, and what a damaged or hostile bundle gets."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rastos import bundle
from rastos.bundle import Bundle, BundleError, Manifest, SigningKey
from rastos.errors import RastosError

Keys = tuple[SigningKey, dict[str, Any]]
UUID = "8ca33ea5-a651-8442-9b49-844d82d7ac80"


def manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = dict(
        profile="minimal",
        version="2",
        built_at="2026-12-05T07:00:00+00:00",
        rastos_version="0.1.0",
        kernel_version="6.12.48+deb13-amd64",
        subvolume_name="rastos-minimal-2",
        subvolume_uuid=UUID,
        parent=None,
        packages=(("bash", "5.2.37-2"), ("systemd", "257.9-1")),
    )
    return Manifest(**{**fields, **changes})


@pytest.fixture
def key(tmp_path: Path) -> tuple[SigningKey, dict[str, Any]]:
    public, key_id = bundle.generate_key(tmp_path / "signing-key")
    return SigningKey.load(tmp_path / "signing-key"), {key_id: bundle.load_public_key(public.read_bytes(), "k")[1]}


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    made = {}
    for name in bundle.PARTS:
        path = tmp_path / "parts" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(3000) if name != "entry.conf" else b"title rastOS\noptions rw\n")
        made[name] = path
    return made


def write(tmp_path: Path, key: SigningKey, parts: dict[str, Path], **changes: Any) -> Path:
    path = tmp_path / "b.rbundle"
    bundle.write_bundle(path, manifest(**changes), key, parts)
    return path


def test_a_written_bundle_verifies_and_its_parts_read_back(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    path = write(tmp_path, key[0], parts)
    opened = Bundle(path, key[1])
    opened.check_parts()
    assert opened.key == key[0].id
    assert opened.manifest == Manifest.from_bytes(opened.manifest.to_bytes())
    assert opened.read_part("linux") == parts["linux"].read_bytes()
    assert opened.manifest.parts["root.btrfs.zst"].size == 3000
    with tarfile.open(path) as tar:
        assert tar.getnames() == list(bundle.MEMBERS), "the manifest and its signature come first"


def test_the_head_is_read_from_the_first_bytes_alone(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    """A download is checked as soon as its head has arrived, long before the root stream."""
    path = write(tmp_path, key[0], parts)
    with path.open("rb") as file:
        head = bundle.read_head(file)
    cut = tmp_path / "cut.rbundle"
    cut.write_bytes(path.read_bytes()[: head.offsets[bundle.SIGNATURE] + 512])
    with cut.open("rb") as file:
        assert bundle.verify_signature(head.manifest_bytes, bundle.read_head(file).signature, key[1]) == key[0].id
    with pytest.raises(BundleError, match="cut short") as refused:
        Bundle(cut, key[1])
    assert refused.value.reason == "corrupt"


def test_a_changed_manifest_byte_breaks_the_signature(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    path = write(tmp_path, key[0], parts)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"version": "2"') + len('"version": "')
    raw[at] = ord("3")
    path.write_bytes(raw)
    with pytest.raises(BundleError, match="does not match") as refused:
        Bundle(path, key[1])
    assert refused.value.reason == "signature"


def test_a_changed_part_byte_is_found_before_use(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    path = write(tmp_path, key[0], parts)
    offsets = bundle.part_offsets(path)
    raw = bytearray(path.read_bytes())
    raw[offsets["root.btrfs.zst"][0] + 100] ^= 0xFF
    path.write_bytes(raw)
    opened = Bundle(path, key[1])  # the manifest is intact
    with pytest.raises(BundleError, match=r"root\.btrfs\.zst does not match its sha256") as refused:
        opened.check_parts()
    assert refused.value.reason == "corrupt"


def test_a_key_the_host_does_not_trust_is_named(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    path = write(tmp_path, key[0], parts)
    other_public, other_id = bundle.generate_key(tmp_path / "other")
    others = {other_id: bundle.load_public_key(other_public.read_bytes(), "o")[1]}
    with pytest.raises(BundleError, match=f"signed by key {key[0].id}, which this host does not trust") as refused:
        Bundle(path, others)
    assert refused.value.reason == "untrusted"
    with pytest.raises(BundleError, match="no update key is trusted"):
        Bundle(path, {})


@pytest.mark.root
def test_trusted_keys_are_root_owned_files_not_links(tmp_path: Path, key: Keys) -> None:
    keys = tmp_path / "update-keys.d"
    keys.mkdir()
    public, key_id = bundle.generate_key(tmp_path / "good")
    (keys / "good.pub").write_bytes(public.read_bytes())
    planted, _ = bundle.generate_key(tmp_path / "planted")
    (keys / "link.pub").symlink_to(planted)
    (keys / "nobody.pub").write_bytes(planted.read_bytes())
    os.chown(keys / "nobody.pub", 65534, 65534)
    (keys / "writable.pub").write_bytes(planted.read_bytes())
    (keys / "writable.pub").chmod(0o666)
    (keys / "not-a-key.pub").write_text("hello\n")
    assert set(bundle.trusted_keys(keys)) == {key_id}
    assert bundle.trusted_keys(tmp_path / "missing") == {}


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    bundle.generate_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(RastosError, match="exists already"):
        bundle.generate_key(tmp_path / "k")


def test_a_delta_names_its_parent(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    path = write(tmp_path, key[0], parts, parent=bundle.Parent("1", "047336d3-139a-dd4c-9c05-54d68f0a5ff8"))
    opened = Bundle(path, key[1])
    assert opened.manifest.delta and opened.manifest.parent == bundle.Parent(
        "1", "047336d3-139a-dd4c-9c05-54d68f0a5ff8"
    )


def test_a_tar_that_is_not_a_bundle_is_refused(tmp_path: Path, key: Keys) -> None:
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(__file__, arcname="etc/passwd")
    with pytest.raises(BundleError, match="not a rastOS bundle"):
        Bundle(path, key[1])
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BundleError, match="not a rastOS bundle"):
        Bundle(tmp_path / "empty", key[1])


VALID = json.loads(manifest(parts={n: bundle.Part(n, 1, "0" * 64) for n in bundle.PARTS}).to_bytes())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for name, child in value.items():
            found += _paths(child, (*prefix, name))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_paths(VALID)), value=json_values)
def test_any_one_bad_field_is_named(path: tuple[Any, ...], value: Any) -> None:
    """Whatever one field of a valid manifest becomes, the reader either accepts it or names a field
    on the way to it; it never fails otherwise."""
    data = json.loads(json.dumps(VALID))
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    try:
        Manifest.from_dict(data)
    except BundleError as error:
        assert str(error).startswith(f"manifest.{path[0]}"), (path, error)


def test_a_delta_can_leave_its_parents_kernel_out(tmp_path: Path, key: Keys, parts: dict[str, Path]) -> None:
    """The kernel a delta keeps is described (size, sha256) but not stored; the host has it."""
    parent = bundle.Parent("1", "047336d3-139a-dd4c-9c05-54d68f0a5ff8")
    path = tmp_path / "delta.rbundle"
    written = bundle.write_bundle(path, manifest(parent=parent), key[0], parts, in_parent=frozenset({"linux"}))
    opened = Bundle(path, key[1])
    opened.check_parts()
    linux = opened.manifest.parts["linux"]
    assert linux.in_parent and linux == written.parts["linux"]
    assert (linux.size, linux.stored) == (3000, 0) and bundle.part_offsets(path)["linux"][1] == 0
    assert linux.sha256 == bundle.file_sha256(parts["linux"])[1]
    with pytest.raises(BundleError, match="the host has it"):
        opened.read_part("linux")
    with pytest.raises(RastosError, match="only a delta's linux or initrd"):
        bundle.write_bundle(path, manifest(), key[0], parts, in_parent=frozenset({"linux"}))
    with pytest.raises(RastosError, match="only a delta's linux or initrd"):
        bundle.write_bundle(path, manifest(parent=parent), key[0], parts, in_parent=frozenset({"root.btrfs.zst"}))
    data = json.loads(opened.manifest.to_bytes())
    data["parent"] = None
    with pytest.raises(BundleError, match=r"manifest\.parts\.linux\.in_parent: only a delta's"):
        Manifest.from_dict(data)
