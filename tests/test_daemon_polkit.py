"""polkit decides who may change the host: the real rastosd and the real polkitd on a private bus, with
the shipped actions (units/org.rastos.Daemon1.policy), the shipped rule (units/60-rastos.rules) and a
site's rules, callers of real uids (gdbus and rastosctl as a plain user, a member of group "rastos",
root). Without polkit on the bus the old check is in force: tests/test_daemon_bus.py.

A password typed into an authentication agent needs a terminal and a session: that is a VM's test.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.bus.polkit import ACTIONS
from ops.params import MAX_JSON_LENGTH
from tests.daemon_fixtures import (
    BUS_NAME,
    CHECKOUT,
    JOB,
    MANAGER,
    PLAIN_USER,
    ROOT_PATH,
    SNAPSHOTS,
    STRICT_POLICY,
    Rastosd,
    ensure_test_users,
    private_bus,
    require_root,
    scratch_root,
)
from tests.polkit_fixtures import GROUP_MEMBER, POLKIT_BUS_POLICY, ensure_group_member, polkitd, require_polkitd

pytestmark = pytest.mark.root
UPDATES = "org.rastos.Daemon1.Updates"
HUB = "org.rastos.Daemon1.Hub"
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
# A site's own rules, before the shipped one: the plain user may snapshot, and may never join a hub.
SITE_RULES = f"""
polkit.addRule(function(action, subject) {{
    if (subject.user == "{PLAIN_USER}") {{
        if (action.id == "org.rastos.Daemon1.manage-snapshots") return polkit.Result.YES;
        if (action.id == "org.rastos.Daemon1.join-hub") return polkit.Result.NO;
    }}
}});
"""
# Each method that changes the host, with arguments that would pass their checks, so that only the
# authorization stands in the way. Not here: Job.Cancel (on a job's object), and Snapshots.Create and
# Delete, Hub.Join (the site's rules decide those for the plain user).
CALLS = {
    "Manager.Apply": (MANAGER, "Apply", ["motd", '{"text": "x"}', "uint64 0"]),
    "Manager.RunPipeline": (MANAGER, "RunPipeline", ['[{"op": "motd", "params": {"text": "x"}}]', "uint64 0"]),
    "Manager.Confirm": (MANAGER, "Confirm", ["uint32 1"]),
    "Manager.ComplianceScan": (MANAGER, "ComplianceScan", []),
    "Snapshots.Rollback": (SNAPSHOTS, "Rollback", ["uint32 1"]),
    "Snapshots.BootOnce": (SNAPSHOTS, "BootOnce", ["uint32 1"]),
    "Snapshots.MarkGood": (SNAPSHOTS, "MarkGood", []),
    "Updates.Stage": (UPDATES, "Stage", ["/nonexistent.rbundle", "false"]),
    "Updates.Cancel": (UPDATES, "Cancel", []),
}

# Apply(motd, stdin, 0) as the user argv[1] on the bus argv[2]: ids dropped before it connects, as
# daemon_fixtures.CTL_AS_USER does; prints the error's name and text.
APPLY_AS_USER = """
import os, pwd, sys
from sdbus import SdBusBaseError, sd_bus_open_system
user = pwd.getpwnam(sys.argv[1])
os.setgroups([])
os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = sys.argv[2]
bus = sd_bus_open_system()
message = bus.new_method_call_message(
    "org.rastos.Daemon1", "/org/rastos/Daemon1", "org.rastos.Daemon1.Manager", "Apply"
)
message.append_data("sst", "motd", sys.stdin.read(), 0)
try:
    bus.call(message)
except SdBusBaseError as error:
    print(f"{error.dbus_error_name}: {error.args[0]}")
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rastosd]:
    """One polkitd and one rastosd for the module: each test below checks what its own calls did."""
    require_root()
    require_polkitd()
    ensure_test_users()
    ensure_group_member()
    directory = tmp_path_factory.mktemp("polkit")
    with (
        private_bus(STRICT_POLICY, POLKIT_BUS_POLICY) as bus,
        polkitd(bus, SITE_RULES),
        scratch_root(directory) as scratch,
    ):
        rastosd = Rastosd(bus, scratch, directory / "state")
        rastosd.start()
        try:
            yield rastosd
        finally:
            assert rastosd.stop() == 0, rastosd.log_text()


