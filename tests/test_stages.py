"""The pure parts of the build: cache keys and their explanations, fstab, boot entries, disk layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import load_config
from imagebuilder.build import prune_bundles
from imagebuilder.context import BuildContext, KernelInfo
from imagebuilder.profile import load_profile
from imagebuilder.profile.model import MiB
from imagebuilder.stages.bootloader import boot_entry, entry_filename, kernel_cmdline, loader_conf
from imagebuilder.stages.bootstrap import cache_key, describe_change, package_set
from imagebuilder.stages.configure import GENERATORS, fstab, implied_masks, skip_generators, write_daemon_config
from imagebuilder.stages.disk import plan_layout, stage_subvolumes
from rastos.errors import RastosError


def context(profile_name: str = "minimal") -> BuildContext:
    ctx = BuildContext(
        profile=load_profile(profile_name),
        cache_dir=Path("/nonexistent/cache"),
        work_dir=Path("/nonexistent/work"),
        staging_dir=Path("/nonexistent/staging"),
        output_dir=Path("/nonexistent/out"),
        image_name="rastos-test",
    )
    ctx.kernel = KernelInfo("6.12.0-test", Path("/boot/vmlinuz-6.12.0-test"), Path("/boot/initrd.img-6.12.0-test"))
    ctx.cmdline = kernel_cmdline(ctx)
    return ctx


def test_cache_key_changes_with_bootstrap_inputs_only() -> None:
    inputs = {"suite": "trixie", "packages": ["a", "b"], "docs": False}
    assert cache_key(inputs) == cache_key(dict(reversed(list(inputs.items()))))
    assert cache_key(inputs) != cache_key({**inputs, "packages": ["a", "b", "c"]})


def test_late_stage_settings_do_not_reach_the_bootstrap(tmp_path: Path) -> None:
    """A sysctl, a user or the host name changes the image but not the package set."""
    changed = tmp_path / "tuned.toml"
    changed.write_text('extends = "minimal"\n[kernel.sysctl]\n"vm.swappiness" = 5\n[system]\nhostname = "x"\n')
    assert package_set(load_profile(changed)) == package_set(load_profile("minimal"))


def test_sudo_user_brings_sudo(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('extends = "minimal"\n[[users]]\nname = "ops"\nsudo = true\n')
    assert "sudo" in package_set(load_profile(path))
    assert "sudo" not in package_set(load_profile("minimal"))


def test_the_hub_url_goes_into_the_image_and_the_daemon_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('extends = "minimal"\n[hub]\nurl = "wss://hub.example.org:8470/api/v1/agent"\n')
    root = tmp_path / "root"
    write_daemon_config(root, load_profile(path))
    config = load_config(root / "etc/rastos/daemon.toml")
    assert config.hub_url == "wss://hub.example.org:8470/api/v1/agent"
    assert config.hub_ca is None and not (root / "etc/rastos/hub-ca.pem").exists()
    write_daemon_config(tmp_path / "plain", load_profile("minimal"))
    assert not (tmp_path / "plain/etc/rastos/daemon.toml").exists(), "no hub, no file"


def test_the_hubs_ca_goes_into_the_image_and_the_daemon_verifies_the_hub_with_it(tmp_path: Path) -> None:
    from daemon.hub_link_settings import HubSettings
    from tests.hub_fixtures import Pki

    pki = Pki.make(tmp_path / "pki")
    path = tmp_path / "fleet.toml"
    path.write_text(f'extends = "minimal"\n[hub]\nurl = "wss://hub.example.org:8470/api/v1/agent"\nca = "{pki.ca}"\n')
    root = tmp_path / "root"
    write_daemon_config(root, load_profile(path))
    shipped = root / "etc/rastos/hub-ca.pem"
    assert shipped.read_bytes() == pki.ca.read_bytes() and shipped.stat().st_mode & 0o777 == 0o644
    config = load_config(root / "etc/rastos/daemon.toml")
    assert config.hub_ca == Path("/etc/rastos/hub-ca.pem"), "the path the host will have"
    tls = HubSettings(config.hub_url or "", "token", shipped).tls()
    assert tls is not None and len(tls.get_ca_certs()) == 1, "the image's CA file is one the agent can load"


def test_describe_change_names_what_changed() -> None:
    old = {"suite": "bookworm", "packages": ["a", "b"], "docs": True}
    new = {"suite": "trixie", "packages": ["b", "c"], "docs": True}
    assert describe_change(old, new) == "packages: +c -a; suite: bookworm -> trixie"
    assert describe_change(None, new) == "no earlier build of this profile"


def test_fstab_mounts_every_subvolume_by_uuid_and_leaves_root_to_the_boot_entry() -> None:
    ctx = context()
    lines = [line.split("\t") for line in fstab(ctx).splitlines() if not line.startswith("#")]
    by_mountpoint = {fields[1]: fields for fields in lines}
    uuid = f"UUID={ctx.ids.root_fs_uuid}"
    assert by_mountpoint["/"][0] == uuid and "subvol=" not in by_mountpoint["/"][3]
    for mountpoint, subvolume in [
        ("/home", "@home"),
        ("/var/log", "@var_log"),
        ("/var/lib/rastos", "@rastos"),
        ("/.snapshots", "@snapshots"),
    ]:
        assert by_mountpoint[mountpoint][0] == uuid
        assert f"subvol=/{subvolume}," in by_mountpoint[mountpoint][3]
    assert by_mountpoint["/efi"][0] == f"UUID={ctx.ids.esp_fs_uuid}"
    assert "x-systemd.automount" in by_mountpoint["/efi"][3]


def test_the_hub_appliance_keeps_its_database_and_state_on_subvolumes_of_their_own(tmp_path: Path) -> None:
    ctx = context("hub")
    mounts = {fields[1]: fields[3] for fields in (line.split("\t") for line in fstab(ctx).splitlines()[3:])}
    assert "subvol=/@postgresql," in mounts["/var/lib/postgresql"]
    assert "subvol=/@rastos-hub," in mounts["/var/lib/rastos-hub"]
    assert "/var/lib/postgresql" not in fstab(context("minimal")), "only the appliance has them"
    # The build moves what the packages put there (the cluster PostgreSQL's package made) out of the root.
    ctx.work_dir = tmp_path
    cluster = ctx.rootfs / "var/lib/postgresql/17/main"
    cluster.mkdir(parents=True)
    (cluster / "PG_VERSION").write_text("17\n")
    (ctx.rootfs / "var/lib/rastos-hub").mkdir(parents=True)
    stage_subvolumes(ctx)
    assert (ctx.fs_tree / "@postgresql/17/main/PG_VERSION").read_text() == "17\n"
    assert (ctx.fs_tree / "@rastos-hub").is_dir()
    assert list((ctx.rootfs / "var/lib/postgresql").iterdir()) == [], "an empty mount point in the root"


def test_a_hub_subvolume_named_as_another_is_refused(tmp_path: Path) -> None:
    from imagebuilder.profile.merge import ProfileError

    path = tmp_path / "clash.toml"
    path.write_text('extends = "hub"\n[hub_server]\nstate = "@rastos"\n')
    with pytest.raises(ProfileError, match=r"clash.toml: table 'hub_server': subvolume '@rastos' is named for two"):
        load_profile(path)


def test_boot_entry_names_its_subvolume_and_counts_tries() -> None:
    ctx = context()
    assert entry_filename(ctx) == "rastos-0+3.conf"
    entry = dict(line.split(None, 1) for line in boot_entry(ctx).splitlines())
    assert entry["linux"] == "/rastos/6.12.0-test/linux"
    assert entry["initrd"] == "/rastos/6.12.0-test/initrd"
    options = entry["options"].split()
    assert f"root=UUID={ctx.ids.root_fs_uuid}" in options
    assert "rootflags=subvol=@" in options
    assert "module_blacklist=floppy,pcspkr,joydev,ahci," in entry["options"]
    assert "console=ttyS0,115200" in options
    assert "timeout 0" in loader_conf(ctx)


def test_no_boot_counting_when_tries_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text('extends = "minimal"\n[boot]\ntries = 0\n')
    ctx = context()
    ctx.profile = load_profile(path)
    assert entry_filename(ctx) == "rastos-0.conf"


@pytest.mark.parametrize("name", ["minimal", "server", "hardened"])
def test_disk_layout_is_aligned_and_fits(name: str) -> None:
    profile = load_profile(name)
    layout = plan_layout(profile)
    assert layout.esp_start == MiB
    assert layout.root_start == layout.esp_start + layout.esp_size
    assert layout.root_start % MiB == 0 and layout.root_size % MiB == 0
    assert layout.root_start + layout.root_size <= layout.total - MiB  # room for the backup GPT


def test_sha256_of_a_sparse_file_equals_the_plain_digest(tmp_path: Path) -> None:
    import hashlib

    from imagebuilder.stages.outputs import checksums, sha256

    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(64 * MiB + 123)  # holes at both ends and an odd size
        f.seek(5 * MiB + 7)
        f.write(b"data in the middle" * 1000)
        f.seek(40 * MiB)
        f.write(b"\x01" * (9 * MiB))
    plain = hashlib.sha256(sparse.read_bytes()).hexdigest()
    assert sha256(sparse) == plain
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert checksums([sparse, empty]) == {sparse: plain, empty: hashlib.sha256(b"").hexdigest()}


def test_older_bundles_go_but_this_builds_and_its_parent_stay(tmp_path: Path) -> None:
    """Every build is a version with a bundle of some 190 MiB: only the newest few stay."""
    made = []
    for number in range(6):
        for name in (f"rastos-minimal-{number}.rbundle", f"rastos-minimal-{number}-from-{number - 1}.rbundle"):
            path = tmp_path / name
            path.write_bytes(b"x")
            os.utime(path, (1000 + number, 1000 + number))
            made.append(path)
    other = tmp_path / "rastos-server-1.rbundle"
    other.write_bytes(b"x")
    os.utime(other, (1, 1))
    parent = tmp_path / "rastos-minimal-0.rbundle"
    removed = prune_bundles(tmp_path, "rastos-minimal", {parent.resolve()})
    assert sorted(path.name for path in removed) == [
        "rastos-minimal-0-from--1.rbundle", "rastos-minimal-1-from-0.rbundle", "rastos-minimal-1.rbundle",
        "rastos-minimal-2-from-1.rbundle", "rastos-minimal-2.rbundle",
    ]  # fmt: skip
    assert parent.exists() and other.exists(), "the named parent and another profile's bundle stay"
    assert sorted(p.name for p in tmp_path.glob("rastos-minimal-[345]*")) == [
        "rastos-minimal-3-from-2.rbundle", "rastos-minimal-3.rbundle", "rastos-minimal-4-from-3.rbundle",
        "rastos-minimal-4.rbundle", "rastos-minimal-5-from-4.rbundle", "rastos-minimal-5.rbundle",
    ]  # fmt: skip


def test_skipped_generators_are_linked_to_dev_null_and_unknown_ones_refused(tmp_path: Path) -> None:
    profile = load_profile("minimal")
    assert "systemd-gpt-auto-generator" in profile.system.skip_generators
    assert "systemd-debug-generator" not in profile.system.skip_generators  # systemd.mask= at the boot menu
    generators = tmp_path / GENERATORS
    generators.mkdir(parents=True)
    with pytest.raises(RastosError, match="systemd-gpt-auto-generator"):
        skip_generators(tmp_path, profile)  # the image would not have them: said, not ignored
    for name in profile.system.skip_generators:
        (generators / name).write_text("#!/bin/sh\n")
    (tmp_path / "etc/systemd/system-generators").mkdir(parents=True)
    (tmp_path / "etc/systemd/system-generators/systemd-tpm2-generator").write_text("a local override\n")
    skip_generators(tmp_path, profile)
    for name in profile.system.skip_generators:
        assert (tmp_path / "etc/systemd/system-generators" / name).readlink() == Path("/dev/null"), name


def test_systemds_remount_of_root_is_masked_only_where_rastos_initrd_mounts_it_with_its_fstab_options() -> None:
    assert implied_masks(load_profile("minimal")) == ("systemd-remount-fs.service",)
    # Debian's initramfs mounts / read-only: systemd-remount-fs makes it writable.
    assert implied_masks(load_profile("server")) == ()


def test_only_the_hub_appliance_gets_the_hub_its_database_and_settings(tmp_path: Path) -> None:
    from imagebuilder.stages.hub_server import DATABASE_URL, HUB_PACKAGES, hub_env

    hub = package_set(load_profile("hub"))
    assert set(HUB_PACKAGES) <= set(hub) and "postgresql" in hub
    for other in ("minimal", "server", "base"):
        assert "postgresql" not in package_set(load_profile(other)) and not load_profile(other).hub_server.enable
    env = dict(line.split("=", 1) for line in hub_env().splitlines() if not line.startswith("#"))
    assert env == {"RASTOS_HUB_OPTIONS": "--listen 127.0.0.1:8470", "RASTOS_HUB_DATABASE": DATABASE_URL}


def test_the_hub_appliance_is_debian_only(tmp_path: Path) -> None:
    from imagebuilder.profile.merge import ProfileError

    path = tmp_path / "arch-hub.toml"
    path.write_text('[distribution]\nname = "arch"\n[hub_server]\nenable = true\n')
    with pytest.raises(ProfileError, match=r"hub_server\.enable"):
        load_profile(path)
