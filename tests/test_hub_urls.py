"""Several hub URLs for one host (the processes of one hub on one database): how daemon.toml, an image
profile and the credential rastos.hub.url give them, each refusal naming the setting and the item.
The failover itself, with real hubs and a real rastosd: tests/test_hub_fleet.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from daemon.config import load_config, parse_config
from daemon.config_write import with_hub_keys
from daemon.ctl_output import format_hub_status
from daemon.hub_link import HubLink
from daemon.hub_link_settings import HubSettings, load_settings
from imagebuilder.profile.load import load_profile
from imagebuilder.profile.merge import ProfileError
from imagebuilder.stages.configure import write_daemon_config
from rastos.errors import RastosError
from rastos.hub_settings import HubUrlProblem, hub_urls
from tests.hub_fixtures import Pki

A, B = "ws://hub-a:8470/api/v1/agent", "ws://hub-b:8470/api/v1/agent"
SOURCE = Path("/etc/rastos/daemon.toml")
TOKEN = "t0ken-" + "x" * 30


def test_one_url_or_a_list_of_them_all_of_one_scheme() -> None:
    assert hub_urls(A) == (A,)
    assert hub_urls([A, B]) == (A, B)


@pytest.mark.parametrize(
    ("value", "at", "problem"),
    [
        ([], "", "must name at least one hub"),
        (7, "", "must be a URL or a list of URLs, got int"),
        ("http://hub/api/v1/agent", "", "must be a ws:// or wss:// URL, got 'http://hub/api/v1/agent'"),
        ([A, "hub-b:8470"], "[1]", "must be a ws:// or wss:// URL, got 'hub-b:8470'"),
        ([A, 8470], "[1]", "must be a ws:// or wss:// URL, got int"),
        ([A, "wss://hub-b/api/v1/agent"], "[1]", "must start with ws:// as [0] does"),
        ([f"{A} {B}"], "[0]", "must be a ws:// or wss:// URL"),
        (f"{A},{B}", "", "holds more than one URL: give several as a list"),
    ],
)
def test_a_bad_url_is_refused_naming_its_item(value: object, at: str, problem: str) -> None:
    with pytest.raises(HubUrlProblem) as raised:
        hub_urls(value)
    assert raised.value.at == at and problem in raised.value.problem, raised.value


def test_daemon_toml_takes_one_url_as_before_or_a_list() -> None:
    one = parse_config(f'[hub]\nurl = "{A}"\n', SOURCE)
    assert one.hub_urls == (A,) and one.hub_url == A
    several = parse_config(f'[hub]\nurl = [\n  "{A}",\n  "{B}",\n]\n', SOURCE)
    assert several.hub_urls == (A, B) and several.hub_url == A
    assert parse_config("", SOURCE).hub_urls == () and parse_config("", SOURCE).hub_url is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'url = ["{A}", "http://b/api/v1/agent"]', "hub.url[1] must be a ws:// or wss:// URL, got 'http://b/"),
        (f'url = ["{A}", "wss://b/api/v1/agent"]', "hub.url[1] must start with ws:// as [0] does"),
        ("url = []", "hub.url must name at least one hub"),
        ("url = 8470", "hub.url must be a URL or a list of URLs, got int"),
        (f'url = ["{A}", "{B}"]\nca = "/etc/rastos/hub-ca.pem"', "hub.ca needs a wss:// hub.url"),
    ],
)
def test_daemon_toml_refuses_a_bad_list_naming_the_key_and_item(text: str, message: str) -> None:
    with pytest.raises(RastosError) as raised:
        parse_config(f"[hub]\n{text}\n", SOURCE)
    assert raised.value.message.startswith(f"{SOURCE}: {message}"), raised.value.message


def test_join_replaces_a_list_with_the_one_url_it_is_given() -> None:
    text = f'[hub]\nurl = [\n  "{A}",\n  "{B}",\n]\ntoken_file = "/etc/rastos/tok"\n'
    joined = parse_config(with_hub_keys(text, SOURCE, {"url": "ws://new/api/v1/agent"}), SOURCE)
    assert joined.hub_urls == ("ws://new/api/v1/agent",) and joined.hub_token_file == Path("/etc/rastos/tok")


def credentials(tmp_path: Path, url: str) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "rastos.hub.url").write_text(url)
    (directory / "rastos.hub.token").write_text(TOKEN)
    return directory


@pytest.mark.parametrize("separated", [f"{A} {B}\n", f"{A}\n{B}\n", f"  {A}\t\n {B}"])
def test_the_credential_takes_urls_separated_by_whitespace_before_daemon_toml(tmp_path: Path, separated: str) -> None:
    settings = load_settings(("ws://from-toml/api/v1/agent",), tmp_path / "none", credentials(tmp_path, separated))
    assert settings is not None and settings.urls == (A, B) and settings.url == A and settings.token == TOKEN


def test_one_url_in_the_credential_is_one_hub_as_before(tmp_path: Path) -> None:
    settings = load_settings(None, tmp_path / "none", credentials(tmp_path, A + "\n"))
    assert settings is not None and settings.urls == (A,)


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (f"{A} http://b/api/v1/agent", "credential rastos.hub.url[1] must be a ws:// or wss:// URL"),
        (f"{A} wss://b/api/v1/agent", "credential rastos.hub.url[1] must start with ws:// as [0] does"),
        (f"{A},{B}", "credential rastos.hub.url holds more than one URL: give several as a list (in the credential "
                     "rastos.hub.url, separated by whitespace)"),
    ],
)  # fmt: skip
def test_a_bad_credential_is_logged_naming_the_item_and_the_token_never(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str, logged: str
) -> None:
    with caplog.at_level(logging.ERROR, "rastosd.hub"):
        assert load_settings((B,), tmp_path / "none", credentials(tmp_path, url)) is None
    assert logged in caplog.text and "not connecting" in caplog.text, caplog.text
    assert TOKEN not in caplog.text


WSS = "wss://hub-a:8470/api/v1/agent"


def test_the_ca_credential_comes_before_hub_ca_and_verifies_the_hub(tmp_path: Path) -> None:
    given = credentials(tmp_path, WSS)
    (given / "rastos.hub.ca").write_text(Pki.make(tmp_path / "pki").ca.read_text())
    settings = load_settings((B,), tmp_path / "none", given, tmp_path / "from-daemon-toml.pem")
    assert settings is not None and settings.url == WSS and settings.ca == given / "rastos.hub.ca"
    context = settings.tls()
    assert context is not None and (("commonName", "ca-pki"),) in context.get_ca_certs()[0]["subject"]


@pytest.mark.parametrize(
    ("pem", "logged"),
    [
        ("no certificate here\n", "holds no PEM certificate"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "holds a private key"),
    ],
)
def test_a_ca_credential_that_verifies_nothing_is_logged_and_not_connected_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pem: str, logged: str
) -> None:
    given = credentials(tmp_path, WSS)
    (given / "rastos.hub.ca").write_text(pem)
    with caplog.at_level(logging.ERROR, "rastosd.hub"):
        assert load_settings(None, tmp_path / "none", given) is None
    assert f"credential rastos.hub.ca {logged}" in caplog.text and "not connecting" in caplog.text, caplog.text
    assert TOKEN not in caplog.text


def test_no_ca_credential_leaves_hub_ca_as_daemon_toml_has_it(tmp_path: Path) -> None:
    ca = tmp_path / "hub-ca.pem"
    settings = load_settings(None, tmp_path / "none", credentials(tmp_path, WSS), ca)
    assert settings is not None and settings.ca == ca


class Core:
    """What HubLink's constructor asks of the daemon; the link is not run."""

    def on_update_completed(self, callback: object) -> None:
        pass


