"""Hostile input against the real rastosd on a private bus: every bad argument gets a named answer at
once, the daemon stays up and small, and a refused call changes nothing.

The regression tests replay what a tester found; the property tests (hypothesis, derandomized and
bounded) call every D-Bus method with arguments of the right and the wrong signature, and every op
with params made from its own schema and then spoiled (wrong types, lone surrogates, deep nesting,
huge integers, oversize strings and lists, unknown keys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sdbus import SdBus, SdBusBaseError, sd_bus_open_system

import daemon.bus.errors  # noqa: F401  (registers our error names, so errors arrive by name)
from bench.bench_daemon import rss_mb
from ops import OPS
from ops.params import MAX_DEPTH, MAX_ITEMS, MAX_JSON_LENGTH, MAX_STRING_LENGTH, STRING_LENGTH, Kind, Param
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

pytestmark = pytest.mark.root
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
INTERNAL = "org.rastos.Daemon1.Error.Internal"
TIMEOUT = "org.freedesktop.DBus.Error.Timeout"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
MAX_RSS_GROWTH_MB = 48  # transient parses of megabyte requests; Python keeps some of its arenas
REPLY_TIMEOUT_USEC = 5_000_000  # sd-bus waits 25 s by default: a missing answer must fail fast


@dataclass(frozen=True)
class Answer:
    error: str | None  # the D-Bus error name, None for a reply
    text: str
    data: tuple[Any, ...]


class Client:
    """Raw method calls with any signature, on a connection of this (root) process."""

    def __init__(self, bus: SdBus) -> None:
        self.bus = bus
        self.bus.method_call_timeout_usec = REPLY_TIMEOUT_USEC

    def call(self, interface: str, method: str, signature: str = "", *args: Any, path: str = ROOT_PATH) -> Answer:
        message = self.bus.new_method_call_message(BUS_NAME, path, interface, method)
        if signature:
            message.append_data(signature, *args)
        try:
            reply = self.bus.call(message)
        except SdBusBaseError as error:
            name = getattr(error, "dbus_error_name", None) or str(error.args[0])
            return Answer(name, str(error.args[-1]) if error.args else "", ())
        contents = reply.get_contents()
        return Answer(None, "", contents if isinstance(contents, tuple) else (contents,))


@dataclass
class Hostile:
    daemon: Rastosd
    client: Client
    rss_at_start: float

    def alive(self) -> None:
        assert self.daemon.process is not None and self.daemon.process.poll() is None, "rastosd died"

    def disk(self) -> tuple[list[str], list[str], int, int]:
        """What a refused call must leave as it was: snapshots, boot entries, jobs, events."""
        snapshots = sorted(p.name for p in self.daemon.scratch.snapshots.iterdir())
        entries = sorted(p.name for p in (self.daemon.scratch.esp / "loader" / "entries").iterdir())
        jobs = len(self.client.call(MANAGER, "ListJobs").data[0])
        events = len(self.client.call(MANAGER, "GetEventLog", "tu", 0, 10000).data[0])
        return snapshots, entries, jobs, events

    def refused(self, interface: str, method: str, signature: str, *args: Any) -> Answer:
        """The call is refused as invalid, at once and without a trace on disk; the daemon lives on."""
        before = self.disk()
        started = time.monotonic()
        answer = self.client.call(interface, method, signature, *args)
        elapsed = time.monotonic() - started
        assert answer.error == INVALID_ARGS, f"{method}: {answer}"
        assert elapsed < REPLY_TIMEOUT_USEC / 1e6, f"{method} took {elapsed:.1f}s"
        answer.text.encode()  # always UTF-8
        assert self.disk() == before, f"{method} refused, yet something changed"
        self.alive()
        return answer


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """One daemon for the module: the cases below are many and each leaves nothing behind."""
    require_root()
    directory = tmp_path_factory.mktemp("hostile")
    with private_bus(STRICT_POLICY) as bus, scratch_root(directory) as scratch:
        daemon = Rastosd(bus, scratch, directory / "state")
        daemon.start()
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        try:
            assert daemon.process is not None
            yield Hostile(daemon, Client(sd_bus_open_system()), rss_mb(daemon.process.pid))
        finally:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
            assert daemon.stop() == 0, daemon.log_text()
        assert "Traceback" not in daemon.log_text(), "no bad input reaches the daemon as a bug"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# What a tester sent, and the start of the answer each must get now.
REGRESSIONS = [
    ("lone surrogate in a key", MANAGER, "Plan", "ss", ("motd", '{"\\ud800": 1}'),
     "params.\\ud800: the key holds a lone surrogate (\\ud800)"),
    ("lone surrogate in a value", MANAGER, "Apply", "sst", ("motd", '{"text": "\\udc80x"}', 0),
     "params.text: the string holds a lone surrogate (\\udc80) at character 0"),
    ("surrogate in a pipeline step", MANAGER, "RunPipeline", "st",
     ('[{"op": "motd", "params": {"text": "\\ud800"}}]', 0),
     "steps[0].params.text: the string holds a lone surrogate"),
    ("NUL in a key", MANAGER, "Plan", "ss", ("motd", '{"a\\u0000b": 1}'), "params.a\\x00b: unknown parameter"),
    ("NUL and a surrogate in a key", MANAGER, "Plan", "ss", ("motd", '{"\\u0000\\udfff": 1}'),
     "params.\\x00\\udfff: the key holds a lone surrogate"),
    ("an integer of 5,001 digits", MANAGER, "Plan", "ss", ("user", '{"name": "x", "uid": ' + "9" * 5001 + "}"),
     "params.uid: is an integer of 5001 digits"),
    ("a 20-digit integer", MANAGER, "Plan", "ss", ("user", '{"name": "x", "uid": 99999999999999999999}'),
     "params.uid: 99999999999999999999 does not fit in 64 bits"),
    ("NaN", MANAGER, "Plan", "ss", ("user", '{"name": "x", "uid": NaN}'), "params.uid: NaN is not a JSON value"),
    ("nested 1,000 deep in Plan", MANAGER, "Plan", "ss", ("motd", f'{{"text": {nested(1000)}}}'),
     f"params: nests lists and objects deeper than {MAX_DEPTH} levels"),
    ("nested 100,000 deep in Plan", MANAGER, "Plan", "ss", ("motd", nested(100_000)),
     f"params: nests lists and objects deeper than {MAX_DEPTH} levels"),
    ("nested 1,000 deep in RunPipeline", MANAGER, "RunPipeline", "st", (nested(1000), 0),
     f"steps: nests lists and objects deeper than {MAX_DEPTH} levels"),
    ("nested 100,000 deep in RunPipeline", MANAGER, "RunPipeline", "st", (nested(100_000), 0),
     f"steps: nests lists and objects deeper than {MAX_DEPTH} levels"),
    ("nested just too deep", MANAGER, "Plan", "ss", ("motd", nested(MAX_DEPTH + 1)),
     "params" + "[0]" * MAX_DEPTH + f": nests lists and objects deeper than {MAX_DEPTH} levels"),
    ("since beyond 64-bit signed", MANAGER, "GetEventLog", "tu", (2**64 - 1, 10),
     f"since: must be at most {2**63 - 1}, got {2**64 - 1}"),
    ("a request over the size cap", MANAGER, "Plan", "ss", ("motd", " " * (MAX_JSON_LENGTH + 1)),
     f"params: is {MAX_JSON_LENGTH + 1} characters long; at most {MAX_JSON_LENGTH} are accepted"),
    ("a list over the item cap", MANAGER, "Plan", "ss", ("zsh", json.dumps({"users": ["a"] * (MAX_ITEMS + 1)})),
     f"params.users: holds {MAX_ITEMS + 1} items"),
    ("a string over its param's default cap", MANAGER, "Plan", "ss", ("user", json.dumps({"name": "a" * 5000})),
     f"params.name: must be at most {STRING_LENGTH} characters, got 5000"),
    ("a 1 MB authorized key", MANAGER, "Apply", "sst",
     ("user", json.dumps({"name": "alice", "authorized_keys": ["ssh-ed25519 " + "A" * 1_000_000]}), 0),
     "params.authorized_keys[0]: the string must be at most 65536 characters, got 1000012"),
    ("a 20 KB authorized key", MANAGER, "Apply", "sst",
     ("user", json.dumps({"name": "alice", "authorized_keys": ["ssh-ed25519 " + "A" * 20_000]}), 0),
     "params.authorized_keys[0]: must be at most 16384 characters, got 20012"),
    ("an unknown key of 100 KB", MANAGER, "Plan", "ss", ("motd", json.dumps({"k" * 100_000: 1})),
     "params.kkkkkkkk"),
    ("a snapshot description over 200 characters", SNAPSHOTS, "Create", "s", ("d" * 201,),
     "description: must be 1 to 200 characters, got 201"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("interface", "method", "signature", "args", "message"),
    [case[1:] for case in REGRESSIONS],
    ids=[case[0] for case in REGRESSIONS],
)
def test_bad_arguments_are_refused_at_once_naming_the_field(
    hostile: Hostile, interface: str, method: str, signature: str, args: tuple[Any, ...], message: str
) -> None:
    answer = hostile.refused(interface, method, signature, *args)
    assert answer.text.startswith(message), answer.text
    assert len(answer.text) < 1000, "an error never echoes a caller's megabyte back"


def test_a_refused_unprivileged_caller_gets_its_answer_too(hostile: Hostile) -> None:
    """Plan is open to every user: a lone surrogate from one gets the same answer as from root."""
    ensure_test_users()
    result = hostile.daemon.gdbus(MANAGER, "Plan", "motd", "'{\"\\\\ud800\": 1}'", user=PLAIN_USER)
    assert f"GDBus.Error:{INVALID_ARGS}: params.\\ud800: the key holds a lone surrogate" in result.stderr, result
    planned = hostile.daemon.gdbus(MANAGER, "Plan", "motd", '\'{"text": "hi"}\'', user=PLAIN_USER)
    assert planned.returncode == 0 and "/etc/motd" in planned.stdout, planned  # on the open-plan thread


def test_a_long_pipeline_names_its_snapshots_in_short(hostile: Hostile) -> None:
    steps = [{"op": "motd", "params": {"text": f"step {n}"}} for n in range(250)]
    path = hostile.client.call(MANAGER, "RunPipeline", "st", json.dumps(steps), 0).data[0]
    assert hostile.daemon.wait_job(path) == "done"
    described = [row[2] for row in hostile.client.call(SNAPSHOTS, "List").data[0]]
    assert described[-2].startswith("before job ") and described[-1].startswith("after job ")
    assert all(len(text) <= 200 for text in described), described
    assert described[-1].endswith("&& ... (250 steps) (done)"), described[-1]


IDS = "from 1 to 4294967295"
BAD_NUMBERS = [
    (("log", "--since", "-1"), "argument --since: must be from 0 to 9223372036854775807, got -1"),
    (("log", "--limit", "99999999999"), "argument --limit: must be from 1 to 10000, got 99999999999"),
    (("log", "--limit", "ten"), "argument --limit: must be a whole number, got 'ten'"),
    (("job", "4294967296"), f"argument id: must be a job id {IDS}, got 4294967296"),
    (("job", "seven"), "argument id: must be a job id, got 'seven'"),
    (("snapshot", "delete", "-1"), f"argument id: must be a snapshot id {IDS}, got -1"),
    (("confirm", "-5"), f"argument id: must be a job id {IDS}, got -5"),
    (("snapshot", "rollback", "0"), f"argument id: must be a snapshot id {IDS}, got 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_NUMBERS, ids=[" ".join(case[0]) for case in BAD_NUMBERS])
def test_rastosctl_refuses_a_bad_number_in_one_line(hostile: Hostile, args: tuple[str, ...], message: str) -> None:
    result = hostile.daemon.ctl(*args)
    assert result.returncode == 2, result
    command = "rastosctl " + " ".join(arg for arg in args if arg.isalpha() and arg not in ("ten", "seven"))
    assert result.stderr.splitlines() == [f"{command}: {message} (see {command} --help)"], result.stderr


def test_rastosctl_takes_json_before_or_after_the_command(hostile: Hostile) -> None:
    for args in (("--json", "status"), ("status", "--json"), ("snapshot", "list", "--json"), ("log", "--json")):
        result = hostile.daemon.ctl(*args)
        assert result.returncode == 0, result
        json.loads(result.stdout)
    assert not hostile.daemon.ctl("status").stdout.startswith("{"), "tables without --json"


def test_rastosctl_says_when_rastosd_cannot_be_reached(hostile: Hostile, tmp_path: Path) -> None:
    nowhere = f"unix:path={tmp_path}/no-bus-here"
    for env, args, bus in (
        ({"DBUS_SYSTEM_BUS_ADDRESS": nowhere}, (), "the system bus"),
        ({}, ("--bus-address", nowhere), f"the bus at {nowhere}"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from daemon.cli import ctl_main; sys.exit(ctl_main())", *args, "jobs"],
            capture_output=True, text=True, check=False, timeout=60, cwd=CHECKOUT, env={**os.environ, **env},
        )  # fmt: skip
        assert result.returncode == 1, result
        assert result.stderr == (
            f"rastosctl: rastosd is not reachable on {bus}: is rastosd.service running? "
            "(cannot connect to the bus: No such file or directory)\n"
        )
    with private_bus(STRICT_POLICY) as empty:  # a bus without the daemon on it
        result = Rastosd(empty, hostile.daemon.scratch, hostile.daemon.state_dir).ctl("jobs")
        assert result.returncode == 1, result
        assert result.stderr == (
            f"rastosctl: rastosd is not reachable on the bus at {empty.address}: is rastosd.service running? "
            "(no one owns org.rastos.Daemon1 on that bus)\n"
        )


def test_rastosctl_as_an_unprivileged_user_reads_and_is_told_what_needs_root(hostile: Hostile) -> None:
    ensure_test_users()
    assert hostile.daemon.ctl("jobs", "--json", user=PLAIN_USER).returncode == 0
    refusals = {
        ("apply", "motd", "text=x"): "Apply changes the host",
        ("snapshot", "create", "mine"): "Create changes the host",
        ("confirm", "1"): "Confirm changes the host",
        ("compliance", "scan"): "ComplianceScan reads /etc/shadow and users' keys",
    }
    for args, start in refusals.items():
        result = hostile.daemon.ctl(*args, user=PLAIN_USER)
        assert result.returncode == 1, result
        assert result.stderr.startswith(f"rastosctl: org.freedesktop.DBus.Error.AccessDenied: {start}"), result
        assert "only root or members of group 'rastos' may call it" in result.stderr, result
        assert "Rejected send message" not in result.stderr and len(result.stderr.splitlines()) == 1, result


# Property tests: bounded and derandomized, so CI runs the same cases every time, in seconds.
# No shrinking: a case that hangs costs the reply timeout each time it is tried again.
PROPERTY = settings(
    derandomize=True, deadline=None, max_examples=50, database=None, phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip
CONTRACT = ET.parse(CHECKOUT / "daemon" / "bus" / "org.rastos.Daemon1.xml").getroot()
METHODS = [
    (interface.get("name", ""), method.get("name", ""),
     "".join(arg.get("type", "") for arg in method.findall("arg") if arg.get("direction") == "in"))
    for interface in CONTRACT.findall("interface") if interface.get("name") != JOB
    for method in interface.findall("method")
]  # fmt: skip
# Ids that exist are never drawn where a call with one would reach the host's boot loader (BootOnce
# runs bootctl) or make a deployment: these calls must find no such snapshot.
NO_SUCH_SNAPSHOT = st.integers(10**6, 2**32 - 1)
DBUS_STRING = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=300)
DBUS_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "s": DBUS_STRING | st.sampled_from(["", "{}", "[]", "motd", '{"text": 1}', "null", "[{}]"]),
    "u": st.integers(0, 2**32 - 1),
    "t": st.integers(0, 2**64 - 1),
    "b": st.booleans(),
}
OTHER_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "": (), "s": ("x",), "u": (7,), "t": (7,), "i": (-1,), "b": (True,), "ss": ("a", "b"), "sst": ("a", "b", 0),
    "as": (["a"],), "a{sv}": ({"k": ("s", "v")},), "tu": (0, 1), "st": ("[]", 0),
}  # fmt: skip


def arguments(method: str, signature: str) -> st.SearchStrategy[tuple[Any, ...]]:
    if method in ("Delete", "Rollback", "BootOnce"):
        return st.tuples(NO_SUCH_SNAPSHOT)
    if method == "Stage":  # no absolute path: a staging that went on would end later, beside other cases
        return st.tuples(DBUS_TYPES["s"].filter(lambda text: not text.startswith("/")), st.booleans())
    return st.tuples(*(DBUS_TYPES[kind] for kind in signature))


@pytest.mark.parametrize(("interface", "method", "signature"), METHODS, ids=[m[1] for m in METHODS])
def test_every_method_answers_any_arguments_of_its_signature(
    hostile: Hostile, interface: str, method: str, signature: str
) -> None:
    @PROPERTY
    @given(args=arguments(method, signature))
    def check(args: tuple[Any, ...]) -> None:
        before = hostile.disk()
        answer = hostile.client.call(interface, method, signature, *args)
        assert answer.error not in (INTERNAL, TIMEOUT, NO_REPLY), f"{method}{args!r}: {answer}"
        answer.text.encode()
        if answer.error is not None:
            assert hostile.disk() == before, f"{method}{args!r} was refused ({answer}), yet something changed"
        hostile.alive()

    check()


@pytest.mark.parametrize(("interface", "method", "signature"), METHODS, ids=[m[1] for m in METHODS])
def test_every_method_refuses_a_wrong_signature(hostile: Hostile, interface: str, method: str, signature: str) -> None:
    for other, args in OTHER_SIGNATURES.items():
        if other != signature:
            answer = hostile.refused(interface, method, other, *args)
            assert "Invalid arguments" in answer.text, answer


def string_of(param: Param, pattern: str | None) -> st.SearchStrategy[str]:
    if param.choices:
        return st.sampled_from(param.choices)
    if pattern:
        return st.from_regex(pattern, fullmatch=True).filter(lambda text: len(text) <= param.string_length)
    return st.text(max_size=40)


def value_of(param: Param) -> st.SearchStrategy[Any]:
    """A value the param's declaration allows; its `check`, or the facts, may still refuse it."""
    if param.kind is Kind.STRING:
        return string_of(param, param.pattern)
    if param.kind is Kind.INTEGER:
        low = param.minimum if param.minimum is not None else -(2**63)
        return st.integers(low, param.maximum if param.maximum is not None else 2**63 - 1)
    if param.kind is Kind.BOOLEAN:
        return st.booleans()
    if param.kind is Kind.STRING_LIST:
        return st.lists(string_of(param, param.pattern), max_size=3)
    return st.dictionaries(string_of(param, param.key_pattern), string_of(param, param.pattern), max_size=3)


