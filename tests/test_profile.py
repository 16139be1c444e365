"""Profiles: parsing, inheritance, validation messages (each names the file, the key and why)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imagebuilder.profile import ProfileError, available_profiles, load_profile
from imagebuilder.profile.load import PROFILE_DIR, profile_from_dict, profile_to_dict
from imagebuilder.profile.model import GiB, ImageFormat, InitramfsModules, MiB, parse_size

SHIPPED = {"base", "minimal", "server", "container-host", "development", "hardened"}


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def error_of(path: Path | str, directory: Path = PROFILE_DIR) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path, directory)
    return str(info.value)


def test_every_shipped_profile_loads_and_round_trips_through_json() -> None:
    names = {p.stem for p in available_profiles()}
    assert names >= SHIPPED
    for name in names:
        profile = load_profile(name)
        assert profile.description, f"{name} needs a description"
        data = json.loads(json.dumps(profile_to_dict(profile)))
        assert profile_from_dict(data) == profile


def test_minimal_is_small_and_for_vms() -> None:
    minimal = load_profile("minimal")
    assert minimal.packages.docs is False
    assert minimal.kernel.initramfs is InitramfsModules.virtio
    assert minimal.disk.formats == (ImageFormat.qcow2,)
    assert minimal.distribution.suite == "trixie"


def test_child_appends_lists_and_replaces_scalars(tmp_path: Path) -> None:
    write(
        tmp_path,
        "parent",
        """
description = "parent"
[packages]
include = ["less", "curl"]
[kernel]
cmdline = ["quiet"]
[kernel.sysctl]
"vm.swappiness" = 60
"kernel.sysrq" = 1
[disk]
size = "8G"
formats = ["raw"]
[[users]]
name = "alice"
shell = "/bin/sh"
""",
    )
    child = write(
        tmp_path,
        "child",
        """
description = "child"
extends = "parent"
[packages]
include = ["curl", "htop"]
[kernel]
cmdline = ["loglevel=3"]
[kernel.sysctl]
"vm.swappiness" = 10
[disk]
formats = ["qcow2"]
[[users]]
name = "alice"
shell = "/bin/bash"
[[users]]
name = "bob"
""",
    )
    profile = load_profile(child, tmp_path)
    assert profile.packages.include == ("less", "curl", "htop")
    assert profile.kernel.cmdline == ("quiet", "loglevel=3")
    assert profile.kernel.sysctl == {"vm.swappiness": "10", "kernel.sysrq": "1"}
    assert profile.disk.size == 8 * GiB
    assert profile.disk.formats == (ImageFormat.qcow2,)  # replaced, not appended
    assert [(u.name, u.shell) for u in profile.users] == [("alice", "/bin/bash"), ("bob", "/bin/bash")]
    assert profile.description == "child"
    assert profile.sources == (str(tmp_path / "parent.toml"), str(child))


def test_a_profile_outside_the_tree_can_extend_a_shipped_one(tmp_path: Path) -> None:
    mine = write(tmp_path, "mine", 'extends = "minimal"\n[system]\nhostname = "box"\n')
    profile = load_profile(mine)
    assert profile.system.hostname == "box"
    assert profile.packages.docs is False


def test_unknown_key_names_file_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "typo", '[kernel]\ncmdlnie = ["quiet"]\n')
    message = error_of(path)
    assert str(path) in message
    assert "unknown key 'kernel.cmdlnie'" in message
    assert "did you mean 'cmdline'" in message


def test_unknown_top_level_table(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "t", "[kernal]\npackage = 'x'\n"))
    assert "unknown key 'kernal'" in message and "did you mean 'kernel'" in message


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[disk]\nsize = "4X"\n', "disk.size", 'expected a size such as "4G"'),
        ("[disk]\nsize = true\n", "disk.size", "expected a size"),
        ('[disk]\nsize = "100M"\n', "disk.size", "must be at least 512M"),
        ('[boot]\ntries = "3"\n', "boot.tries", "expected an integer, got a string"),
        ("[boot]\ntries = 12\n", "boot.tries", "between 0 and 9"),
        ('[packages]\ninclude = "vim"\n', "packages.include", "expected a list"),
        ('[packages]\ninclude = ["Bad Name"]\n', "packages.include", "not a valid package name"),
        ('[system]\nhostname = "-bad-"\n', "system.hostname", "'-bad-' is not valid: lower-case letters"),
        ('[disk]\nformats = ["vmdk"]\n', "disk.formats[0]", "'vmdk' is not one of raw, qcow2"),
        ('[kernel]\ninitramfs = "tiny"\n', "kernel.initramfs", "is not one of virtio, generic"),
        ('[btrfs]\nhome = "home"\n', "btrfs.home", "must start with @"),
        ('[distribution]\nmirror = "deb.debian.org"\n', "distribution.mirror", "not a URL"),
        ('[[users]]\nname = "Root!"\n', "users[0].name", "'Root!' is not valid: a lower-case letter"),
        ('[[users]]\nname = "a"\nssh_keys = ["hello"]\n', "users[0].ssh_keys[0]", "one OpenSSH public key line"),
        ('[system]\nenable = ["sshd"]\n', "system.enable", "not a valid unit name"),
        ('[kernel.sysctl]\n"vm.swappiness" = [1]\n', "kernel.sysctl.vm.swappiness", "expected a string or integer"),
        ('[disk]\nsize = "600M"\nesp_size = "400M"\n', "disk.size", "leaves less than 256M"),
        ('[distribution]\nrepositories = ["core"]\n', "distribution.repositories", "Arch's"),
        ('[btrfs]\nhome = "@x"\nvar_log = "@x"\n', "btrfs", "named for two mount points"),
        ('[hub]\nurl = "http://hub:8470"\n', "hub.url", "not a ws:// or wss:// URL"),
        ('[hub]\ntoken = "secret"\n', "hub.token", "unknown key"),
        ('[hub]\nurl = "ws://hub:8470/api/v1/agent"\nca = "ca.pem"\n', "hub.ca", "needs a wss:// hub.url"),
        ('[hub]\nca = "ca.pem"\n', "hub.ca", "needs a wss:// hub.url, got none"),
        ('version = "1 0"\n', "version", "not a valid image version"),
        ('version = "-1"\n', "version", "a letter or digit first"),
        ("version = 2\n", "version", "expected a string"),
    ],
)
def test_impossible_values_are_refused_naming_file_and_key(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    path = write(tmp_path, "bad", 'extends = "base"\n' + toml)
    message = error_of(path)
    assert message.startswith(f"{path}: "), message
    assert f"'{key}'" in message, message
    assert reason in message, message


def test_a_version_is_inherited_and_replaced(tmp_path: Path) -> None:
    """No version: the build picks its time. A parent's version holds until a child sets its own."""
    assert load_profile("minimal").version == ""
    write(tmp_path, "parent", 'extends = "minimal"\nversion = "2.1"\n')
    assert load_profile(write(tmp_path, "child", 'extends = "parent"\n')).version == "2.1"
    assert load_profile(write(tmp_path, "next", 'extends = "parent"\nversion = "2.2+rc1"\n')).version == "2.2+rc1"