def test_the_status_names_the_url_in_use_and_the_link_moves_on_in_order(tmp_path: Path) -> None:
    c = "ws://hub-c:8470/api/v1/agent"
    link = HubLink(Core(), HubSettings(A, TOKEN, others=(B, c)))  # type: ignore[arg-type]
    assert link.status()["url"] == A and link.status()["urls"] == [A, B, c]
    seen = []
    for _ in range(4):
        link._next_hub()
        seen.append(link.status()["url"])
    assert seen == [B, c, A, B], "round the list, from where it is"
    assert link.hub_base() == "http://hub-b:8470", "downloads come from the hub in use"
    alone = HubLink(Core(), HubSettings(A, TOKEN))  # type: ignore[arg-type]
    alone._next_hub()
    assert alone.status()["url"] == A and alone.status()["urls"] == [A]


def test_rastosctl_hub_status_shows_every_hub_when_there_are_several() -> None:
    status = {"state": "connected", "url": B, "urls": [A, B], "error": None, "since": None}
    assert format_hub_status(status).splitlines() == ["state: connected", f"hub:   {B}", f"hubs:  {A}, {B}"]
    assert len(format_hub_status({**status, "urls": [B]}).splitlines()) == 2, "one hub: as before"


def test_a_profile_lists_hubs_and_the_image_daemon_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'extends = "minimal"\n[hub]\nurl = ["{A}", "{B}"]\n')
    profile = load_profile(path)
    assert profile.hub.url == (A, B)
    write_daemon_config(tmp_path / "root", profile)
    assert load_config(tmp_path / "root/etc/rastos/daemon.toml").hub_urls == (A, B)
    path.write_text(f'extends = "minimal"\n[hub]\nurl = "{A}"\n')
    write_daemon_config(tmp_path / "one", load_profile(path))
    assert f'url = "{A}"' in (tmp_path / "one/etc/rastos/daemon.toml").read_text(), "one URL: written as before"


@pytest.mark.parametrize(
    ("url", "key", "problem"),
    [
        (f'["{A}", "http://b:8470"]', "hub.url[1]", "not a ws:// or wss:// URL: 'http://b:8470'"),
        (f'["{A}", "wss://b:8470/api/v1/agent"]', "hub.url[1]", "must start with ws:// as [0] does"),
        (f'["{A}", 8470]', "hub.url", "expected a URL or a list of URLs"),
    ],
)
def test_a_profile_refuses_a_bad_hub_naming_the_item(tmp_path: Path, url: str, key: str, problem: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'extends = "minimal"\n[hub]\nurl = {url}\n')
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert f"key '{key}'" in str(raised.value) and problem in str(raised.value), raised.value