def params_of(op: str) -> st.SearchStrategy[dict[str, Any]]:
    schema = OPS[op].schema
    return st.fixed_dictionaries(
        {param.name: value_of(param) for param in schema if param.required},
        optional={param.name: value_of(param) for param in schema if not param.required},
    )


NESTED = "@@nested@@"
HUGE_INTEGER = "@@huge@@"
NOT_A_NUMBER = "@@nan@@"


@st.composite
def spoiled(draw: st.DrawFn, op: str) -> str:
    """Params made from the op's schema, then spoiled so that no schema could accept them: the JSON
    text to send."""
    params = draw(params_of(op))
    schema = {param.name: param for param in OPS[op].schema}
    name = draw(st.sampled_from(sorted(schema)))
    param = schema[name]
    how = draw(st.sampled_from(
        ["type", "surrogate", "surrogate key", "nested", "huge", "nan", "long string", "long list", "unknown"]
    ))  # fmt: skip
    if how == "type":
        wrong = {Kind.STRING: 7, Kind.INTEGER: "7", Kind.BOOLEAN: 1, Kind.STRING_LIST: {}, Kind.STRING_MAP: []}
        params[name] = draw(st.sampled_from([wrong[param.kind], None, 1.5, [[]]]))
    elif how == "surrogate":
        lone = draw(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
        text = draw(st.text(max_size=8))
        params[name] = [text + lone] if param.kind is Kind.STRING_LIST else text + lone
    elif how == "surrogate key":
        params[draw(st.text(max_size=4)) + draw(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))] = 1
    elif how in ("nested", "huge", "nan"):
        params[name] = {"nested": NESTED, "huge": HUGE_INTEGER, "nan": NOT_A_NUMBER}[how]
    elif how == "long string":
        limit = MAX_STRING_LENGTH if param.kind in (Kind.INTEGER, Kind.BOOLEAN) else param.string_length
        long = "x" * (limit + 1)
        params[name] = {Kind.STRING_LIST: [long], Kind.STRING_MAP: {"k": long}}.get(param.kind, long)
    elif how == "long list":
        params[name] = ["x"] * (max(param.items, MAX_ITEMS) + 1)
    else:
        params[draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda key: key not in schema))] = 1
    text = json.dumps(params)
    depth = draw(st.sampled_from([MAX_DEPTH, 1000, 100_000]))
    text = text.replace(json.dumps(NESTED), nested(depth))
    text = text.replace(json.dumps(HUGE_INTEGER), "9" * draw(st.integers(20, 6000)))
    return text.replace(json.dumps(NOT_A_NUMBER), draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))