def gdbus(
    daemon: Rastosd, interface: str, method: str, args: list[str], user: str | None, *, path: str = ROOT_PATH,
    interactive: bool = False,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """gdbus prints an error's name and text in full; `interactive` sets the call's flag that allows
    interactive authorization (gdbus --interactive)."""
    argv = ["gdbus", "call", "--address", daemon.bus.address, "--dest", BUS_NAME, "--object-path", path,
            "--method", f"{interface}.{method}", *(["--interactive"] if interactive else []), *args]  # fmt: skip
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def apply_as_root(daemon: Rastosd, text: str) -> tuple[str, str]:
    path: str = daemon.call(MANAGER, "Apply", "sst", "motd", json.dumps({"text": text}), "0")[0]
    return path, daemon.wait_job(path)


def polkit_questions(daemon: Rastosd) -> list[str]:
    return re.findall(r"asking polkit whether (\S+ may \S+ \(\S+, interactive: \w+\))", daemon.log_text())


def test_the_log_says_polkit_decides(daemon: Rastosd) -> None:
    assert "access: polkit decides who may change the host (root always may)" in daemon.log_text()


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_plain_user_is_refused_naming_the_action(daemon: Rastosd, method: str) -> None:
    interface, member, args = CALLS[method]
    before = daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]
    refused = gdbus(daemon, interface, member, args, PLAIN_USER)
    assert refused.returncode != 0, refused
    expected = (
        f"GDBus.Error:{INTERACTIVE_REQUIRED}: {member}: polkit action {ACTIONS[method]} needs an administrator's "
        "authentication (call it with interactive authorization allowed and an authentication agent running)"
    )
    assert expected in refused.stderr, refused.stderr
    assert daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0] == before, "a refused call did nothing"


def test_a_plain_user_may_not_cancel_a_job_of_root(daemon: Rastosd) -> None:
    path = daemon.call(MANAGER, "Apply", "sst", "motd", '{"text": "by root"}', "0")[0]
    assert daemon.wait_job(path) == "done"
    refused = gdbus(daemon, JOB, "Cancel", [], PLAIN_USER, path=path)
    assert f"{INTERACTIVE_REQUIRED}: Cancel: polkit action {ACTIONS['Job.Cancel']} needs" in refused.stderr, refused


def test_a_site_rule_decides_before_the_shipped_one(daemon: Rastosd) -> None:
    """The site lets the plain user snapshot (no group, no password) and never join a hub."""
    created = gdbus(daemon, SNAPSHOTS, "Create", ["'by a plain user'"], PLAIN_USER)
    assert created.returncode == 0, created.stderr
    snapshot = int(created.stdout.strip().strip("(),").split()[-1])
    assert (daemon.scratch.snapshots / str(snapshot) / "snapshot").is_dir()
    uid = int(subprocess.run(["id", "-u", PLAIN_USER], capture_output=True, text=True, check=True).stdout)
    events = daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]
    assert any(e[3] == "Create" and e[2] == uid for e in events), "the event log names the caller's uid"
    deleted = gdbus(daemon, SNAPSHOTS, "Delete", [f"uint32 {snapshot}"], PLAIN_USER)
    assert deleted.returncode == 0, deleted.stderr
    assert not (daemon.scratch.snapshots / str(snapshot)).exists()
    refused = gdbus(daemon, HUB, "Join", ["wss://hub.example.org/api/v1/agent", "t" * 43, "''"], PLAIN_USER)
    assert f"GDBus.Error:{ACCESS_DENIED}: Join: polkit does not allow {ACTIONS['Hub.Join']} to this caller" in (
        refused.stderr
    ), refused.stderr


def test_a_member_of_group_rastos_is_allowed_by_the_shipped_rule(daemon: Rastosd) -> None:
    applied = daemon.busctl("call", BUS_NAME, ROOT_PATH, MANAGER, "Apply", "sst", "motd", '{"text": "by a member"}',
                            "0", user=GROUP_MEMBER)  # fmt: skip
    path = json.loads(applied.stdout)["data"][0]
    assert daemon.wait_job(path) == "done"
    assert (daemon.scratch.root / "etc/motd").read_text() == "by a member\n"
    member = subprocess.run(["id", "-u", GROUP_MEMBER], capture_output=True, text=True, check=True).stdout.strip()
    assert daemon.job(int(path.rsplit("/", 1)[1]))["uid"] == int(member)
    assert any(f"may {ACTIONS['Manager.Apply']} (Manager.Apply" in q for q in polkit_questions(daemon)), "polkit said"


