"""Compliance checks and sysctl tuning sets: a scan of a real Debian tree, its remediation pipeline applied
and scanned again, the reports (table, JSON, self-contained HTML), and the real daemon answering
ComplianceScan and running `rastosctl compliance remediate` as a job."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.compliance import CHECKS, scan
from daemon.compliance.model import Report, Status
from daemon.compliance.remediate import pipeline, select
from daemon.compliance.report import render, to_json
from daemon.errors import InvalidParams
from ops import OPS, get_op
from ops.base import execute
from ops.params import validate
from ops.ssh import effective_config
from ops.steps import parse_steps, step_from
from ops.sysctl import SETS, live_path, persisted, wanted_settings
from ops.target import Target
from tests.daemon_fixtures import (
    ADMIN_GROUP,
    MANAGER,
    PERMISSIVE_POLICY,
    PLAIN_USER,
    PrivateBus,
    Rastosd,
    ScratchRoot,
    ensure_test_users,
    private_bus,
)
from tests.netns import namespace_pair
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa admin@laptop"
ADMIN = {"name": "admin", "groups": ["sudo"], "authorized_keys": [KEY]}
COMPLIANCE_FILE = "etc/sysctl.d/95-rastos-compliance.conf"


def apply_steps(target: Target, steps: list[dict[str, Any]]) -> None:
    """A pipeline applied in-process as a job would: parsed (validated, order checked), then each step."""
    for step in parse_steps(target, json.dumps(steps)):
        execute(step.op.plan(target, step.params), target, lambda line: None)
        assert step.op.verify(target, step.params) == [], step.op.name


def apply(target: Target, op: str, params: dict[str, Any]) -> None:
    apply_steps(target, [{"op": op, "params": params}])


def results(report: Report) -> dict[str, Any]:
    return {result.id: result for result in report.results}


# sysctl tuning sets


def sysctl_plan_text(target: Target, params: dict[str, Any]) -> str:
    op = get_op("sysctl")
    execute(op.plan(target, validate(op.schema, params)), target, lambda line: None)
    return target.host_path("/etc/sysctl.d/90-rastos.conf").read_text()


def test_sysctl_sets_merge_with_settings_and_explicit_wins(tmp_path: Path) -> None:
    target = Target(tmp_path)
    text = sysctl_plan_text(target, {"sets": ["security"]})
    assert "# Sets: security; explicit settings win over them.\n" in text
    assert all(f"{key} = {value}\n" in text for key, value in SETS["security"].items())
    text = sysctl_plan_text(target, {"sets": ["security", "network"], "settings": {"kernel.sysrq": "176"}})
    assert "kernel.sysrq = 176\n" in text and "kernel.sysrq = 0" not in text, "the explicit setting wins"
    assert "net.ipv4.tcp_syncookies = 1\n" in text
    op = get_op("sysctl")
    removal = op.plan(target, validate(op.schema, {}))
    assert [c.action for c in removal.changes] == ["remove"], "no settings and no sets: the file goes"
    with pytest.raises(InvalidParams, match=r"^params\.sets\[1\]: must be one of security, network, performance"):
        validate(op.schema, {"sets": ["network", "speed"]})


def test_performance_set_takes_bbr_and_fq_only_where_the_kernel_has_them(tmp_path: Path) -> None:
    target = Target(tmp_path)
    text = sysctl_plan_text(target, {"sets": ["performance"]})
    assert "vm.swappiness = 10\n" in text
    assert "tcp_congestion_control" not in text.split("# Left out")[0], "no kernel in the tree: no BBR"
    assert "# Left out, this kernel cannot take them: net.core.default_qdisc, net.ipv4.tcp_congestion_control\n" in text
    modules = tmp_path / "usr/lib/modules/6.12.0-1-amd64"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text("kernel/net/ipv4/tcp_bbr.ko.xz:\nkernel/net/sched/sch_fq_codel.ko.xz:\n")
    text = sysctl_plan_text(target, {"sets": ["performance"]})
    assert "net.ipv4.tcp_congestion_control = bbr\n" in text, "the tree's kernel has tcp_bbr"
    assert "# Left out, this kernel cannot take them: net.core.default_qdisc\n" in text, "fq_codel is not fq"


def test_sysctl_sets_on_a_live_kernel_leave_out_what_it_lacks_but_refuse_explicit_keys(tmp_path: Path) -> None:
    live = Target(tmp_path, runtime=True)
    op = get_op("sysctl")
    params = validate(op.schema, {"sets": ["security", "network"]})
    wanted = wanted_settings(live, params)
    for key in {**SETS["security"], **SETS["network"]}:
        assert (key in wanted.settings) == live_path(key).is_file(), key
        assert (key in wanted.left_out) == (not live_path(key).is_file()), key
    op.check(live, params)  # a set's missing key is left out, not refused
    with pytest.raises(InvalidParams, match=r"^params\.settings\.kernel\.no_such_key: this kernel has no such"):
        op.check(live, validate(op.schema, {"settings": {"kernel.no_such_key": "1"}}))


def test_persisted_sysctl_is_read_as_systemd_sysctl_reads_it(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc/sysctl.d", tmp_path / "usr/lib/sysctl.d"
    etc.mkdir(parents=True)
    lib.mkdir(parents=True)
    (lib / "10-a.conf").write_text("kernel.sysrq = 1\nkernel.kptr_restrict = 1\n")
    (etc / "10-a.conf").write_text("kernel.sysrq = 0\n")  # the same name in /etc hides the vendor's file
    (lib / "50-b.conf").write_text("# comment\n; also a comment\n-fs/suid_dumpable=1\nnet.ipv4.conf.*.rp_filter = 2\n")
    (tmp_path / "etc/sysctl.conf").write_text("kernel.dmesg_restrict = 1\n")
    (etc / "99-sysctl.conf").symlink_to("../sysctl.conf")
    (lib / "60-c.conf").write_text("vm.swappiness = 1\n")
    (etc / "60-c.conf").symlink_to("/dev/null")  # masked
    (etc / "70-d.conf").write_text("fs.suid_dumpable = 0\n")  # a later file wins
    values = persisted(Target(tmp_path))
    assert {key: (p.value, p.source) for key, p in values.items()} == {
        "kernel.sysrq": ("0", "/etc/sysctl.d/10-a.conf"),
        "fs.suid_dumpable": ("0", "/etc/sysctl.d/70-d.conf"),
        "kernel.dmesg_restrict": ("1", "/etc/sysctl.d/99-sysctl.conf"),
    }


# The checks


def test_checks_are_many_distinct_and_each_says_how_to_fix_it() -> None:
    ids = [check.id for check in CHECKS]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    for check in CHECKS:
        assert check.remediation is not None or check.manual, f"{check.id}: an op or a hint"
        assert check.title and check.rationale.endswith("."), check.id
        if check.remediation is not None:
            assert check.remediation.op in OPS, check.id
            validate(OPS[check.remediation.op].schema, check.remediation.params)
    assert len({check.remediation.op for check in CHECKS if check.remediation}) >= 4


def test_scan_of_a_fresh_debian_tree_reads_and_changes_nothing(op_root: Path) -> None:
    before = tree_digest(op_root)
    report = scan(Target(op_root))
    assert tree_digest(op_root) == before, "a scan changes nothing"
    assert len(report.results) >= 30 and report.count(Status.FAIL) >= 10 and report.count(Status.PASS) >= 10
    found = results(report)
    assert found["kernel-aslr"].status is Status.FAIL
    assert found["kernel-aslr"].finding == "kernel.randomize_va_space is set in no sysctl.d file (wants 2)"
    assert found["ssh-no-root-login"].finding == "sshd -T: permitrootlogin without-password (wants no)"
    assert found["ssh-strong-macs"].status is Status.FAIL and "hmac-sha1" in found["ssh-strong-macs"].finding
    assert found["file-shadow"].status is Status.PASS, "Debian's root:shadow 0640"
    assert found["accounts-no-empty-passwords"].status is Status.PASS
    assert found["firewall-input-drop"].status is Status.FAIL and found["banner-motd"].status is Status.FAIL
    assert found["file-crontab"].status is Status.NOT_APPLICABLE, "no cron in the tree"
    password = found["ssh-no-password-auth"]
    assert password.status is Status.FAIL and password.remediation is None, "nobody has a key: no remediation"
    assert "no account that may log in has an SSH key" in password.finding
    steps = pipeline(report.results, report.context)
    assert [step["op"] for step in steps] == ["sysctl", "ssh", "firewall", "motd"]
    assert steps[0]["params"] == {"sets": ["security", "network"], "settings": {}, "name": "95-rastos-compliance"}
    assert steps[1]["params"]["password_authentication"] is True, "kept: turning it off would lock everyone out"


def test_the_remediation_pipeline_fixes_the_checks_it_maps(op_root: Path) -> None:
    target = Target(op_root)
    apply(target, "user", ADMIN)  # an admin with a key: passwords may go
    # A site drop-in read after the op's: what the op's drop-in says about it wins, so it must say the same.
    (op_root / "etc/ssh/sshd_config.d/50-site.conf").write_text("Port 2222\nAllowUsers admin operator\n")
    report = scan(target)
    fixable = [result.id for result in report.failed if result.remediation is not None]
    assert len(fixable) >= 25 and "ssh-no-password-auth" in fixable
    steps = pipeline(report.results, report.context)
    assert [step["op"] for step in steps] == ["sysctl", "ssh", "firewall", "motd"]
    assert steps[2]["params"]["ssh_port"] == 2222, "the firewall keeps sshd's port open"
    apply_steps(target, steps)
    again = scan(target)
    after = results(again)
    assert {i: after[i].finding for i in fixable if after[i].status is not Status.PASS} == {}
    assert pipeline(again.results, again.context) == [], "nothing left that an op can fix"
    effective = effective_config(target)
    assert effective["port"] == "2222" and effective["passwordauthentication"] == "no"
    assert "allowusers admin" in subprocess.run(
        ["bwrap", "--bind", op_root, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run", "--dir", "/run/sshd",
         "/usr/sbin/sshd", "-T"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert not any(result.status is Status.FAIL and result.remediation for result in again.results)


def test_ssh_remediation_is_withheld_where_the_op_could_not_keep_the_configuration(op_root: Path) -> None:
    target = Target(op_root)
    site = op_root / "etc/ssh/sshd_config.d/05-site.conf"
    site.write_text("Port 22\nPort 2222\n")
    found = results(scan(target))
    assert found["ssh-no-x11-forwarding"].remediation is None, "the op keeps one port: it would drop 2222"
    assert "sshd listens on ports 22, 2222" in found["ssh-no-x11-forwarding"].finding
    site.write_text("PermitRootLogin forced-commands-only\n")
    found = results(scan(target))
    assert found["ssh-no-x11-forwarding"].remediation is None, "a backup key's forced command would stop working"
    assert found["ssh-no-root-login"].remediation is not None, "turning root's login off is what was asked"


def test_a_second_remediation_adds_to_the_first(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    target = Target(tmp_path)
    first = scan(target)
    apply_steps(target, pipeline(select(first.results, ["kernel-aslr"]), first.context))
    assert "kernel.randomize_va_space = 2\n" in (tmp_path / COMPLIANCE_FILE).read_text()
    second = scan(target)
    assert results(second)["kernel-aslr"].status is Status.PASS
    assert results(second)["net-rp-filter"].status is Status.FAIL
    steps = pipeline(select(second.results, ["net-rp-filter", "kernel-aslr"]), second.context)
    assert steps[0]["params"]["sets"] == ["network"] and "kernel.randomize_va_space" in steps[0]["params"]["settings"]
    apply_steps(target, steps)
    third = results(scan(target))
    assert third["net-rp-filter"].status is Status.PASS and third["kernel-aslr"].status is Status.PASS
    with pytest.raises(ValueError, match="no check 'no-such-check'"):
        select(second.results, ["no-such-check"])


def test_a_live_scan_reads_the_running_kernel_and_keeps_listening_ports_open(op_root: Path) -> None:
    with namespace_pair() as pair, pair.serving(8080, 9090), pair.inside_host():
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")  # this namespace's: a router
        report = scan(Target(op_root, runtime=True))
        assert report.live
        assert report.context["firewall"] == {"ssh_port": 22, "allow_tcp": ["8080", "9090"], "allow_udp": [],
                                              "forward": "accept"}  # fmt: skip
        syncookies = results(report)["net-tcp-syncookies"]
        assert syncookies.finding.endswith("; the kernel has 1 now")
        ptrace = results(report)["kernel-ptrace-scope"]
        assert (ptrace.status is Status.NOT_APPLICABLE) == (not live_path("kernel.yama.ptrace_scope").is_file())


# Reports


def poisoned(tmp_path: Path) -> Report:
    """A tree whose sysctl file carries markup: the finding quotes the value."""
    (tmp_path / "etc/sysctl.d").mkdir(parents=True)
    (tmp_path / "etc/sysctl.d/50-x.conf").write_text("kernel.sysrq = <script>alert(1)</script>\n")
    return scan(Target(tmp_path))


def test_html_is_self_contained_and_escapes_findings(tmp_path: Path) -> None:
    report = poisoned(tmp_path)
    assert "<script>alert(1)</script>" in results(report)["kernel-sysrq"].finding
    page = render(report, "html")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    lowered = page.lower()
    assert "<script" not in lowered and "src=" not in lowered and "href=" not in lowered
    assert "url(" not in lowered and "@import" not in lowered, "nothing is fetched"
    assert "default-src 'none'" in page
    assert all(f"<code>{check.id}</code>" in page for check in CHECKS)


def test_json_round_trips_and_the_table_shows_every_check(tmp_path: Path) -> None:
    report = poisoned(tmp_path)
    document = json.loads(render(report, "json"))
    assert Report.from_json(document) == report
    assert document["summary"] == {"pass": report.count(Status.PASS), "fail": report.count(Status.FAIL),
                                   "not-applicable": report.count(Status.NOT_APPLICABLE)}  # fmt: skip
    assert document["pipeline"] == to_json(report)["pipeline"] and document["pipeline"][0]["op"] == "sysctl"
    table = render(report, "table")
    assert all(f"  {check.id} " in table for check in CHECKS)
    assert f"{len(CHECKS)} checks of {tmp_path}:" in table


# The daemon


def test_the_daemon_scans_and_rastosctl_remediates_as_a_job(rastosd: Rastosd, tmp_path: Path) -> None:
    document = json.loads(rastosd.call(MANAGER, "ComplianceScan")[0])
    found = {check["id"]: check for check in document["checks"]}
    assert len(found) >= 30 and document["target"] == str(rastosd.scratch.root) and not document["live"]
    assert found["ssh-no-root-login"]["status"] == "not-applicable", "no sshd in the scratch root"
    assert found["file-shadow"]["status"] == "pass" and found["kernel-aslr"]["status"] == "fail"
    assert found["firewall-enabled"]["remediation"] is None, "no nftables to remediate with"
    assert [step["op"] for step in document["pipeline"]] == ["sysctl"]

    scanned = rastosd.ctl("compliance", "scan", "--format", "json")
    assert scanned.returncode == 4, scanned.stderr
    assert [c["id"] for c in json.loads(scanned.stdout)["checks"]] == list(found)
    page = tmp_path / "report.html"
    assert rastosd.ctl("compliance", "scan", "--format", "html", "--output", str(page)).returncode == 4
    assert "<code>kernel-aslr</code>" in page.read_text()

    dry = rastosd.ctl("compliance", "remediate", "--dry-run")
    assert dry.returncode == 0 and "step 1: sysctl planned" in dry.stdout, dry
    assert not (rastosd.scratch.root / COMPLIANCE_FILE).exists()
    assert "by hand: firewall-enabled" in dry.stderr
    done = rastosd.ctl("compliance", "remediate", "--check", "kernel-aslr", "--check", "file-shadow")
    assert done.returncode == 0 and "step 1: sysctl changed" in done.stdout and "snapshots: pre" in done.stdout, done
    after = {c["id"]: c for c in json.loads(rastosd.ctl("compliance", "scan", "--format", "json").stdout)["checks"]}
    assert after["kernel-aslr"]["status"] == "pass" and after["kernel-dmesg-restrict"]["status"] == "pass"
    assert after["net-rp-filter"]["status"] == "fail", "only the security set was asked for"
    unknown = rastosd.ctl("compliance", "remediate", "--check", "kernel-aslr", "--check", "nope")
    assert unknown.returncode == 2 and "no check 'nope'" in unknown.stderr


@pytest.fixture
def permissive(daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path) -> Iterator[Rastosd]:
    ensure_test_users()
    _, scratch, state_dir = daemon_env
    config = tmp_path / "daemon.toml"
    config.write_text(f'[access]\nadmin_group = "{ADMIN_GROUP}"\n')
    with private_bus(PERMISSIVE_POLICY) as bus:
        daemon = Rastosd(bus, scratch, state_dir, config)
        daemon.start()
        yield daemon
        daemon.stop()


def test_a_scan_reads_secrets_so_only_admins_may_ask(permissive: Rastosd) -> None:
    refused = permissive.gdbus(MANAGER, "ComplianceScan", user=PLAIN_USER)
    assert refused.returncode != 0
    assert "AccessDenied: ComplianceScan reads /etc/shadow and users' keys: only root" in refused.stderr
    assert json.loads(permissive.call(MANAGER, "ComplianceScan")[0])["checks"]


def test_step_from_accepts_sets_alone(tmp_path: Path) -> None:
    step = step_from(Target(tmp_path), "sysctl", {"sets": ["security"]}, "")
    assert step.params == {"settings": {}, "sets": ["security"], "name": "90-rastos"}