@pytest.mark.parametrize("op", sorted(OPS))
def test_spoiled_params_are_refused_by_plan_apply_and_pipeline(hostile: Hostile, op: str) -> None:
    @PROPERTY
    @given(text=spoiled(op))
    def check(text: str) -> None:
        hostile.refused(MANAGER, "Plan", "ss", op, text)
        hostile.refused(MANAGER, "Apply", "sst", op, text, 0)
        pipeline = f'[{{"op": "motd", "params": {{"text": "first"}}}}, {{"op": "{op}", "params": {text}}}]'
        hostile.refused(MANAGER, "RunPipeline", "st", pipeline, 0)

    check()


@pytest.mark.parametrize("op", sorted(OPS))
def test_plan_answers_any_params_the_schema_allows(hostile: Hostile, op: str) -> None:
    """A plan, or a named refusal (a check, the facts of this scratch root): never Internal."""

    @settings(PROPERTY, max_examples=10)
    @given(params=params_of(op))
    def check(params: dict[str, Any]) -> None:
        before = hostile.disk()
        answer = hostile.client.call(MANAGER, "Plan", "ss", op, json.dumps(params))
        assert answer.error not in (INTERNAL, TIMEOUT, NO_REPLY), f"{op} {params}: {answer}"
        assert hostile.disk() == before, "a plan changes nothing"
        hostile.alive()

    check()


