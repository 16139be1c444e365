"""The update, monitoring and dynamic motd ops against the real Debian tree (tests/op_tree.py).

Upgrades happen for real: the tree gets bookworm's hello (2.10-3, older than trixie's 2.10-5) from
Debian's registry, so trixie's lists offer an upgrade; nothing is downgraded. The node exporter runs
from the tree with the ARGS the op wrote, in a network namespace, and answers /metrics. The motd
script runs in the tree with no daemon to ask.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import InvalidParams
from ops import get_op, monitoring
from ops.base import Plan, execute
from ops.monitoring import BINARY, DEFAULTS, ENABLED_LINK, InstallPackages
from ops.motd import DYNAMIC, SCRIPT
from ops.packages import APT_ENV, AptBackend, Transition, parse_simulation, with_network
from ops.params import validate
from ops.shadow import shadow
from ops.steps import step_from
from ops.target import Target, in_target
from ops.update import PackageStep, RefreshLists
from rastos.process import run
from tests.daemon_fixtures import CHECKOUT, Rastosd
from tests.netns import Pair, namespace_pair
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]

BOOKWORM = "deb http://deb.debian.org/debian bookworm main\n"
SECURITY = "deb http://security.debian.org/debian-security trixie-security main\n"
OLD_HELLO, NEW_HELLO = "2.10-3", "2.10-5"  # bookworm's and trixie's, fixed for good in released suites


def apt(root: Path, *args: str) -> str:
    """apt-get run in the tree the way the op runs it (its sandbox, its environment)."""
    return run(with_network(Target(root), ["apt-get", *args]), capture=True, env=APT_ENV).stdout


def dpkg_version(root: Path, package: str) -> str | None:
    result = run(in_target(Target(root), ["dpkg-query", "-W", "-f=${Version} ${db:Status-Status}", package]),
                 capture=True, check=False)  # fmt: skip
    version, _, status = result.stdout.partition(" ")
    return version if result.returncode == 0 and status == "installed" else None


def apply(target: Target, op: str, params: dict[str, object]) -> tuple[Plan, list[str], list[str]]:
    """Plan, apply and verify one step; returns the plan, the output lines and verify's problems."""
    step = step_from(target, op, params, "")
    plan = step.op.plan(target, step.params)
    lines: list[str] = []
    execute(plan, target, lines.append)
    return plan, lines, step.op.verify(target, step.params)


@pytest.fixture
def older_hello(op_root: Path) -> Path:
    """The tree with bookworm's hello installed: trixie's lists offer 2.10-5 over it."""
    (op_root / "etc/apt/sources.list.d/bookworm.list").write_text(BOOKWORM)
    apt(op_root, "update", "--error-on=any")
    apt(op_root, "install", "-y", f"hello={OLD_HELLO}")
    assert dpkg_version(op_root, "hello") == OLD_HELLO
    return op_root


# update: reading apt's simulation


def test_the_parser_reads_real_simulate_output(older_hello: Path) -> None:
    output = apt(older_hello, "-s", "-o", "Debug::NoLocking=1", "dist-upgrade")
    changes = parse_simulation(output)
    assert Transition("hello", "upgrade", OLD_HELLO, NEW_HELLO, security=False) in changes, output
    assert len(changes) == sum(line.startswith(("Inst ", "Remv ")) for line in output.splitlines())
    install = parse_simulation(apt(older_hello, "-s", "-o", "Debug::NoLocking=1", "install", "cowsay"))
    assert Transition("cowsay", "install", None, "3.03+dfsg2-8") in install, "a new package: no old version"
    assert {change.name for change in install} >= {"cowsay", "perl"}, "its dependencies are changes too"


def test_the_parser_knows_security_origins_and_removals() -> None:
    """Lines as apt 3.0 and 2.6 print them: several releases, a trailing dependants list, a removal."""
    output = (
        "Inst apt [3.0.3] (3.0.4 Debian-Security:13/stable-security [amd64]) [apt-utils:amd64 ]\n"
        "Conf apt (3.0.4 Debian-Security:13/stable-security [amd64])\n"
        "Inst libgcrypt20 [1.10.1-3] (1.10.1-3+deb12u1 Debian:12.15/oldstable, "
        "Debian-Security:12/oldstable-security [amd64]) []\n"
        "Inst hello [2.10-3] (2.10-5 Debian:13.7/stable [amd64])\n"
        "Remv libfoo1 [1.2-1]\n"
    )
    assert parse_simulation(output) == [
        Transition("apt", "upgrade", "3.0.3", "3.0.4", security=True),
        Transition("libgcrypt20", "upgrade", "1.10.1-3", "1.10.1-3+deb12u1", security=True),
        Transition("hello", "upgrade", "2.10-3", "2.10-5", security=False),
        Transition("libfoo1", "remove", "1.2-1", None),
    ]


