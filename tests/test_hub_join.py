"""Hub.Join on rastosd: the checks of its arguments (rastos/hub_settings.py), daemon.toml's [hub] keys
changed with the rest kept (daemon/config_write.py), and the method on a real rastosd on a private bus,
called by busctl and gdbus (independent clients) and rastosctl. tests/test_hub_enrol.py runs the whole
enrolment, from the hub over SSH."""

from __future__ import annotations

import datetime
import json
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from daemon.config_write import REWRITTEN, with_hub_keys
from ops.pki import cert_pem, key_pem, make_ca
from rastos.errors import RastosError
from rastos.hub_settings import agent_url, check_agent_url, check_ca, check_token
from tests.daemon_fixtures import (
    ADMIN_GROUP,
    BUS_NAME,
    CHECKOUT,
    MANAGER,
    PERMISSIVE_POLICY,
    PLAIN_USER,
    ROOT_PATH,
    PrivateBus,
    Rastosd,
    ScratchRoot,
    config_in_root,
    ensure_test_users,
    private_bus,
)

HUB = "org.rastos.Daemon1.Hub"
TOKEN = "k" * 43  # the form of the hub's tokens (secrets.token_urlsafe(32)); never a real one
NOW = datetime.datetime.now(datetime.UTC)
SOURCE = Path("/etc/rastos/daemon.toml")


def ca(name: str = "test hub CA", now: datetime.datetime = NOW) -> str:
    return cert_pem(make_ca(name, now)[1])


# What is checked, and how a refusal reads


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "is required"),
        ("http://hub:8470/api/v1/agent", "must start with ws:// or wss://, got 'http://hub:8470/api/v1/agent'"),
        ("ws://hub:8470/", "must be the hub's agent socket, a path ending in /api/v1/agent"),
        ("ws://:8470/api/v1/agent", "names no host"),
        ("ws://hub:99999/api/v1/agent", "has a port that is not one"),
        ("ws://admin:pw@hub/api/v1/agent", "must not carry a user or password"),
        ("ws://hub/api/v1/agent?token=x", "must have no query or fragment"),
        ("ws://hub/api/v1/agent#", "must have no query or fragment"),
        ("ws://hub/api/v1/agent x", "must be printable ASCII without spaces"),
        ("ws://h\u00fcb/api/v1/agent", "must be printable ASCII without spaces"),
        ("ws://hub/" + "a" * 3000, "must be at most 2048 characters, got 3009"),
    ],
)
def test_an_agent_url_that_is_not_one_is_refused_saying_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_agent_url(url)
    assert problem in str(refused.value)
    assert len(str(refused.value)) < 200, "at most 64 characters of the value are repeated"


def test_an_admin_may_give_the_hubs_base_and_gets_its_agent_socket() -> None:
    assert check_agent_url("wss://hub.example:8470/api/v1/agent") == "wss://hub.example:8470/api/v1/agent"
    assert agent_url("https://hub.example:8470") == "wss://hub.example:8470/api/v1/agent"
    assert agent_url("http://10.0.2.2:8470/") == "ws://10.0.2.2:8470/api/v1/agent"
    assert agent_url("wss://proxy/fleet/") == "wss://proxy/fleet/api/v1/agent", "a hub under a path keeps it"
    assert agent_url("ws://[::1]:8470/api/v1/agent") == "ws://[::1]:8470/api/v1/agent"
    with pytest.raises(ValueError, match="must start with ws:// or wss://"):
        agent_url("ftp://hub")


def test_a_token_is_checked_for_its_form_and_never_repeated() -> None:
    assert check_token(TOKEN) == TOKEN
    assert check_token("abc.DEF_123-~+/" + "x" * 10 + "==")
    for wrong in ("short", "t" * 513, "a" * 40 + " b", "a" * 40 + "=x", "a" * 40 + "\n", "tøken" * 10):
        with pytest.raises(ValueError, match=r"^must be a hub agent token") as refused:
            check_token(wrong)
        assert wrong.strip() not in str(refused.value), "the token is never in the error"