def test_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    """A bad value inherited from a parent is blamed on the parent, not on the child."""
    parent = write(tmp_path, "parent", "[boot]\ntries = 42\n")
    child = write(tmp_path, "child", 'extends = "parent"\n[system]\nhostname = "ok"\n')
    message = error_of(child, tmp_path)
    assert message.startswith(f"{parent}: key 'boot.tries'")


def test_extends_cycle_and_missing_parent(tmp_path: Path) -> None:
    write(tmp_path, "a", 'extends = "b"\n')
    write(tmp_path, "b", 'extends = "a"\n')
    assert "cycle: a -> b -> a" in error_of(tmp_path / "a.toml", tmp_path)
    orphan = write(tmp_path, "orphan", 'extends = "nowhere"\n')
    assert "no profile named 'nowhere'" in error_of(orphan, tmp_path)


def test_invalid_toml_and_unknown_profile_name(tmp_path: Path) -> None:
    broken = write(tmp_path, "broken", "[disk\nsize=1")
    assert f"{broken}: not valid TOML" in error_of(broken)
    assert "did you mean 'minimal'" in error_of("minimall")


def test_name_comes_from_the_file_not_the_contents(tmp_path: Path) -> None:
    assert "unknown key 'name'" in error_of(write(tmp_path, "n", 'name = "other"\n'))