def test_root_is_allowed_without_asking_polkit(daemon: Rastosd) -> None:
    asked = polkit_questions(daemon)
    path, state = apply_as_root(daemon, "by root, again")
    assert state == "done", path
    snapshot = daemon.call(SNAPSHOTS, "Create", "s", "by root")[0]
    assert (daemon.scratch.snapshots / str(snapshot) / "snapshot").is_dir()
    assert polkit_questions(daemon) == asked, "root's calls asked polkit"


def test_anyone_may_read_and_reading_asks_no_one(daemon: Rastosd) -> None:
    asked = polkit_questions(daemon)
    version = daemon.busctl("get-property", BUS_NAME, ROOT_PATH, MANAGER, "Version", user=PLAIN_USER)
    assert json.loads(version.stdout)["data"] == "0.1.0"
    for interface, member, args in (
        (MANAGER, "ListOps", []), (MANAGER, "ListJobs", []), (MANAGER, "GetEventLog", ["uint64 0", "uint32 10"]),
        (MANAGER, "Plan", ["motd", '\'{"text": "planned"}\'']), (MANAGER, "CheckHealth", []),
        (SNAPSHOTS, "List", []), (UPDATES, "GetStatus", []), (HUB, "GetStatus", []),
    ):  # fmt: skip
        answer = gdbus(daemon, interface, member, args, PLAIN_USER)
        assert answer.returncode == 0, f"{member}: {answer.stderr}"
    assert polkit_questions(daemon) == asked, "a read asked polkit"


def test_a_refusal_comes_before_the_arguments_are_read(daemon: Rastosd) -> None:
    """A megabyte of params from a plain user costs one polkit question, not a parse: the refusal is
    the authorization's, not InvalidArgs. (Sent by sdbus from a process of that user: no command line
    holds a megabyte.)"""
    huge = json.dumps({"text": "x" * (MAX_JSON_LENGTH + 1)})
    result = subprocess.run([sys.executable, "-c", APPLY_AS_USER, PLAIN_USER, daemon.bus.address], input=huge,
                            capture_output=True, text=True, check=False, timeout=60, cwd=CHECKOUT)  # fmt: skip
    assert result.stdout.startswith(f"{INTERACTIVE_REQUIRED}: Apply: polkit action"), result


def test_the_call_s_interactive_flag_reaches_polkit(daemon: Rastosd) -> None:
    """gdbus --interactive sets the call's allow-interactive-authorization flag: rastosd passes it on
    as AllowUserInteraction. With no authentication agent for the caller, polkit still cannot ask."""
    before = len(polkit_questions(daemon))
    for interactive in (False, True):
        refused = gdbus(daemon, SNAPSHOTS, "MarkGood", [], PLAIN_USER, interactive=interactive)
        assert f"{INTERACTIVE_REQUIRED}: MarkGood: polkit action" in refused.stderr, refused.stderr
    asked = polkit_questions(daemon)[before:]
    assert [question.rsplit(" ", 1)[1] for question in asked] == ["no)", "yes)"], asked
    assert all(f"may {ACTIONS['Snapshots.MarkGood']} (Snapshots.MarkGood" in question for question in asked), asked


def test_rastosctl_tells_a_plain_user_which_action_it_needs(daemon: Rastosd) -> None:
    result = daemon.ctl("apply", "motd", "text=x", user=PLAIN_USER)
    assert result.returncode == 1, result
    assert result.stderr == (
        f"rastosctl: {INTERACTIVE_REQUIRED}: Apply: polkit action org.rastos.Daemon1.apply needs an administrator's "
        "authentication (call it with interactive authorization allowed and an authentication agent running)\n"
    )