UPDATES = "org.rastos.Daemon1.Updates"
SOURCES = st.one_of(
    DBUS_STRING,
    st.sampled_from([
        "/", "/etc", "/dev/null", "/dev/zero", "/dev/urandom", "/proc/self/status", "/proc/1/status", "/etc/shadow",
        "/etc/passwd", "//", "/tmp/", "/tmp/../etc/shadow", "/tmp//x", "/./etc/passwd", "relative", "./x", "../x",
        "~/x", "ftp://host/x", "file:///etc/shadow", "http://", "https:///x", "http://user:pw@host/x", "http://@host/x",
        "http://host:99999/x", "http://host:port/x", "http://host/a b", "javascript:alert(1)", "data:,x", "HTTP:x",
        "/nonexistent/bundle.rbundle", "/" + "a" * 5000, "/" + "a/" * 3000, "http://" + "h" * 5000,
    ]),
    st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=12),
             min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
)  # fmt: skip


def test_stage_answers_any_source_and_leaves_nothing(hostile: Hostile) -> None:
    """Every source is refused at once (InvalidArgs, nothing changed) or, a regular file that is no
    bundle, staged and failed with an Update error: no entry, no deployment, the daemon up."""

    @PROPERTY
    @given(source=SOURCES, reboot=st.booleans())
    def check(source: str, reboot: bool) -> None:
        before = hostile.disk()
        answer = hostile.client.call(UPDATES, "Stage", "sb", source, reboot)
        assert answer.error not in (INTERNAL, TIMEOUT, NO_REPLY), f"Stage({source!r}): {answer}"
        answer.text.encode()
        if answer.error is not None:
            assert answer.error == INVALID_ARGS and answer.text.startswith("source"), f"Stage({source!r}): {answer}"
            assert len(answer.text) < 1000, "an error never echoes a caller's long source back"
            assert hostile.disk() == before, f"Stage({source!r}) was refused, yet something changed"
        else:
            update_id = answer.data[0]
            deadline = time.monotonic() + 30
            while (status := json.loads(hostile.client.call(UPDATES, "GetStatus").data[0]))["result"] is None:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert status["id"] == update_id and status["result"]["state"] == "failed", status
            assert status["result"]["error"]["name"].startswith("org.rastos.Daemon1.Error.Update."), status
            assert hostile.disk()[:2] == before[:2], "no snapshot, no boot entry"
            assert not (hostile.daemon.scratch.top / "@deployments").exists() or not list(
                (hostile.daemon.scratch.top / "@deployments").iterdir()
            )
        hostile.alive()

    check()


def test_memory_stays_bounded_after_all_of_it(hostile: Hostile) -> None:
    """Last in this module: whatever came before, the daemon holds no more than a little more."""
    assert hostile.daemon.process is not None
    grown = rss_mb(hostile.daemon.process.pid) - hostile.rss_at_start
    print(f"rastosd: {hostile.rss_at_start:.1f} MB at start, grown by {grown:.1f} MB")
    assert grown < MAX_RSS_GROWTH_MB, f"rastosd grew by {grown:.1f} MB"