# update: the op


def test_update_upgrades_the_older_package_and_names_it(older_hello: Path) -> None:
    target = Target(older_hello)
    step = step_from(target, "update", {}, "")
    before = tree_digest(older_hello)
    plan = step.op.plan(target, step.params)
    assert tree_digest(older_hello) == before, "a plan reads the lists as they are and changes nothing"
    assert isinstance(plan.actions[0], RefreshLists), "the refresh is an action of the apply"
    hello = [change for change in plan.changes if change.subject == "package hello"]
    assert [(c.action, c.detail) for c in hello] == [("upgrade", f"{OLD_HELLO} -> {NEW_HELLO}")]
    lines: list[str] = []
    execute(plan, target, lines.append)
    assert f"upgrade hello {OLD_HELLO} -> {NEW_HELLO}" in lines, lines
    assert dpkg_version(older_hello, "hello") == NEW_HELLO
    assert step.op.verify(target, step.params) == []
    assert step.op.plan(target, step.params).actions == (), "applied again: nothing to do"


def test_security_only_leaves_a_stable_upgrade_alone(older_hello: Path) -> None:
    (older_hello / "etc/apt/sources.list.d/security.list").write_text(SECURITY)
    apt(older_hello, "update", "--error-on=any")
    target = Target(older_hello)
    full = get_op("update").plan(target, validate(get_op("update").schema, {"refresh": False}))
    step = step_from(target, "update", {"security_only": True, "refresh": False}, "")
    plan = step.op.plan(target, step.params)
    assert "package hello" in [change.subject for change in full.changes]
    steps = [action.transition for action in plan.actions if isinstance(action, PackageStep)]
    assert "hello" not in [change.name for change in steps], "hello's new version is not a security update"
    upgraded = [change for change in steps if change.verb == "upgrade"]
    assert all(change.security for change in upgraded), upgraded
    if upgraded:  # trixie-security has had updates for the tree's packages since it was made
        lines: list[str] = []
        execute(plan, target, lines.append)
        assert all(any(line.startswith(f"upgrade {c.name} {c.old} -> ") for line in lines) for c in upgraded), lines
        assert step.op.verify(target, step.params) == []
    assert dpkg_version(older_hello, "hello") == OLD_HELLO, "security only: hello stays as it was"
    assert step.op.plan(target, step.params).actions == ()


def test_a_dry_run_simulates_the_transaction_on_its_shadow(older_hello: Path) -> None:
    """A dry run's shadow lives in memory: apt's simulation stands in for downloads and dpkg."""
    before = tree_digest(older_hello)
    with shadow(Target(older_hello)) as shadowed:
        _, lines, _ = apply(shadowed, "update", {})
    assert "dry run: the package lists are not refreshed" in lines
    assert f"dry run: would upgrade hello {OLD_HELLO} -> {NEW_HELLO}" in lines, lines
    assert tree_digest(older_hello) == before and dpkg_version(older_hello, "hello") == OLD_HELLO


def test_a_plan_never_refreshes_the_lists(op_root: Path) -> None:
    """The fresh tree's lists were never fetched: with a refresh, that alone is worth an apply (nothing
    can be planned from empty lists); without one there is nothing to do."""
    target = Target(op_root)
    op = get_op("update")
    before = tree_digest(op_root)
    plan = op.plan(target, validate(op.schema, {}))
    assert [change.subject for change in plan.changes] == ["package lists", "packages"]
    assert op.plan(target, validate(op.schema, {"refresh": False})).actions == ()
    assert tree_digest(op_root) == before
    assert not AptBackend(target).has_lists()


def test_a_package_the_lists_lack_is_refused_by_field_unless_they_are_refreshed(op_root: Path) -> None:
    target = Target(op_root)
    with pytest.raises(InvalidParams, match=r"^params\.packages\[1\]: the package lists offer no hello"):
        step_from(target, "update", {"packages": ["zsh", "hello"], "refresh": False}, "")
    step = step_from(target, "update", {"packages": ["hello"]}, "")
    changes = step.op.plan(target, step.params).changes
    assert changes[-1].subject == "package hello"
    assert changes[-1].detail == "(none) -> (the version the refreshed lists offer)"