def on_a_terminal(argv: list[str], answer: bytes, timeout: float = 60) -> tuple[int, str]:
    """`argv` in a session of its own whose controlling terminal is a pty, as a person's shell runs it;
    `answer` is typed at the first password prompt. Its exit status and everything the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(["setsid", "--ctty", *argv], stdin=terminal, stdout=terminal, stderr=terminal,
                               cwd=CHECKOUT)  # fmt: skip
    os.close(terminal)
    seen, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # every end of the terminal closed: the command is done
                    chunk = b""
                seen += chunk
                if not chunk and process.poll() is not None:
                    break
            if not answered and b"Password: " in seen:
                os.write(controller, answer + b"\n")
                answered = True
            if process.poll() is not None and not ready:
                break
        return process.wait(5), seen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)


def test_rastosctl_on_a_terminal_allows_polkit_to_ask(daemon: Rastosd) -> None:
    """A plain user's rastosctl on a terminal lets polkit ask for a password (its call's flag, with
    pkttyagent started for rastosctl's own process); with --no-ask-password, or with no terminal, it does
    not. polkitd here has no login session to put a prompt in, so each call is still refused and nothing
    changes: the prompt itself, answered, is qemu-tests/test_polkit.py's."""
    before = len(polkit_questions(daemon))
    motd = daemon.scratch.root / "etc" / "motd"
    kept = motd.read_bytes() if motd.exists() else None
    status, shown = on_a_terminal([*daemon.ctl_argv(PLAIN_USER), "apply", "motd", "text=asked"], b"not the password")
    assert status == 1 and f"{INTERACTIVE_REQUIRED}: Apply: polkit action org.rastos.Daemon1.apply" in shown, shown
    status, shown = on_a_terminal([*daemon.ctl_argv(PLAIN_USER), "--no-ask-password", "apply", "motd", "text=x"], b"")
    assert status == 1 and f"{INTERACTIVE_REQUIRED}: Apply: polkit action org.rastos.Daemon1.apply" in shown, shown
    assert daemon.ctl("apply", "motd", "text=piped", user=PLAIN_USER).returncode == 1
    asked = [question.rsplit(" ", 1)[1] for question in polkit_questions(daemon)[before:]]
    assert asked == ["yes)", "no)", "no)"], polkit_questions(daemon)[before:]
    assert (motd.read_bytes() if motd.exists() else None) == kept


def test_a_question_polkit_does_not_answer_is_a_no(tmp_path: Path) -> None:
    """polkitd gone after rastosd found it: a plain user's call is refused (closed, not open), root's
    still goes through, and the daemon's log says why."""
    require_root()
    require_polkitd()
    ensure_test_users()
    with private_bus(STRICT_POLICY, POLKIT_BUS_POLICY) as bus, scratch_root(tmp_path) as scratch:
        rastosd = Rastosd(bus, scratch, tmp_path / "state")
        with polkitd(bus):
            rastosd.start()
        try:
            refused = gdbus(rastosd, MANAGER, "Apply", ["motd", '\'{"text": "x"}\'', "uint64 0"], PLAIN_USER)
            assert (
                f"GDBus.Error:{ACCESS_DENIED}: Apply: polkit could not be asked about org.rastos.Daemon1.apply "
                "(org.freedesktop.DBus.Error.ServiceUnknown)"
            ) in refused.stderr, refused.stderr
            assert "polkit could not be asked about org.rastos.Daemon1.apply" in rastosd.log_text()
            assert apply_as_root(rastosd, "root needs no polkit")[1] == "done"
        finally:
            assert rastosd.stop() == 0


def test_a_client_that_lets_polkit_ask_waits_longer_than_rastosd_waits_for_polkit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A person typing a password may take more than sd-bus's default 25 s: rastosd waits for polkit up
    to AUTHENTICATION_TIMEOUT_USEC, and a client that lets polkit ask waits longer, to hear its answer."""
    from sdbus import sd_bus_open_system

    from daemon.bus.polkit import AUTHENTICATION_TIMEOUT_USEC
    from daemon.ctl_polkit import allow_interactive_authorization

    require_root()
    with private_bus(STRICT_POLICY) as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        client = sd_bus_open_system()
        default = client.method_call_timeout_usec
        assert default < AUTHENTICATION_TIMEOUT_USEC, "sd-bus's own default is the shorter"
        assert allow_interactive_authorization(client, False)
        assert client.method_call_timeout_usec == default, "a client that may not be asked keeps the default"
        assert allow_interactive_authorization(client, True)
        assert client.method_call_timeout_usec > AUTHENTICATION_TIMEOUT_USEC
