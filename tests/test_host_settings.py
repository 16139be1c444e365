"""A profile's host settings set on a real Debian tree by the configure stage's ops, and the same
settings planned again by the ops as rastosd would on the host: nothing left to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.profile import load_profile
from imagebuilder.profile.host import host_steps
from imagebuilder.stages.configure import apply_host_settings, write_base_hosts
from ops.steps import step_from
from ops.target import Target
from tests.op_tree import op_root, op_tree_base  # noqa: F401  (fixtures)
from tests.test_op_library import KEY

pytestmark = [pytest.mark.root, pytest.mark.network]


def test_host_settings_are_what_the_ops_plan_as_unchanged(op_root: Path, tmp_path: Path) -> None:  # noqa: F811
    profile_file = tmp_path / "fleet.toml"
    profile_file.write_text(
        'extends = "minimal"\n[system]\nhostname = "web-1.example.org"\n[kernel.sysctl]\n"vm.swappiness" = 7\n'
        f'[[users]]\nname = "admin"\nuid = 1500\ngroups = ["adm"]\nsudo = true\nauthorized_keys = ["{KEY}"]\n'
        '[[users]]\nname = "dev"\nsudo = true\npassword_hash = "$6$salt$hash"\n'
    )
    profile = load_profile(profile_file)
    (op_root / "etc/hosts").unlink(missing_ok=True)
    write_base_hosts(op_root)
    assert apply_host_settings(op_root, profile) == 4
    assert (op_root / "etc/hostname").read_text() == "web-1.example.org\n"
    assert "127.0.1.1\tweb-1.example.org web-1" in (op_root / "etc/hosts").read_text()
    assert "vm.swappiness = 7" in (op_root / "etc/sysctl.d/90-rastos.conf").read_text()
    assert KEY in (op_root / "home/admin/.ssh/authorized_keys").read_text()
    assert "admin ALL=(ALL:ALL) NOPASSWD: ALL" in (op_root / "etc/sudoers.d/rastos-admin").read_text()
    assert "NOPASSWD" not in (op_root / "etc/sudoers.d/rastos-dev").read_text(), "a user with a password types it"
    assert "admin:x:1500:" in (op_root / "etc/passwd").read_text()
    target = Target(op_root, runtime=False)
    for step in host_steps(profile):
        planned = step_from(target, step["op"], step["params"], "")
        assert planned.op.plan(target, planned.params).actions == (), step
    assert apply_host_settings(op_root, profile) == 0, "a second build step changes nothing"