@pytest.mark.parametrize(
    ("params", "refusal"),
    [
        ({"packages": ["hello world"]}, "params.packages[0]: 'hello world' is not valid"),
        ({"packages": ["-oDebug::x=1"]}, "params.packages[0]: '-oDebug::x=1' is not valid"),
        ({"security_only": "yes"}, "params.security_only: must be true or false"),
        ({"autoremove": 1}, "params.autoremove: must be true or false"),
    ],
)
def test_update_params_are_refused_by_field(op_root: Path, params: dict[str, object], refusal: str) -> None:
    with pytest.raises(InvalidParams) as refused:
        step_from(Target(op_root), "update", params, "")
    assert str(refused.value).startswith(refusal)


# monitoring


@pytest.fixture
def pair() -> Iterator[Pair]:
    with namespace_pair() as made:
        yield made


def written_args(root: Path) -> list[str]:
    """ARGS as the unit's EnvironmentFile gives them to the exporter."""
    match = re.search(r'^ARGS="(.*)"$', (root / DEFAULTS.lstrip("/")).read_text(), re.MULTILINE)
    assert match, "the file sets ARGS"
    return shlex.split(match[1])


def fetch(url: str, log: Path) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer; the exporter said:\n{log.read_text()}"
            time.sleep(0.2)


