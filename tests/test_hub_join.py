"""Hub.Join on rastosd: the checks of its arguments (rastos/hub_settings.py), daemon.toml's [hub] keys
changed with the rest kept (daemon/config_write.py), and the method on a real rastosd on a private bus,
called by busctl and gdbus (independent clients) and rastosctl. tests/test_hub_enrol.py runs the whole
enrolment, from the hub over SSH."""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path

import pytest

from daemon.config_write import REWRITTEN, with_hub_keys
from ops.pki import cert_pem, key_pem, make_ca
from rastos.errors import RastosError
from rastos.hub_settings import agent_url, check_agent_url, check_ca, check_token

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
