"""Every op against a real Debian root (tests/op_tree.py): plan changes nothing, apply, verify, a
second apply is unchanged, bad params are refused by field. Then what each op promises beyond that."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import InvalidParams, OpFailed
from ops import OPS, get_op
from ops.base import execute
from ops.params import validate
from ops.steps import parse_steps, step_from
from ops.target import Target
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa admin@laptop"
ADMIN = {"name": "admin", "groups": ["sudo"], "authorized_keys": [KEY]}


@dataclass(frozen=True)
class Case:
    op: str
    params: dict[str, Any]
    bad: dict[str, Any]  # params one field off
    refusal: str  # the start of the error, naming the field
    before: tuple[tuple[str, dict[str, Any]], ...] = ()  # steps that make the ground the op needs


CASES = [
    Case("hostname", {"hostname": "web-1.example.org"}, {"hostname": "Web_1"}, "params.hostname: 'Web_1' is not"),
    Case("motd", {"text": "managed by rastOS"}, {"text": 5}, "params.text: must be a string"),
    Case("sysctl", {"settings": {"vm.swappiness": "10"}}, {"settings": {"VM": "1"}}, "params.settings.VM:"),
    Case("user", ADMIN, {**ADMIN, "groups": ["nosuchgroup"]}, "params.groups[0]: group 'nosuchgroup' does not"),
    Case(
        "user",
        {**ADMIN, "name": "ops", "sudo": True, "locked": True, "expires": "2099-12-31"},
        {**ADMIN, "expires": "2099-02-30"},
        "params.expires: '2099-02-30' is not a date",
    ),
    Case(
        "zsh",
        {"users": ["admin"]},
        {"users": []},
        "params.users: must name at least one user",
        before=(("user", ADMIN),),
    ),
    Case(
        "certs",
        {"hostnames": ["web-1.example.org", "web-1"]},
        {"hostnames": ["Web_1"]},
        "params.hostnames[0]: 'Web_1' is not valid",
    ),
    Case(
        "certs",
        {"hub_names": ["hub.example.org", "192.0.2.10"], "trust": False},
        {"hub_names": ["hub.example.org", "192.0.2.300"]},
        "params.hub_names[1]: '192.0.2.300' is not valid",
        before=(("user", {"name": "rastos-hub"}),),  # the hub's user (units/hub/rastos-hub.sysusers)
    ),
    Case("ssh", {"port": 2222}, {"port": 0}, "params.port: must be at least 1", before=(("user", ADMIN),)),
    Case(
        "network",
        {"interface": "eth0", "dhcp": "yes"},
        {"interface": "eth0", "dhcp": "yes", "mtu": 10},
        "params.mtu: must be at least 576",
    ),
    Case("firewall", {"allow_tcp": ["80", "443"]}, {"allow_tcp": ["99999"]}, "params.allow_tcp: '99999' is not a port"),
    # The tree's lists were never fetched and its packages are current: a package to install is the change.
    Case("update", {"packages": ["hello"]}, {"packages": ["Hello"]}, "params.packages[0]: 'Hello' is not valid"),
    Case(
        "monitoring",
        {"listen_address": ":9101", "collectors_disabled": ["wifi"]},
        {"collectors_disabled": ["wifi", "nosuch"]},
        "params.collectors_disabled[1]: this node exporter has no collector 'nosuch'",
    ),
]


def test_every_op_has_a_case() -> None:
    assert {case.op for case in CASES} == set(OPS)


def apply(target: Target, op: str, params: dict[str, Any]) -> list[str]:
    step = step_from(target, op, params, "")
    plan = step.op.plan(target, step.params)
    execute(plan, target, lambda line: None)
    return step.op.verify(target, step.params)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.op)
def test_op_plans_applies_verifies_and_is_idempotent(op_root: Path, case: Case) -> None:
    target = Target(op_root)
    for op, params in case.before:
        assert apply(target, op, params) == []
    step = step_from(target, case.op, case.params, "")
    before = tree_digest(op_root)
    plan = step.op.plan(target, step.params)
    assert plan.actions, "the fresh tree needs a change"
    assert tree_digest(op_root) == before, "planning left the tree byte-identical"
    execute(plan, target, lambda line: None)
    assert step.op.verify(target, step.params) == []
    again = step.op.plan(target, step.params)
    assert again.actions == (), f"a second apply changes nothing: {again.changes}"
    with pytest.raises(InvalidParams) as refused:
        step_from(target, case.op, case.bad, "")
    assert str(refused.value).startswith(case.refusal), str(refused.value)


def drop_in(root: Path) -> Path:
    return root / "etc/ssh/sshd_config.d/10-rastos.conf"


def test_ssh_refuses_to_lock_everyone_out(op_root: Path) -> None:
    target = Target(op_root)
    op = get_op("ssh")
    with pytest.raises(OpFailed, match="no account that may log in has an SSH key"):
        op.plan(target, validate(op.schema, {}))
    # Root's own key does not count while root may not log in, but does once it may (with keys).
    (op_root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (op_root / "root/.ssh/authorized_keys").write_text(KEY + "\n")
    with pytest.raises(OpFailed):
        op.plan(target, validate(op.schema, {"permit_root_login": "no"}))
    assert op.plan(target, validate(op.schema, {"permit_root_login": "prohibit-password"})).actions
    # A key held by a user outside allow_users does not count either.
    assert apply(target, "user", ADMIN) == []
    with pytest.raises(OpFailed):
        op.plan(target, validate(op.schema, {"allow_users": ["someone"]}))


def test_ssh_writes_strong_algorithms_this_openssh_knows_and_sshd_agrees(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", ADMIN) == []
    assert apply(target, "ssh", {"port": 2222, "allow_groups": ["sudo"]}) == []
    text = drop_in(op_root).read_text()
    assert "Port 2222\n" in text and "PasswordAuthentication no\n" in text and "PermitRootLogin no\n" in text
    assert "KexAlgorithms mlkem768x25519-sha256," in text, "trixie's OpenSSH 10 knows ML-KEM: it comes first"
    assert "cbc" not in text and "sha1" not in text
    from ops.ssh import effective_config

    effective = effective_config(target)
    assert effective["port"] == "2222" and effective["passwordauthentication"] == "no"
    assert effective["allowgroups"] == "sudo"


def test_ssh_config_that_sshd_refuses_never_reaches_etc(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", ADMIN) == []
    before = tree_digest(op_root)
    step = step_from(target, "ssh", {"ciphers": ["rot13-cbc"]}, "")
    plan = step.op.plan(target, step.params)
    with pytest.raises(OpFailed, match="sshd -t refuses the new configuration"):
        execute(plan, target, lambda line: None)
    assert not drop_in(op_root).exists()
    assert tree_digest(op_root) == before, "no scratch copy is left in /etc/ssh either"


def test_a_pipeline_that_turns_passwords_off_before_the_key_is_refused(op_root: Path) -> None:
    steps = [{"op": "ssh", "params": {}}, {"op": "user", "params": ADMIN}]
    with pytest.raises(InvalidParams, match=r"steps\[0\]\.op: ssh must come after user \(step 2\)"):
        parse_steps(Target(op_root), json.dumps(steps))