def test_a_ca_is_pem_certificates_valid_now_and_never_a_key() -> None:
    checked = check_ca("subject=CN = test hub CA\n" + ca() + ca("second CA"))
    assert [c.subject for c in checked.certificates] == ["O=rastOS local CA,CN=test hub CA",
                                                         "O=rastOS local CA,CN=second CA"]  # fmt: skip
    assert checked.pem.count("BEGIN CERTIFICATE") == 2 and "subject=" not in checked.pem, "the prose is dropped"
    assert len(checked.certificates[0].sha256) == 95  # 32 bytes, as openssl prints them: AB:CD:...
    key, certificate = make_ca("with its key", NOW)
    cases = [
        ("", "holds no PEM certificate"),
        ("not a certificate", "holds no PEM certificate"),
        (cert_pem(certificate) + key_pem(key), "holds a private key: give the CA's certificate only"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "holds PEM blocks that are not certificates"),
        ("-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n", "cannot be read"),
        (ca(now=NOW - datetime.timedelta(days=4000)), "certificate 1 (O=rastOS local CA,CN=test hub CA) expired on"),
        (ca(now=NOW + datetime.timedelta(days=2)), "is not valid before"),
        ("\u00e9" + ca(), "must be PEM text (ASCII)"),
        (ca() * 17, "holds 17 certificates; at most 16 are accepted"),
    ]
    for text, problem in cases:
        with pytest.raises(ValueError) as refused:
            check_ca(text)
        assert problem in str(refused.value), (problem, refused.value)


# daemon.toml: the [hub] keys changed, the rest kept


def test_the_hub_keys_change_in_place_and_the_rest_of_the_file_stays_as_written() -> None:
    before = (
        '# this host\'s settings\n[health]\ncritical_units = [\n  "ssh.service",  # the way in\n]\n\n'
        '[hub]  # the fleet\nurl = "ws://old:8470/api/v1/agent"  # the old hub\ntoken_file = "/etc/rastos/tok"\n\n'
        "[snapshots]\nkeep_pairs = 4\n"
    )
    after = with_hub_keys(before, SOURCE, {"url": "wss://new:8470/api/v1/agent", "ca": "/etc/rastos/hub-ca.pem"})
    assert after == before.replace(
        'url = "ws://old:8470/api/v1/agent"  # the old hub\ntoken_file = "/etc/rastos/tok"\n',
        'url = "wss://new:8470/api/v1/agent"\ntoken_file = "/etc/rastos/tok"\nca = "/etc/rastos/hub-ca.pem"\n',
    )
    dropped = with_hub_keys(after, SOURCE, {"url": "ws://new:8470/api/v1/agent", "ca": None})
    assert tomllib.loads(dropped)["hub"] == {"url": "ws://new:8470/api/v1/agent", "token_file": "/etc/rastos/tok"}
    assert "# the way in" in dropped and "[snapshots]\nkeep_pairs = 4\n" in dropped
    kept = with_hub_keys(after, SOURCE, {"url": "wss://other:8470/api/v1/agent"})
    assert tomllib.loads(kept)["hub"]["ca"] == "/etc/rastos/hub-ca.pem", "a key not given stays"


def test_a_file_without_a_hub_table_gets_one_and_an_empty_file_becomes_one() -> None:
    added = with_hub_keys("[boot]\ntries = 2", SOURCE, {"url": "ws://hub/api/v1/agent", "ca": None})
    assert added == '[boot]\ntries = 2\n\n[hub]\nurl = "ws://hub/api/v1/agent"\n'
    assert with_hub_keys("", SOURCE, {"url": "ws://hub/api/v1/agent"}) == '[hub]\nurl = "ws://hub/api/v1/agent"\n'


def test_hub_keys_written_another_way_make_the_file_written_anew_with_every_setting() -> None:
    before = (
        '# dotted\nhub.url = "ws://old/api/v1/agent"\nhub.token_file = "/t"\n'
        'access = { admin_group = "wheel" }\n[health]\ncritical_units = ["a \\"quoted\\" unit", "b"]\n'
    )
    after = with_hub_keys(before, SOURCE, {"url": "wss://new/api/v1/agent", "ca": "/etc/rastos/hub-ca.pem"})
    assert after.startswith(REWRITTEN)
    assert tomllib.loads(after) == {
        "hub": {"url": "wss://new/api/v1/agent", "token_file": "/t", "ca": "/etc/rastos/hub-ca.pem"},
        "access": {"admin_group": "wheel"}, "health": {"critical_units": ['a "quoted" unit', "b"]},
    }  # fmt: skip