def test_the_exporter_answers_with_the_args_the_op_wrote(
    op_root: Path, pair: Pair, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = "http://127.0.0.1:9200/metrics"
    params: dict[str, object] = {
        "listen_address": ":9200", "collectors_disabled": ["arp"], "textfile_directory": "/var/lib/rastos-prom"
    }  # fmt: skip
    _, _, problems = apply(Target(op_root), "monitoring", params)
    assert problems == []
    assert (op_root / ENABLED_LINK.lstrip("/")).is_symlink()
    args = written_args(op_root)
    assert "--web.listen-address=:9200" in args and "--no-collector.arp" in args
    (op_root / "var/lib/rastos-prom/rastos.prom").write_text("rastos_test_metric 42\n")
    sandbox = in_target(Target(op_root), [BINARY, *args])
    sandbox[sandbox.index("--") : sandbox.index("--")] = ["--ro-bind", "/sys", "/sys"]  # its cpu collector needs it
    log = tmp_path / "exporter.log"
    with log.open("w") as sink:
        exporter = subprocess.Popen(["ip", "netns", "exec", pair.host, *sandbox], stdout=sink, stderr=sink)
    try:
        with pair.inside_host():
            metrics = fetch(url, log)
            assert "node_exporter_build_info{" in metrics
            assert "rastos_test_metric 42" in metrics, "the textfile directory is the one written"
            assert 'collector="cpu"' in metrics and 'collector="arp"' not in metrics, "arp is off"
            live = Target(op_root, runtime=True)
            step = step_from(live, "monitoring", params, "")
            assert step.op.verify(live, step.params) == [], "verify finds it answering"
            assert step.op.plan(live, step.params).actions == (), "answering and configured: nothing to do"
    finally:
        exporter.kill()
        exporter.wait()
    monkeypatch.setattr(monitoring, "VERIFY_TIMEOUT", 0.5)
    with pair.inside_host():
        problems = step.op.verify(live, step.params)
        assert problems == [f"the exporter does not answer at {url} with node_exporter_build_info"]
        assert [c.subject for c in step.op.plan(live, step.params).changes] == ["unit prometheus-node-exporter.service"]


def test_a_missing_exporter_is_installed_through_the_package_backend(op_root: Path) -> None:
    run(in_target(Target(op_root), ["dpkg", "--purge", "prometheus-node-exporter"]), capture=True)
    assert not (op_root / BINARY.lstrip("/")).exists()
    target = Target(op_root)
    step = step_from(target, "monitoring", {"collectors_disabled": ["nosuch"]}, "")  # unknowable until installed
    assert isinstance(step.op.plan(target, step.params).actions[0], InstallPackages)
    step = step_from(target, "monitoring", {}, "")
    before = tree_digest(op_root)
    plan = step.op.plan(target, step.params)
    assert tree_digest(op_root) == before
    lines: list[str] = []
    execute(plan, target, lines.append)
    assert any(line.startswith("installed prometheus-node-exporter ") for line in lines), lines
    assert dpkg_version(op_root, "prometheus-node-exporter") is not None
    assert written_args(op_root)[0] == "--web.listen-address=:9100", "the op's file, not the package's"
    assert step.op.verify(target, step.params) == []


@pytest.mark.parametrize(
    ("params", "refusal"),
    [
        ({"listen_address": "9100"}, "params.listen_address: '9100' is not valid: host:port"),
        ({"listen_address": ":70000"}, "params.listen_address: port 70000 is not between 1 and 65535"),
        ({"textfile_directory": "/var/../etc"}, "params.textfile_directory: '/var/../etc' is not valid"),
        ({"collectors_disabled": ["CPU"]}, "params.collectors_disabled[0]: 'CPU' is not valid"),
    ],
)
def test_monitoring_params_are_refused_by_field(op_root: Path, params: dict[str, object], refusal: str) -> None:
    with pytest.raises(InvalidParams) as refused:
        step_from(Target(op_root), "monitoring", params, "")
    assert str(refused.value).startswith(refusal)


# motd, dynamic


def run_script(root: Path, script: str = SCRIPT) -> subprocess.CompletedProcess[str]:
    """The script as pam_motd runs it, in the tree, under a host name of its own."""
    argv = in_target(Target(root), [script])
    cut = argv.index("--")
    argv[cut:cut] = ["--unshare-uts", "--hostname", "motd-test-host"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_the_dynamic_motd_runs_without_a_daemon(op_root: Path) -> None:
    target = Target(op_root)
    _, _, problems = apply(target, "motd", {"text": "managed by rastOS", "dynamic": True})
    assert problems == []
    assert (op_root / SCRIPT.lstrip("/")).stat().st_mode & 0o777 == 0o755
    started = time.monotonic()
    result = run_script(op_root)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("  host ") == 1 and "  host         motd-test-host\n" in result.stdout
    assert "rastosd      not answering" in result.stdout
    assert "the package lists were never fetched" in result.stdout
    assert elapsed < 1.0, f"a login waits for it: {elapsed:.2f}s"
    plan, _, problems = apply(target, "motd", {"text": "managed by rastOS"})
    assert [change.action for change in plan.changes] == ["remove"] and problems == []
    assert not (op_root / SCRIPT.lstrip("/")).exists() and (op_root / "etc/motd").read_text() == "managed by rastOS\n"


def test_the_dynamic_motd_counts_pending_upgrades_once(older_hello: Path) -> None:
    _, _, problems = apply(Target(older_hello), "motd", {"text": "", "dynamic": True})
    assert problems == []
    # Logins in one sandbox, so /run (where the count is kept) lasts across them: a first count slower
    # than two seconds finishes in the background and shows at a later login. Then one login more,
    # timed: the count is kept, so it costs nothing.
    logins = (
        f"for i in $(seq 30); do out=$({SCRIPT}) || exit 1; "
        'case "$out" in *"can be upgraded"*) break;; esac; sleep 1; done; '
        f"s=$(date +%s%N); {SCRIPT} || exit 1; echo ms=$(( ($(date +%s%N) - s) / 1000000 ))"
    )
    result = subprocess.run(in_target(Target(older_hello), ["sh", "-c", logins]), capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "updates      1 package(s) can be upgraded, 0 from security" in result.stdout, "hello, from stable"
    milliseconds = int(result.stdout.rsplit("ms=", 1)[1])
    assert milliseconds < 1000, f"a login with the count kept took {milliseconds} ms"


def test_the_dynamic_motd_shows_what_a_live_daemon_reports(rastosd: Rastosd, tmp_path: Path) -> None:
    """The script on this host, read-only, asking the real daemon on its private bus through rastosctl."""
    script = tmp_path / "50-rastos"
    script.write_text(DYNAMIC)
    script.chmod(0o755)
    bus_directory = rastosd.bus.address.removeprefix("unix:path=").rsplit("/", 1)[0]
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/run", "--tmpfs", "/tmp",
            "--bind", bus_directory, bus_directory, "--ro-bind", str(script), "/tmp/50-rastos",
            # A checkout under /tmp (a CI clone there) would be hidden by the tmpfs; rastosctl is in its .venv.
            "--ro-bind", str(CHECKOUT), str(CHECKOUT),
            "--setenv", "PATH", f"{CHECKOUT}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--setenv", "DBUS_SYSTEM_BUS_ADDRESS", rastosd.bus.address,
            # A loaded CI machine can take longer than a login's 3 s to start the Python client.
            "--setenv", "RASTOS_MOTD_TIMEOUT", "60", "--", "/tmp/50-rastos"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    status = json.loads(rastosd.ctl("--json", "status").stdout)
    boot = status["boot"]
    assert f"  deployment   {boot['root']} ({boot['kind']}, boot {boot['health']})" in result.stdout, result.stdout
    assert "  rollback     none in effect" in result.stdout
    assert "not answering" not in result.stdout and result.stdout.count("  host ") == 1, result.stdout
