"""The op engine from data: params validation, plans against a scratch root, idempotence, the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.errors import InvalidParams, UnknownOp
from daemon.store import StateStore
from daemon.store_schema import MIGRATIONS
from ops import OPS, get_op
from ops.actions import WriteFile
from ops.base import execute
from ops.hostname import hosts_with
from ops.params import Kind, Param, json_schema, validate
from ops.steps import parse_steps
from ops.target import Target
from rastos.errors import RastosError

SCHEMA = (
    Param("name", Kind.STRING, "a name", required=True, pattern="[a-z]+", pattern_help="lower-case letters"),
    Param("count", Kind.INTEGER, "how many", default=1, minimum=1, maximum=9),
    Param("tags", Kind.STRING_LIST, "tags", default=[]),
    Param("env", Kind.STRING_MAP, "environment", default={}, key_pattern="[A-Z]+"),
    Param("on", Kind.BOOLEAN, "switch", default=False),
)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "params.name: is required (a name)"),
        ({"name": "ok", "cont": 2}, "params.cont: unknown parameter (did you mean 'count'?)"),
        ({"name": 7}, "params.name: must be a string, got a number"),
        ({"name": "Bad"}, "params.name: 'Bad' is not valid: lower-case letters"),
        ({"name": "ok", "count": 0}, "params.count: must be at least 1, got 0"),
        ({"name": "ok", "count": True}, "params.count: must be an integer, got a boolean"),
        ({"name": "ok", "tags": ["a", 1]}, "params.tags[1]: must be a string, got a number"),
        ({"name": "ok", "env": {"lower": "x"}}, "params.env.lower: 'lower' is not valid: must match [A-Z]+"),
        ({"name": "ok", "on": "yes"}, "params.on: must be true or false, got a string"),
        ({"name": "a\0b"}, "params.name: must not contain a NUL character"),
    ],
)
def test_params_are_refused_with_the_field_named(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParams) as refused:
        validate(SCHEMA, params)
    assert str(refused.value) == message


def test_params_get_defaults_and_a_json_schema() -> None:
    assert validate(SCHEMA, {"name": "ok"}) == {"name": "ok", "count": 1, "tags": [], "env": {}, "on": False}
    schema = json_schema(SCHEMA)
    assert schema["required"] == ["name"] and schema["additionalProperties"] is False
    assert schema["properties"]["count"] == {
        "type": "integer", "minimum": 1, "maximum": 9, "description": "how many", "default": 1,
    }  # fmt: skip
    for op in OPS.values():
        json.dumps(json_schema(op.schema))  # every op's schema is publishable


def test_steps_are_all_validated_before_any_runs(tmp_path: Path) -> None:
    target = Target(tmp_path)
    good = {"op": "motd", "params": {"text": "x"}}
    with pytest.raises(InvalidParams, match=r"^steps\[2\]\.params\.hostname: is required"):
        parse_steps(target, json.dumps([good, good, {"op": "hostname", "params": {}}]))
    with pytest.raises(UnknownOp, match=r"steps\[0\]\.op: no op named 'motto'"):
        parse_steps(target, json.dumps([{"op": "motto"}]))
    with pytest.raises(UnknownOp):
        get_op("nope")


def test_hosts_line_is_replaced_or_added() -> None:
    assert hosts_with("127.0.0.1\tlocalhost\n127.0.1.1\told\n", "new.example.org") == (
        "127.0.0.1\tlocalhost\n127.0.1.1\tnew.example.org new\n"
    )
    assert hosts_with("127.0.0.1\tlocalhost\n", "web") == "127.0.0.1\tlocalhost\n127.0.1.1\tweb\n"
    assert hosts_with("", "web") == "127.0.1.1\tweb\n"


@pytest.mark.parametrize(
    ("op", "params", "path"),
    [
        ("hostname", {"hostname": "web-1"}, "/etc/hostname"),
        ("motd", {"text": "welcome"}, "/etc/motd"),
        ("sysctl", {"settings": {"vm.swappiness": "10", "net.ipv4.ip_forward": "1"}}, "/etc/sysctl.d/90-rastos.conf"),
    ],
)
def test_file_ops_plan_apply_and_are_idempotent(tmp_path: Path, op: str, params: dict[str, object], path: str) -> None:
    (tmp_path / "etc").mkdir()
    target = Target(tmp_path)
    definition = get_op(op)
    checked = validate(definition.schema, params)
    plan = definition.plan(target, checked)
    assert plan.actions and all(isinstance(a, WriteFile) for a in plan.actions)
    assert path in plan.paths
    assert not target.host_path(path).exists(), "planning changed nothing"
    execute(plan, target, lambda line: None)
    assert definition.verify(target, checked) == []
    assert definition.plan(target, checked).actions == (), "a second apply is unchanged"
    assert target.host_path(path).stat().st_mode & 0o777 == 0o644


def test_sysctl_file_is_sorted_and_empty_settings_remove_it(tmp_path: Path) -> None:
    target = Target(tmp_path)
    op = get_op("sysctl")
    params = validate(op.schema, {"settings": {"vm.swappiness": "10", "kernel.panic": "5"}})
    execute(op.plan(target, params), target, lambda line: None)
    lines = target.host_path("/etc/sysctl.d/90-rastos.conf").read_text().splitlines()
    assert lines[1:] == ["kernel.panic = 5", "vm.swappiness = 10"]
    removal = op.plan(target, validate(op.schema, {"settings": {}}))
    assert [c.action for c in removal.changes] == ["remove"]


def test_motd_diff_shows_the_change(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/motd").write_text("old\n")
    plan = get_op("motd").plan(Target(tmp_path), {"text": "new"})
    assert plan.changes[0].action == "modify"
    assert "-old\n+new\n" in plan.changes[0].detail


def test_store_migrates_records_and_interrupts(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    assert store.schema_version == len(MIGRATIONS)
    job = store.add_job("apply", [{"op": "motd", "params": {"text": "x"}}], 0, 1000, "Apply")
    store.set_job_state(job, "running")
    store.close()
    reopened = StateStore(tmp_path / "state.db")  # what a restart after SIGKILL sees
    assert reopened.interrupt_unfinished_jobs() == [job]
    row = reopened.job(job)
    assert row is not None and row.state == "interrupted" and row.uid == 1000
    assert [e.method for e in reopened.events(0, 10)] == ["Apply", "JobInterrupted"]
    assert reopened.steps(job)[0]["state"] == "interrupted"
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_daemon_config_refuses_unknown_keys(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text('[access]\nadmin_group = "wheel"\n[snapshots]\nkeep_pairs = 4\n')
    loaded = load_config(config)
    assert loaded.admin_group == "wheel" and loaded.keep_pairs == 4
    config.write_text("[snapshots]\nkeep_pair = 4\n")
    with pytest.raises(RastosError, match=r"unknown key 'snapshots\.keep_pair'"):
        load_config(config)
    config.write_text('[snapshots]\nkeep_pairs = "4"\n')
    with pytest.raises(RastosError, match=r"snapshots\.keep_pairs must be int"):
        load_config(config)
    config.write_text('[hub]\nurl = "wss://hub.example:8470/api/v1/agent"\ntoken_file = "/etc/rastos/t"\n')
    loaded = load_config(config)
    assert loaded.hub_url == "wss://hub.example:8470/api/v1/agent" and loaded.hub_token_file == Path("/etc/rastos/t")
    config.write_text('[hub]\nurl = "http://hub.example"\n')
    with pytest.raises(RastosError, match=r"hub\.url must be a ws:// or wss:// URL"):
        load_config(config)


@pytest.mark.parametrize(
    ("name", "left", "identity"),
    [("rastos-0+3.conf", 3, "rastos-0.conf"), ("rastos-snapshot-7+0-3.conf", 0, "rastos-snapshot-7.conf"),
     ("rastos-0.conf", None, "rastos-0.conf"), ("rastos-1+2-1.conf", 2, "rastos-1.conf")],
)  # fmt: skip
def test_boot_counter_in_entry_names(name: str, left: int | None, identity: str) -> None:
    from daemon.boot import entry_id, tries_left

    assert tries_left(name) == left
    assert entry_id(name) == identity


def test_a_plan_s_diff_of_a_huge_file_is_cut_so_jobs_and_readers_stay_small(tmp_path: Path) -> None:
    from ops.actions import MAX_DIFF

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/motd").write_text("".join(f"line {n} of an admin's very long motd\n" for n in range(50000)))
    op = get_op("motd")
    plan = op.plan(Target(tmp_path, runtime=False), validate(op.schema, {"text": "short"}))
    detail = plan.changes[0].detail
    assert len(detail) < MAX_DIFF + 100 and detail.endswith("characters)\n"), detail[-200:]
    assert "(diff cut at 65536 of its" in detail