def test_a_file_rastosd_would_not_start_on_is_not_touched() -> None:
    for text, problem in (('[hub]\nurl = "ws://x/api/v1/agent"\nsurprise = 1\n', "unknown key 'hub.surprise'"),
                          ("[hub\n", "cannot read the daemon configuration")):  # fmt: skip
        with pytest.raises(RastosError, match=problem):
            with_hub_keys(text, SOURCE, {"url": "ws://hub/api/v1/agent"})


# Hub.Join on a real rastosd


def hub_status(daemon: Rastosd) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(daemon.call(HUB, "GetStatus")[0])
    return status


def etc(daemon: Rastosd) -> dict[str, tuple[int, str]]:
    """The files of the root's /etc/rastos: mode and content."""
    directory = daemon.scratch.root / "etc/rastos"
    return {p.name: (stat.S_IMODE(p.stat().st_mode), p.read_text()) for p in sorted(directory.iterdir())}


BAD_JOINS = [
    ("http://hub/api/v1/agent", TOKEN, "", "url: must start with ws:// or wss://"),
    ("ws://hub:8470", TOKEN, "", "url: must be the hub's agent socket, a path ending in /api/v1/agent"),
    ("ws://hub/api/v1/agent", "short", "", "token: must be a hub agent token"),
    ("wss://hub/api/v1/agent", TOKEN, "not a certificate", "ca_pem: holds no PEM certificate"),
    ("ws://hub/api/v1/agent", TOKEN, ca(), "ca_pem: a CA is for a wss:// hub (TLS); the url is ws://"),
    # Several hubs, separated by whitespace as in the credential rastos.hub.url: each checked, by its place.
    ("ws://a/api/v1/agent ws://b:8470", TOKEN, "", "url[1]: must be the hub's agent socket, a path ending in"),
    ("ws://a/api/v1/agent\nwss://b/api/v1/agent", TOKEN, "", "url[1]: must start with ws:// as [0] does"),
    ("  ", TOKEN, "", "url: is required"),
]


