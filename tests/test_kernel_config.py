"""Kernel profiles: fragments merged on a base and the report of options that did not stick, first as
pure functions, then against Debian's real kernel source (Kconfig's own olddefconfig resolving them).
The build and boot of a kernel are in qemu-tests/test_kernel.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imagebuilder.kernel import config
from imagebuilder.kernel import profile as kernel_profiles
from imagebuilder.kernel.build import KernelRequest, build_kernel, configure
from imagebuilder.kernel.source import KernelSource, from_debian, from_tree, makefile_version
from imagebuilder.profile import ProfileError, load_profile
from imagebuilder.stages.bootstrap import mmdebstrap_argv, package_set
from rastos.errors import RastosError
from tests.conftest import CACHE_DIR, require_root

BASE = """#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
# CONFIG_VIRTIO_BLK is not set
CONFIG_NR_CPUS=8
CONFIG_LSM="yama"
"""


def test_parse_reads_set_unset_numbers_and_strings() -> None:
    assert config.parse(BASE) == {"64BIT": "y", "VIRTIO_BLK": "n", "NR_CPUS": "8", "LSM": '"yama"'}


def test_merge_replaces_in_place_appends_the_new_and_keeps_the_rest() -> None:
    merged = config.merge(BASE, {"VIRTIO_BLK": "y", "NR_CPUS": "64", "64BIT": "n", "IKCONFIG": "y"})
    lines = merged.splitlines()
    assert lines[:3] == BASE.splitlines()[:3], "comments kept"
    assert lines[3:7] == ["# CONFIG_64BIT is not set", "CONFIG_VIRTIO_BLK=y", "CONFIG_NR_CPUS=64", 'CONFIG_LSM="yama"']
    assert lines[7:] == ["CONFIG_IKCONFIG=y"], "a new option is appended once"
    assert config.parse(merged)["VIRTIO_BLK"] == "y"


def test_misses_name_each_option_that_did_not_stick() -> None:
    final = {"VIRTIO_BLK": "y", "BTRFS_FS": "m", "KASAN": "n", "NR_CPUS": "64"}
    wanted = {"VIRTIO_BLK": "m", "BTRFS_FS": "y", "KASAN": "y", "NR_CPUS": "64", "GONE": "y", "DEVMEM": "n"}
    found = config.misses(wanted, final)
    assert [str(miss) for miss in found] == [
        "CONFIG_BTRFS_FS: asked y, got m",
        "CONFIG_KASAN: asked y, got n",
        "CONFIG_GONE: asked y, got n",
    ], "m asked and y got is no miss; n asked and absent is no miss"


def write_profile(directory: Path, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.toml").write_text(text)


def test_profile_values_in_config_notation_and_extends_then_features(tmp_path: Path) -> None:
    write_profile(tmp_path, "parent", 'base = "defconfig"\n[options]\nA = "y"\nB = "m"\n[features.x]\nC = "y"\n')
    write_profile(
        tmp_path, "child", 'base = "defconfig"\nextends = ["parent"]\n[options]\nCONFIG_B = "n"\nN = 64\nS = "a,b"\n'
    )
    child = kernel_profiles.load("child", tmp_path)
    assert dict(child.options) == {"A": "y", "B": "n", "N": "64", "S": '"a,b"'}
    assert child.fragment(("x",)) == {**child.options, "C": "y"}
    with pytest.raises(RastosError, match="has no feature 'y'; it has: x"):
        child.fragment(("y",))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('base = "allyes"\n', "base: 'allyes' is not one of debian, defconfig, tinyconfig"),
        ('base = "defconfig"\nflavour = 1\n', "unknown key 'flavour'"),
        ('base = "defconfig"\n[options]\n"virtio-blk" = "y"\n', "options.virtio-blk: not a kernel option name"),
        ('base = "defconfig"\n[options]\nKASAN = true\n', 'options.KASAN: write "y" or "n", not true/false'),
        ('base = "defconfig"\n[options]\nCMDLINE = "a\\"b"\n', "options.CMDLINE: a string option may not hold"),
        ('base = "defconfig"\nextends = ["bad"]\n', "kernel profiles extend each other in a cycle: bad -> bad"),
        ('base = "defconfig"\n[features]\nkasan = 1\n', "features.kasan: must be a table"),
    ],
)
def test_bad_profiles_are_refused_naming_the_file_and_key(tmp_path: Path, text: str, error: str) -> None:
    write_profile(tmp_path, "bad", text)
    with pytest.raises(kernel_profiles.KernelProfileError) as refused:
        kernel_profiles.load("bad", tmp_path)
    assert error in str(refused.value)
    assert "cycle" in error or str(tmp_path / "bad.toml") in str(refused.value)


def test_the_shipped_profiles_load_with_the_issue_s_options() -> None:
    assert set(kernel_profiles.available()) >= {"container", "development", "production", "minimal-vm"}
    production = kernel_profiles.load("production").options
    for option in ("SECURITY_LOCKDOWN_LSM", "STACKPROTECTOR_STRONG", "FORTIFY_SOURCE", "INIT_ON_ALLOC_DEFAULT_ON",
                   "MODULE_SIG"):  # fmt: skip
        assert production[option] == "y", option
    assert production["DEVMEM"] == "n"
    development = kernel_profiles.load("development")
    assert development.options["FUNCTION_TRACER"] == "y" and development.features["kasan"]["KASAN"] == "y"
    container = kernel_profiles.load("container").options
    assert all(container[o] == "y" for o in ("USER_NS", "MEMCG", "OVERLAY_FS", "VETH", "BRIDGE", "NF_NAT"))
    minimal = kernel_profiles.load("minimal-vm")
    assert minimal.base is kernel_profiles.Base.tinyconfig and minimal.options["VIRTIO_BLK"] == "y"


def test_an_image_profile_names_a_kernel_profile_and_drops_the_distribution_kernel(tmp_path: Path) -> None:
    path = tmp_path / "tuned.toml"
    path.write_text('extends = "minimal"\n[kernel]\nbuild = "development"\nfeatures = ["kasan"]\n')
    profile = load_profile(path)
    assert profile.kernel.build == "development" and profile.kernel.features == ("kasan",)
    assert "linux-image-amd64" not in package_set(profile) and "linux-image-amd64" in package_set(
        load_profile("minimal")
    )
    deb = tmp_path / "linux-image-6.12.117-rastos-development_6.12.117-1_amd64.deb"
    argv = mmdebstrap_argv(profile, tmp_path / "root", tmp_path / "overlay", tmp_path / "debs", deb)
    assert f"--include={deb}" in argv and "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount" in argv


@pytest.mark.parametrize(
    ("kernel_table", "error"),
    [
        ('build = "nosuch"', "key 'kernel.build': no kernel profile 'nosuch'"),
        ('build = "development"\nfeatures = ["ubsan"]', "key 'kernel.features[0]': kernel profile development has"),
        ('features = ["kasan"]', "key 'kernel.features': needs kernel.build"),
        ('build = "Minimal VM"', "kernel.build"),
    ],
)
def test_bad_kernel_keys_in_an_image_profile_are_refused(tmp_path: Path, kernel_table: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'extends = "minimal"\n[kernel]\n{kernel_table}\n')
    with pytest.raises(ProfileError) as refused:
        load_profile(path)
    assert error in str(refused.value) and str(path) in str(refused.value)


def test_a_tree_s_version_and_digest_follow_its_files(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 9\nEXTRAVERSION = -rc1\nNAME = x\n")
    (tree / "init.c").write_text("int main;\n")
    first = from_tree(tree)
    assert first.version == "6.12.9-rc1" == makefile_version(tree)
    (tree / "init.c").write_text("int main(void);\n")
    assert from_tree(tree).digest != first.digest, "an edited file is another source"


# Against Debian's source: what Kconfig makes of the fragments.


@pytest.fixture(scope="module")
def debian_source() -> KernelSource:
    require_root()
    return from_debian("trixie", CACHE_DIR / "kernel")


@pytest.mark.root
@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("name", ["minimal-vm", "container", "production", "development"])
def test_every_option_of_a_shipped_profile_sticks(debian_source: KernelSource, tmp_path: Path, name: str) -> None:
    profile = kernel_profiles.load(name)
    features = tuple(sorted(profile.features))
    final, misses = configure(KernelRequest(profile, debian_source, tmp_path, features), tmp_path / "build")
    assert [str(miss) for miss in misses] == []
    resolved = config.parse(final)
    assert resolved["CC_VERSION_TEXT"].startswith('"gcc'), "Kconfig resolved it (it records the compiler)"
    assert len(resolved) > 1000, "the whole configuration, not the fragment alone"


@pytest.mark.root
@pytest.mark.network
def test_an_option_whose_dependencies_are_off_is_reported(debian_source: KernelSource, tmp_path: Path) -> None:
    """VIRTIO_BLK needs VIRTIO, which tinyconfig leaves off: Kconfig drops it, and the report says so."""
    write_profile(tmp_path / "profiles", "broken", 'base = "tinyconfig"\n[options]\nVIRTIO_BLK = "y"\nPRINTK = "y"\n')
    profile = kernel_profiles.load("broken", tmp_path / "profiles")
    final, misses = configure(KernelRequest(profile, debian_source, tmp_path), tmp_path / "build")
    assert [str(miss) for miss in misses] == ["CONFIG_VIRTIO_BLK: asked y, got n"]
    assert config.parse(final)["PRINTK"] == "y"
    # The Debian base needs Debian's configuration, which a plain tree does not bring.
    plain = dataclasses.replace(debian_source, debian_config=None)
    with pytest.raises(RastosError, match="starts from Debian's configuration"):
        configure(KernelRequest(kernel_profiles.load("production"), plain, tmp_path), tmp_path / "build2")


# The build's cache, on a stand-in kernel tree: a Makefile with the kernel's targets, answering in
# milliseconds, so what is cached, reused and reported is checked without compiling a kernel.

STUB_MAKEFILE = """\
REL := 6.1.0$(LOCALVERSION)
tinyconfig defconfig:
\tprintf 'CONFIG_A=y\\n# CONFIG_B is not set\\n' > $(O)/.config
olddefconfig:
\tsed -i '/^CONFIG_DROPPED/d' $(O)/.config
kernelrelease:
\t@echo $(REL)
bindeb-pkg:
\t@echo '  CC      init/main.o'
\t@echo '  CC [M]  fs/btrfs/super.o'
\t@test ! -e $(O)/FAIL
\ttouch $(O)/vmlinux
\techo deb > $(O)/../linux-image-$(REL)_6.1.0-1_amd64.deb
\techo other > $(O)/../linux-headers-$(REL)_6.1.0-1_amd64.deb
"""


def stub_request(tmp_path: Path, options: str) -> KernelRequest:
    tree = tmp_path / "linux"
    tree.mkdir(exist_ok=True)
    (tree / "Makefile").write_text(STUB_MAKEFILE)
    write_profile(tmp_path / "profiles", "stub", f'base = "tinyconfig"\n[options]\n{options}')
    source = KernelSource(tree, "6.1.0", "0" * 64, "a stand-in tree")
    return KernelRequest(kernel_profiles.load("stub", tmp_path / "profiles"), source, tmp_path / "cache", jobs=2)


def test_a_built_kernel_is_cached_by_its_configuration_and_a_repeat_runs_no_make(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    request = stub_request(tmp_path, 'B = "y"\nDROPPED = "y"\n')
    first = build_kernel(request, lambda progress: seen.append((progress.done, progress.current)))
    assert not first.cached and first.release == "6.1.0-rastos-stub"
    assert seen == [(1, "init/main.o"), (2, "fs/btrfs/super.o")]
    assert [str(miss) for miss in first.misses] == ["CONFIG_DROPPED: asked y, got n"]
    assert first.package.read_text() == "deb\n" and first.package.parent == first.directory
    assert config.parse(first.config_path.read_text()) == {"A": "y", "B": "y"}
    # The same request again: answered by the index, without make (the tree has no Makefile now).
    (request.source.tree / "Makefile").rename(tmp_path / "Makefile")
    again = build_kernel(request)
    assert again.cached and again.directory == first.directory and again.misses == first.misses
    (tmp_path / "Makefile").rename(request.source.tree / "Makefile")
    # Another fragment that Kconfig resolves to the same configuration shares the kernel, with its own misses.
    same = build_kernel(stub_request(tmp_path, 'B = "y"\nDROPPED_TOO = "y"\n'))
    assert same.cached and same.directory == first.directory
    assert [str(miss) for miss in same.misses] == ["CONFIG_DROPPED_TOO: asked y, got n"]


def test_a_failed_kernel_build_leaves_no_cache_entry(tmp_path: Path) -> None:
    request = stub_request(tmp_path, 'B = "y"\n')
    workspace = request.cache / "build" / f"stub-{'0' * 12}" / "obj"
    workspace.mkdir(parents=True)
    (workspace / "FAIL").touch()
    with pytest.raises(RastosError, match="building kernel stub failed"):
        build_kernel(request)
    assert list((request.cache / "out").iterdir()) == [] and list((request.cache / "index").iterdir()) == []
    (workspace / "FAIL").unlink()
    assert not build_kernel(request).cached, "the next try builds"
