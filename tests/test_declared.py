"""Workflows and the declared desired state: loaded, checked against the ops' schemas with the file's
names in every error, ordered by the ops' declarations, and run through the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.declared import desired_state_steps, list_workflows, load_workflow
from rastos.errors import RastosError
from tests.daemon_fixtures import Rastosd
from tests.op_tree import tree_digest

SHIPPED = ("complete", "development", "essential", "monitoring", "security")


def test_the_shipped_workflows_load_and_every_step_fits_its_op() -> None:
    workflows = {w.name: w for w in list_workflows()}
    assert set(SHIPPED) <= set(workflows)
    for name in SHIPPED:
        values = {"users": ["alice"]} if "users" in workflows[name].variables else {}
        steps = workflows[name].steps_for(values)
        assert steps, name
    complete = [s["op"] for s in workflows["complete"].steps_for({})]
    assert complete.index("firewall") > complete.index("sysctl") and "monitoring" in complete
    firewall = next(s for s in workflows["complete"].steps_for({}) if s["op"] == "firewall")
    assert firewall["params"]["allow_tcp"] == ["9100"], "complete's own default wins over security's"


def test_variables_are_substituted_with_their_types_and_checked() -> None:
    security = load_workflow("security")
    steps = security.steps_for({"ssh_port": 2222, "allow_tcp": ["443"]})
    ssh = next(s for s in steps if s["op"] == "ssh")
    assert ssh["params"]["port"] == 2222 and ssh["params"]["confirm_timeout"] == 120
    with pytest.raises(RastosError, match="no variable 'ssh_prot'"):
        security.steps_for({"ssh_prot": 2222})
    with pytest.raises(RastosError, match=r"workflow security step 2 \(ssh\)\.params\.port: must be at most 65535"):
        security.steps_for({"ssh_port": 70000})
    with pytest.raises(RastosError, match="needs variable 'users'"):
        load_workflow("development").steps_for({})


def write(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.toml").write_text(text)


def test_workflow_files_are_refused_with_the_place_named(tmp_path: Path) -> None:
    dirs = (tmp_path,)
    write(tmp_path, "a", 'description = "a"\ninclude = ["b"]\n')
    write(tmp_path, "b", 'description = "b"\ninclude = ["a"]\n')
    with pytest.raises(RastosError, match=r"cycle: a -> b -> a"):
        load_workflow("a", dirs)
    write(tmp_path, "c", 'description = "c"\n[[step]]\nop = "motd"\nparams = { text = "${greeting}" }\n')
    with pytest.raises(RastosError, match=r"c.toml: step\[0\].params.text: uses variable 'greeting', which is not"):
        load_workflow("c", dirs)
    write(tmp_path, "d", 'description = "d"\nsteps = []\n')
    with pytest.raises(RastosError, match="unknown key 'steps'"):
        load_workflow("d", dirs)
    with pytest.raises(RastosError, match="no workflow named 'e'"):
        load_workflow("e", dirs)


def test_a_site_workflow_overrides_a_shipped_one(tmp_path: Path) -> None:
    from ops.declared import SHIPPED_WORKFLOWS

    write(tmp_path, "essential", 'description = "ours"\n[[step]]\nop = "motd"\nparams = { text = "site" }\n')
    assert load_workflow("essential", (tmp_path, SHIPPED_WORKFLOWS)).description == "ours"


def test_the_desired_state_is_ordered_and_errors_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "rastos.toml"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa admin@laptop"
    config.write_text(
        '[ssh]\nport = 2222\n\n[motd]\ntext = "hi"\n\n[hostname]\nhostname = "web-1"\n\n'
        f'[[user]]\nname = "admin"\nauthorized_keys = ["{key}"]\n\n[[user]]\nname = "ops"\n'
    )
    steps = desired_state_steps(config)
    assert [s["op"] for s in steps] == ["hostname", "motd", "user", "user", "ssh"], (
        "ssh after user, motd after hostname"
    )
    config.write_text("[ssh]\nport = 0\n")
    with pytest.raises(RastosError, match=r"rastos.toml \[ssh\].port: must be at least 1"):
        desired_state_steps(config)
    config.write_text('[[user]]\nname = "ok"\n[[user]]\nname = "Bad"\n')
    with pytest.raises(RastosError, match=r"rastos.toml \[\[user\]\] #2.name: 'Bad' is not valid"):
        desired_state_steps(config)
    config.write_text("[hostnme]\nhostname = 'x'\n")
    with pytest.raises(RastosError, match=r"\[hostnme\] is not an op"):
        desired_state_steps(config)


@pytest.mark.root
def test_apply_config_dry_run_prints_the_whole_diff_and_changes_nothing(rastosd: Rastosd, tmp_path: Path) -> None:
    config = tmp_path / "rastos.toml"
    config.write_text('[motd]\ntext = "managed"\n\n[hostname]\nhostname = "web-1"\n')
    root = rastosd.scratch.root
    before = tree_digest(root)
    dry = rastosd.ctl("apply-config", "--file", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+web-1" in dry.stdout and "+managed" in dry.stdout and "-rastos" in dry.stdout, dry.stdout
    assert "127.0.1.1\tweb-1" in dry.stdout, "the /etc/hosts diff is shown too"
    assert tree_digest(root) == before, "a dry run changes nothing"
    applied = rastosd.ctl("--json", "apply-config", "--file", str(config))
    assert applied.returncode == 0, applied.stderr
    document = json.loads(applied.stdout)
    assert [s["op"] for s in document["steps"]] == ["hostname", "motd"]
    assert (root / "etc/hostname").read_text() == "web-1\n"
    again = json.loads(rastosd.ctl("--json", "apply-config", "--file", str(config)).stdout)
    assert [s["state"] for s in again["steps"]] == ["unchanged", "unchanged"]


def test_a_profile_names_its_desired_state_and_a_wrong_step_fails_at_load(tmp_path: Path) -> None:
    from imagebuilder.profile import ProfileError, load_profile

    (tmp_path / "state.toml").write_text('[hostname]\nhostname = "edge-1"\n')
    profile_file = tmp_path / "edge.toml"
    profile_file.write_text('extends = "minimal"\n[system]\ndesired_state = "state.toml"\n')
    profile = load_profile(profile_file)
    assert profile.system.desired_state == str(tmp_path / "state.toml"), "resolved beside the profile's file"
    (tmp_path / "state.toml").write_text('[hostname]\nhostname = "Edge_1"\n')
    with pytest.raises(ProfileError) as refused:
        load_profile(profile_file)
    assert str(refused.value).startswith(f"{profile_file}: key 'system.desired_state': state.toml [hostname].hostname")


@pytest.mark.root
@pytest.mark.network
def test_the_image_stage_applies_the_desired_state_to_a_real_tree(op_root: Path, tmp_path: Path) -> None:
    from imagebuilder.stages.desired_state import apply_file

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa admin@laptop"
    state = tmp_path / "rastos.toml"
    state.write_text(
        '[ssh]\nport = 2222\n\n[firewall]\nssh_port = 2222\nallow_tcp = ["443"]\n\n[hostname]\nhostname = "edge-1"\n'
        f'\n[[user]]\nname = "admin"\ngroups = ["sudo"]\nauthorized_keys = ["{key}"]\n'
    )
    assert apply_file(state, op_root) == 4
    assert (op_root / "etc/hostname").read_text() == "edge-1\n"
    assert "Port 2222" in (op_root / "etc/ssh/sshd_config.d/10-rastos.conf").read_text()
    assert "tcp dport 2222" in (op_root / "etc/nftables.conf").read_text()
    assert key in (op_root / "home/admin/.ssh/authorized_keys").read_text()
    assert apply_file(state, op_root) == 0, "built twice: the second pass changes nothing"