def join_error(daemon: Rastosd, url: str, token: str, pem: str) -> str:
    """busctl's text for a Join that must fail ("--": a PEM's first line is no option)."""
    result = daemon.busctl("--", "call", BUS_NAME, ROOT_PATH, HUB, "Join", "sss", url, token, pem, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr.strip()


@pytest.mark.root
def test_bad_arguments_are_refused_naming_the_field_and_change_nothing(configured_rastosd: Rastosd) -> None:
    before = etc(configured_rastosd)
    for url, token, pem, message in BAD_JOINS:
        text = join_error(configured_rastosd, url, token, pem)
        assert message in text, (url, text)
        if not pem.startswith("-"):  # gdbus shows the error's name too
            named = configured_rastosd.gdbus(HUB, "Join", url, token, pem)
            assert f"GDBus.Error:org.freedesktop.DBus.Error.InvalidArgs: {message}" in named.stderr, named.stderr
    key, certificate = make_ca("with its key", NOW)
    text = join_error(configured_rastosd, "wss://hub/api/v1/agent", TOKEN, cert_pem(certificate) + key_pem(key))
    assert "ca_pem: holds a private key" in text
    assert etc(configured_rastosd) == before
    assert [e for e in configured_rastosd.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "HubJoin"] == []
    assert hub_status(configured_rastosd) == {"state": "off", "url": None, "urls": [], "error": None, "since": None}


@pytest.mark.root
def test_join_writes_the_token_the_ca_and_the_url_and_the_link_starts_at_once(configured_rastosd: Rastosd) -> None:
    pem = ca()
    url = "wss://127.0.0.1:9/api/v1/agent"  # the discard port: nothing answers there
    reply = configured_rastosd.busctl("--", "call", BUS_NAME, ROOT_PATH, HUB, "Join", "sss", url, TOKEN, pem)
    joined = json.loads(json.loads(reply.stdout)["data"][0])
    rastos = configured_rastosd.scratch.root / "etc/rastos"
    assert joined == {
        "url": url, "config_file": str(rastos / "daemon.toml"), "token_file": str(rastos / "hub-token"),
        "ca_file": str(rastos / "hub-ca.pem"),
        "ca": [{"subject": "O=rastOS local CA,CN=test hub CA", "sha256": check_ca(pem).certificates[0].sha256,
                "not_after": check_ca(pem).certificates[0].not_after}],
    }  # fmt: skip
    files = etc(configured_rastosd)
    assert files["hub-token"] == (0o600, TOKEN + "\n")
    assert files["hub-ca.pem"] == (0o644, pem)
    assert (rastos / "hub-token").stat().st_uid == 0
    settings = tomllib.loads(files["daemon.toml"][1])
    assert settings == {
        "snapshots": {"keep_pairs": 7},
        "hub": {"token_file": str(rastos / "hub-token"), "url": url, "ca": str(rastos / "hub-ca.pem")},
    }
    assert files["daemon.toml"][1].startswith("# kept\n"), "the file's own lines stay"
    left = sorted(p.name for p in rastos.iterdir())
    assert left == ["daemon.toml", "hub-ca.pem", "hub-token"], "no temporary file is left"
    status = hub_status(configured_rastosd)
    assert status["url"] == url and status["state"] in ("connecting", "unreachable"), status
    (event,) = [e for e in configured_rastosd.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "HubJoin"]
    assert event[2] == 0 and json.loads(event[5]) == joined, "the event log records what was written, by whom"
    assert TOKEN not in event[5] and TOKEN not in configured_rastosd.log_text()
    # Joined again to a ws:// hub without a CA: the CA setting goes (a CA is for TLS), the file stays.
    again = json.loads(configured_rastosd.call(HUB, "Join", "sss", "ws://127.0.0.1:9/api/v1/agent", "t" * 43, "")[0])
    assert again["ca_file"] is None and again["ca"] == []
    assert "ca" not in tomllib.loads(etc(configured_rastosd)["daemon.toml"][1])["hub"]
    assert etc(configured_rastosd)["hub-token"] == (0o600, "t" * 43 + "\n")
    assert hub_status(configured_rastosd)["url"] == "ws://127.0.0.1:9/api/v1/agent", "the link was made anew"
    # Several hubs on one database: a list, tried in that order.
    urls = ["ws://127.0.0.1:9/api/v1/agent", "ws://127.0.0.2:9/api/v1/agent"]
    several = json.loads(configured_rastosd.call(HUB, "Join", "sss", "\n".join(urls), "t" * 43, "")[0])
    assert several["url"] == " ".join(urls)
    assert tomllib.loads(etc(configured_rastosd)["daemon.toml"][1])["hub"]["url"] == urls
    assert hub_status(configured_rastosd)["urls"] == urls
    # What was written is what rastosd starts on.
    assert configured_rastosd.stop() == 0
    configured_rastosd.start()
    assert hub_status(configured_rastosd)["urls"] == urls
    assert "TOKEN" not in configured_rastosd.log_text() and "t" * 43 not in configured_rastosd.log_text()


@pytest.mark.root
def test_no_link_is_written_through(daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path) -> None:
    """A link in the token's place is replaced, not written through; a link on the way to it is refused."""
    bus, scratch, state_dir = daemon_env
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hub-token").write_text("not to be overwritten\n")
    keys = scratch.root / "etc/rastos/keys"
    config = config_in_root(scratch)
    config.write_text(config.read_text().replace("etc/rastos/hub-token", "etc/rastos/keys/hub-token"))
    keys.symlink_to(outside)
    daemon = Rastosd(bus, scratch, state_dir, config=config)
    daemon.start()
    try:
        named = daemon.gdbus(HUB, "Join", "ws://127.0.0.1:9/api/v1/agent", TOKEN, "")
        assert (f"GDBus.Error:org.rastos.Daemon1.Error.UnsafePath: {keys}/hub-token: leads through a symbolic link, "
                f"{keys}, which rastosd does not follow") in named.stderr, named.stderr  # fmt: skip
        keys.unlink()
        keys.mkdir()
        (keys / "hub-token").symlink_to(outside / "hub-token")
        daemon.call(HUB, "Join", "sss", "ws://127.0.0.1:9/api/v1/agent", TOKEN, "")
        assert not (keys / "hub-token").is_symlink() and (keys / "hub-token").read_text() == TOKEN + "\n"
    finally:
        assert daemon.stop() == 0
    assert (outside / "hub-token").read_text() == "not to be overwritten\n"
    assert "ws://127.0.0.1:9" in config.read_text()


@pytest.mark.root
def test_a_plain_user_is_refused_by_rastosd_under_either_policy(
    configured_rastosd: Rastosd, daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    ensure_test_users()
    before = etc(configured_rastosd)
    refused = configured_rastosd.gdbus(HUB, "Join", "ws://hub/api/v1/agent", TOKEN, "", user=PLAIN_USER)
    assert "AccessDenied: Join changes the host: only root or members of group 'rastos' may call it" in refused.stderr
    read = configured_rastosd.busctl("call", BUS_NAME, ROOT_PATH, HUB, "GetStatus", user=PLAIN_USER)
    assert json.loads(json.loads(read.stdout)["data"][0])["state"] == "off", "anyone may read the status"
    assert configured_rastosd.stop() == 0
    _, scratch, _ = daemon_env
    config = config_in_root(scratch, f'[access]\nadmin_group = "{ADMIN_GROUP}"\n')
    with private_bus(PERMISSIVE_POLICY) as bus:
        loose = Rastosd(bus, scratch, tmp_path / "state-loose", config=config)
        loose.start()
        try:
            refused = loose.gdbus(HUB, "Join", "ws://hub/api/v1/agent", TOKEN, "", user=PLAIN_USER)
        finally:
            assert loose.stop() == 0
    assert (f"org.freedesktop.DBus.Error.AccessDenied: Join changes the host: only root or members of group "
            f"'{ADMIN_GROUP}' may call it") in refused.stderr  # fmt: skip
    assert {k: v for k, v in etc(configured_rastosd).items() if k != "daemon.toml"} == {
        k: v for k, v in before.items() if k != "daemon.toml"
    }
    assert "ws://hub" not in (scratch.root / "etc/rastos/daemon.toml").read_text()


@pytest.mark.root
def test_credentials_given_at_boot_come_first_so_join_is_refused(
    daemon_env: tuple[PrivateBus, ScratchRoot, Path], tmp_path: Path
) -> None:
    bus, scratch, state_dir = daemon_env
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "rastos.hub.token").write_text("from-the-boot-" + "x" * 30)
    daemon = Rastosd(bus, scratch, state_dir, config=config_in_root(scratch),
                     env={"CREDENTIALS_DIRECTORY": str(credentials)})  # fmt: skip
    daemon.start()
    try:
        named = daemon.gdbus(HUB, "Join", "ws://hub/api/v1/agent", TOKEN, "")
        assert "GDBus.Error:org.rastos.Daemon1.Error.HubCredentials: this host takes its hub settings from the " \
               "systemd credentials rastos.hub.token" in named.stderr, named.stderr  # fmt: skip
        assert not (scratch.root / "etc/rastos/hub-token").exists()
    finally:
        assert daemon.stop() == 0


@pytest.mark.root
def test_rastosctl_hub_join_reads_the_token_from_stdin_and_waits_for_the_link(configured_rastosd: Rastosd) -> None:
    def ctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*configured_rastosd.ctl_argv(), *args], input=stdin, capture_output=True, text=True,
                              check=False, timeout=120, cwd=CHECKOUT)  # fmt: skip

    empty = ctl("hub", "join", "--url", "http://127.0.0.1:9")
    assert empty.returncode == 2 and "rastosctl: the token on standard input must be a hub agent token" in empty.stderr
    bad_url = ctl("hub", "join", "--url", "ftp://127.0.0.1:9", stdin=TOKEN)
    assert bad_url.returncode == 2 and "rastosctl: --url: must start with ws:// or wss://" in bad_url.stderr
    mixed = ctl("hub", "join", "--url", "http://127.0.0.1:9", "--url", "https://127.0.0.2:9", stdin=TOKEN)
    assert mixed.returncode == 2 and "rastosctl: --url[1]: must start with ws:// as [0] does" in mixed.stderr, mixed
    joined = ctl("--json", "hub", "join", "--url", "http://127.0.0.1:9", "--wait", "1", stdin=TOKEN + "\n")
    assert joined.returncode == 5, joined
    document = json.loads(joined.stdout)
    assert document["joined"]["url"] == "ws://127.0.0.1:9/api/v1/agent", "the hub's base becomes its agent socket"
    assert document["status"]["state"] == "unreachable" and "Connect" in document["status"]["error"]
    assert "rastosctl: the link did not connect within 1 s: unreachable: hub at ws://127.0.0.1:9/api/v1/agent" in (
        joined.stderr
    )
    status = ctl("hub", "status")
    assert status.returncode == 0 and "state: unreachable" in status.stdout
    assert etc(configured_rastosd)["hub-token"] == (0o600, TOKEN + "\n")