@pytest.mark.parametrize(
    ("text", "size"),
    [("4G", 4 * GiB), ("512M", 512 * MiB), ("300MiB", 300 * MiB), ("1024", 1024), (2048, 2048), ("2g", 2 * GiB)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_profile_field_help_is_documented() -> None:
    """Every profile key has a help line, and docs/profiles.md mentions each key."""
    import dataclasses

    from imagebuilder.profile import model

    docs = (PROFILE_DIR.parent / "docs" / "profiles.md").read_text()
    tables = [
        model.DistributionConfig,
        model.PackagesConfig,
        model.KernelConfig,
        model.UserConfig,
        model.SystemConfig,
        model.DiskConfig,
        model.BtrfsConfig,
        model.BootConfig,
        model.HubConfig,
        model.HubServerConfig,
    ]
    for table in tables:
        for field in dataclasses.fields(table):
            assert field.metadata.get("help"), f"{table.__name__}.{field.name} has no help"
            assert re.search(rf"`{field.name}`", docs), f"docs/profiles.md does not mention {field.name}"


def test_host_settings_are_op_steps_the_ops_accept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A profile's host name, sysctl and accounts become the hostname, sysctl and user ops' steps;
    the former `ssh_keys` still works, and says which key to write instead."""
    from imagebuilder.profile.host import host_steps
    from ops.steps import checked_steps

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa a@b"
    text = (
        'extends = "minimal"\n[system]\nhostname = "web-1.example.org"\n[kernel.sysctl]\n"vm.swappiness" = 10\n'
        f'[[users]]\nname = "ops"\nsudo = true\nssh_keys = ["{key}"]\n'
        f'[[users]]\nname = "dev"\nsudo = true\npassword_hash = "$6$x$y"\nauthorized_keys = ["{key}"]\n'
    )
    profile = load_profile(write(tmp_path, "fleet", text))
    assert "key 'users[0].ssh_keys' is deprecated: write 'users[0].authorized_keys'" in caplog.text
    steps = host_steps(profile)
    assert steps == [
        {"op": "hostname", "params": {"hostname": "web-1.example.org"}},
        {"op": "sysctl", "params": {"settings": dict(profile.kernel.sysctl)}},
        {"op": "user", "params": {"name": "ops", "groups": [], "authorized_keys": [key], "shell": "/bin/bash",
                                  "sudo": True, "sudo_nopasswd": True}},
        {"op": "user", "params": {"name": "dev", "groups": [], "authorized_keys": [key], "shell": "/bin/bash",
                                  "sudo": True, "sudo_nopasswd": False}},
    ]  # fmt: skip
    assert profile.kernel.sysctl["vm.swappiness"] == "10"
    assert [step.op.name for step in checked_steps(steps)] == ["hostname", "sysctl", "user", "user"]


def test_a_desired_state_that_sets_a_profile_key_again_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "site.toml").write_text(
        '[hostname]\nhostname = "other"\n[sysctl]\nsettings = {"vm.swappiness" = "1"}\n'
    )
    text = 'extends = "minimal"\n[system]\ndesired_state = "site.toml"\n[kernel.sysctl]\n"vm.swappiness" = 10\n'
    load_profile(write(tmp_path, "twice", text))
    assert "site.toml sets hostname, sysctl 90-rastos again, which the profile's own keys set" in caplog.text


def test_a_generator_to_skip_must_be_a_generator_name(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('extends = "minimal"\n[system]\nskip_generators = ["../../bin/sh"]\n')
    with pytest.raises(ProfileError, match=r"skip_generators.*not a valid generator name: '\.\./\.\./bin/sh'"):
        load_profile(profile)


def test_the_hubs_ca_is_found_beside_the_profile_and_must_be_a_current_pem_certificate(tmp_path: Path) -> None:
    from tests.hub_fixtures import Pki

    good, expired = Pki.make(tmp_path / "good"), Pki.make(tmp_path / "old", expired=True)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hub-ca.pem").write_bytes(good.ca.read_bytes())
    (tmp_path / "site" / "garbage.pem").write_text("not a certificate\n")
    hub = '[hub]\nurl = "wss://hub.example:8470/api/v1/agent"\n'
    path = write(tmp_path / "site", "fleet", f'extends = "minimal"\n{hub}ca = "hub-ca.pem"\n')
    profile = load_profile(path)
    assert profile.hub.ca == str(tmp_path / "site" / "hub-ca.pem"), "resolved beside the file that names it"
    assert profile_from_dict(json.loads(json.dumps(profile_to_dict(profile)))) == profile
    for ca, reason in (
        ("missing.pem", f"cannot read {tmp_path / 'site' / 'missing.pem'}: No such file or directory"),
        ("garbage.pem", f"{tmp_path / 'site' / 'garbage.pem'} holds no PEM certificate"),
        (str(expired.cert), "expired on"),
    ):
        bad = write(tmp_path / "site", "bad", f'extends = "minimal"\n{hub}ca = "{ca}"\n')
        message = error_of(bad)
        assert message.startswith(f"{bad}: key 'hub.ca': ") and reason in message, message
