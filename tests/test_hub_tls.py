"""The hub over TLS: `rastos-hub serve --tls-cert --tls-key` with a real certificate chain (a CA and
the certificate it issued the hub, made by ops/pki.py as the certs op makes them), real agents that
verify it against the CA of their `hub.ca` or refuse it (another CA, an expired certificate), plain
HTTP only on loopback unless `--insecure-listen`, and the connection guard in front of the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from daemon.errors import UpdateFailed
from daemon.hub_link import HubLink
from daemon.hub_link_settings import HubSettings
from daemon.updates.fetch import Download
from daemon.updates.source import parse_source
from hub.tls import MINIMUM_VERSION, TlsFiles
from rastos.bundle import generate_key
from tests.daemon_fixtures import Rastosd, require_root
from tests.hub_fixtures import HUB_CLI, Hub, Pki, _serving, free_port, make_bundle, upload
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_rollouts import UpdatingCore, eventually, rollout_where, states

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path / "pki")


@pytest.fixture
def tls_hub(tmp_path: Path, pki: Pki) -> Iterator[Hub]:
    yield from _serving(Hub(tmp_path / "hub", tls=pki))


@contextlib.contextmanager
def agents(hub: Hub, directory: Path) -> Iterator[Fleet]:
    require_root()
    with contextlib.ExitStack() as stack:
        yield Fleet(hub, directory, stack)


def wait_for(daemon: Rastosd, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := daemon.log_text()):
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


def unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def served_certificate(hub: Hub) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as raw, unverified().wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.root
def test_an_agent_reaches_a_tls_hub_over_wss_through_a_real_certificate_chain(tls_hub: Hub, tmp_path: Path) -> None:
    hub, pki = tls_hub, tls_hub.tls
    assert pki is not None
    with agents(hub, tmp_path / "agents") as fleet:
        daemon = fleet.add("web-1")
        hub.wait_state(online("web-1"), "the agent online over wss, its facts in")
        assert f"connected to the hub at wss://localhost:{hub.port}/api/v1/agent" in daemon.log_text()
        run = hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "steps": [{"op": "motd", "params": {
            "text": "over TLS"}}]})  # fmt: skip
        hub.wait_state(lambda state: state["runs"][run["id"]]["state"] == "complete", "the run done over wss")
    assert f"serving on https://127.0.0.1:{hub.port}" in hub.log.read_text()
    with (
        socket.create_connection(("127.0.0.1", hub.port), timeout=10) as raw,
        pki.client().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # The UI's session cookie is Secure over TLS; plain HTTP on the TLS port is no way in.
    login = urllib.request.Request(f"{hub.url}/api/v1/login", data=f'{{"token": "{hub.admin_token}"}}'.encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    with urllib.request.urlopen(login, timeout=10, context=pki.client()) as response:
        assert "Secure" in response.headers["Set-Cookie"] and response.status == 204
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{hub.port}/api/v1/state", timeout=10).close()


@pytest.mark.root
def test_an_agent_refuses_a_hub_its_ca_did_not_issue_and_says_against_what(tls_hub: Hub, tmp_path: Path) -> None:
    other = Pki.make(tmp_path / "other")
    with agents(tls_hub, tmp_path / "agents") as fleet:
        wrong = fleet.add("web-1", ca=other.ca)
        system = fleet.add("web-2", ca=None)
        log = wait_for(wrong, f"failed TLS verification against hub.ca {other.ca}: unable to get local issuer")
        assert "connected to the hub" not in log
        wait_for(system, "failed TLS verification against the system's CA store: unable to get local issuer")
        assert wrong.process is not None and wrong.process.poll() is None, "the daemon runs on without its hub"
        status = json.loads(wrong.call("org.rastos.Daemon1.Hub", "GetStatus")[0])  # rastosctl hub status
        assert status["state"] == "untrusted", status
        assert status["error"].endswith(f"failed TLS verification against hub.ca {other.ca}: unable to get local "
                                        "issuer certificate"), status  # fmt: skip
        hosts = tls_hub.state()["hosts"]
        assert not hosts["web-1"]["online"] and not hosts["web-2"]["online"]
        assert hosts["web-1"]["facts"] is None, "nothing crossed"


@pytest.mark.root
def test_an_agent_refuses_an_expired_hub_certificate(tmp_path: Path) -> None:
    expired = Pki.make(tmp_path / "pki", expired=True)
    # The test's own REST calls let the expiry pass (Python cannot skip only that check); the agent does not.
    for hub in _serving(Hub(tmp_path / "hub", tls=expired, client=unverified())):
        assert "expired on" in hub.log.read_text() and "agents refuse the hub" in hub.log.read_text()
        with agents(hub, tmp_path / "agents") as fleet:
            daemon = fleet.add("web-1")
            log = wait_for(daemon, f"failed TLS verification against hub.ca {expired.ca}: certificate has expired")
            assert "connected to the hub" not in log
            assert json.loads(daemon.call("org.rastos.Daemon1.Hub", "GetStatus")[0])["state"] == "untrusted"
            assert hub.state()["hosts"]["web-1"]["online"] is False


def serve(tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    log = (tmp_path / f"serve-{free_port()}.log").open("w")
    return subprocess.Popen(
        [*HUB_CLI, "--database", str(tmp_path / "hub.db"), "--data-dir", str(tmp_path), "serve", *options],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=CHECKOUT,
    )  # fmt: skip


def answers(url: str, context: ssl.SSLContext | None = None, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/openapi.json", timeout=2, context=context) as response:
                return int(response.status)
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"nothing answered at {url}"
            time.sleep(0.1)


def test_plain_http_is_served_off_loopback_only_with_insecure_listen(tmp_path: Path, pki: Pki) -> None:
    hub = Hub(tmp_path)
    port = free_port()
    for address in ("0.0.0.0", "[::]", "192.0.2.1"):
        refused = hub.cli("serve", "--listen", f"{address}:{port}")
        assert refused.returncode == 1, refused.stdout
        shown = address.strip("[]")
        assert refused.stderr.startswith(f"rastos-hub: --listen: {shown} is not a loopback address"), refused.stderr
        assert "--insecure-listen" in refused.stderr and "--tls-cert" in refused.stderr, refused.stderr
    for options, url, context in (
        (["--listen", f"0.0.0.0:{port}", "--insecure-listen"], f"http://127.0.0.1:{port}", None),
        (["--listen", f"localhost:{port}"], f"http://127.0.0.1:{port}", None),
        (["--listen", f"0.0.0.0:{port}", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)],
         f"https://localhost:{port}", pki.client()),
    ):  # fmt: skip
        process = serve(tmp_path, *options)
        try:
            assert answers(url, context) == 200, options
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0


def test_tls_files_that_cannot_be_used_are_refused_naming_the_option(tmp_path: Path, pki: Pki) -> None:
    other = Pki.make(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    hub = Hub(tmp_path)
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    cases = [
        (["--tls-cert", str(pki.cert)], "--tls-key: needed with --tls-cert"),
        (["--tls-key", str(pki.key)], "--tls-cert: needed with --tls-key"),
        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(pki.key)],
         f"--tls-cert: cannot read {tmp_path / 'none.pem'}: No such file or directory"),
        (["--tls-cert", str(garbage), "--tls-key", str(pki.key)], f"--tls-cert: {garbage} holds no PEM certificate"),
        (["--tls-cert", str(pki.cert), "--tls-key", str(garbage)], f"--tls-key: {garbage} holds no PEM private key"),
        (["--tls-cert", str(pki.cert), "--tls-key", str(other.key)],
         f"--tls-key: {other.key} is not the key of the certificate in --tls-cert {pki.cert}"),
    ]  # fmt: skip
    for options, expected in cases:
        result = hub.cli("serve", *listen, *options)
        assert result.returncode == 1 and result.stderr.startswith(f"rastos-hub: {expected}"), (options, result)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_is_refused_on_both_ends(tls_hub: Hub) -> None:
    assert tls_hub.tls is not None
    assert TlsFiles(tls_hub.tls.cert, tls_hub.tls.key).context().minimum_version == ssl.TLSVersion.TLSv1_2
    settings = HubSettings(tls_hub.agent_url, "x", tls_hub.tls.ca)
    agent = settings.tls()
    assert agent is not None and agent.minimum_version == MINIMUM_VERSION
    # A client that offers TLS 1.1 at most (with the ciphers it needs) is turned away; the same client
    # allowed TLS 1.2 gets in.
    for highest, admitted in ((ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True)):
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        client.set_ciphers("ALL:@SECLEVEL=0")
        client.minimum_version, client.maximum_version = ssl.TLSVersion.MINIMUM_SUPPORTED, highest
        with socket.create_connection(("127.0.0.1", tls_hub.port), timeout=10) as raw:
            try:
                with client.wrap_socket(raw) as tls:
                    assert admitted and tls.version() == "TLSv1.2"
            except ssl.SSLError as error:
                assert not admitted, error


IDLE_SOCKETS = 1100


def test_a_crowd_that_never_finishes_a_handshake_does_not_keep_tls_clients_out(tmp_path: Path, pki: Pki) -> None:
    """The guard counts a connection before its TLS handshake: 1,100 sockets that connect and say
    nothing, with 1,024 open files, and an HTTPS client is still served at once."""
    for server in _serving(Hub(tmp_path / "hub", open_files=1024, tls=pki)):
        with contextlib.ExitStack() as stack:
            crowd = [stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
                     for _ in range(IDLE_SOCKETS)]  # fmt: skip
            time.sleep(0.5)
            started = time.monotonic()
            status, _ = server.request("GET", "/api/v1/state")
            assert status == 200 and time.monotonic() - started < 2
            newest = crowd[-1]  # closed by the hub when its time without credentials (or handshake) ends
            newest.settimeout(20)
            assert newest.recv(1) == b""
        log = server.log.read_text()
        assert log.count("the hub is crowded") == 1 and "Too many open files" not in log, log[-3000:]
        assert server.request("GET", "/api/v1/state")[0] == 200


def test_sighup_reads_a_renewed_certificate_and_keeps_the_old_one_if_the_new_cannot_be_used(
    tls_hub: Hub, tmp_path: Path
) -> None:
    assert tls_hub.tls is not None and tls_hub.process is not None
    before = served_certificate(tls_hub)
    renewed = Pki.make(tmp_path / "renewed")
    tls_hub.tls.cert.write_bytes(renewed.cert.read_bytes())
    tls_hub.tls.key.write_bytes(renewed.key.read_bytes())
    tls_hub.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (now := served_certificate(tls_hub)).serial_number == before.serial_number:
        assert time.monotonic() < deadline, tls_hub.log.read_text()[-2000:]
        time.sleep(0.1)
    assert now.serial_number == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
    # A key that does not match: logged, and the renewed pair stays in use.
    tls_hub.tls.key.write_bytes(Pki.make(tmp_path / "stray").key.read_bytes())
    tls_hub.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: keeping the certificate in use: --tls-key:" not in tls_hub.log.read_text():
        assert time.monotonic() < deadline, tls_hub.log.read_text()[-2000:]
        time.sleep(0.1)
    assert served_certificate(tls_hub).serial_number == now.serial_number


def test_the_agent_fetches_its_update_from_a_tls_hub_verified_with_its_ca(tls_hub: Hub, tmp_path: Path) -> None:
    """The hub link hands its TLS settings to the staging: the bundle's download from the hub is
    verified against hub.ca, as the link is; the daemon's own downloader needs it (the system's store
    does not know the CA)."""
    hub, pki = tls_hub, tls_hub.tls
    assert pki is not None
    generate_key(tmp_path / "key")
    bundle = make_bundle(tmp_path, tmp_path / "key", "2.0")
    status, image = upload(hub, bundle.read_bytes())
    assert status == 201, image
    token = hub.api("POST", "/api/v1/hosts", {"name": "real-1"})["token"]
    core = UpdatingCore(tmp_path / "daemon", "1.0")
    link = HubLink(core, HubSettings(hub.agent_url, token, pki.ca))  # type: ignore[arg-type]

    async def scenario() -> None:
        task = asyncio.create_task(link.run_forever())
        try:
            await eventually(lambda: hub.state()["hosts"]["real-1"]["facts"], "the agent's facts over wss")
            body = {"image": image["id"], "target": {"hosts": ["real-1"]}}
            rollout = await asyncio.to_thread(hub.api, "POST", "/api/v1/rollouts", body)
            await rollout_where(hub, rollout["id"], lambda r: states(r)["real-1"] == "staged", "staged")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert core.staged[0][0] == f"https://localhost:{hub.port}/api/v1/images/{image['id']}/bundle"
    assert core.downloaded == [bundle.read_bytes()]

    # rastosd's own downloader, as a staging runs it: with the link's TLS settings, and without.
    def fetch(tls: ssl.SSLContext | None, directory: Path) -> Path:
        return Download(
            parse_source(core.staged[0][0]), directory, {"Authorization": f"Bearer {hub.admin_token}"},
            threading.Event(), progress=lambda _done, _total: None, check_head=lambda _head: None, tls=tls,
        ).run()  # fmt: skip

    assert fetch(link.tls, tmp_path / "with").read_bytes() == bundle.read_bytes()
    with pytest.raises(UpdateFailed, match="unable to get local issuer certificate"):
        fetch(None, tmp_path / "without")


def test_the_daemon_configuration_takes_hub_ca_only_as_an_absolute_path_with_a_wss_hub(tmp_path: Path) -> None:
    from daemon.config import load_config
    from rastos.errors import RastosError

    config = tmp_path / "daemon.toml"
    config.write_text('[hub]\nurl = "wss://hub.example:8470/api/v1/agent"\nca = "/etc/rastos/hub-ca.pem"\n')
    assert load_config(config).hub_ca == Path("/etc/rastos/hub-ca.pem")
    for text, expected in (
        ('[hub]\nurl = "wss://hub.example/api/v1/agent"\nca = "hub-ca.pem"\n', "hub.ca must be an absolute path"),
        ('[hub]\nurl = "ws://hub.example/api/v1/agent"\nca = "/etc/rastos/hub-ca.pem"\n',
         "hub.ca needs a wss:// hub.url (TLS), got 'ws://hub.example/api/v1/agent'"),
        ('[hub]\nurl = "wss://hub.example/api/v1/agent"\nca = 5\n', "hub.ca must be an absolute path, got 5"),
    ):  # fmt: skip
        config.write_text(text)
        with pytest.raises(RastosError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_config(config)


def test_a_ca_file_the_agent_cannot_use_is_said_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from daemon.hub_link_settings import TlsSetupError, load_settings

    token = tmp_path / "token"
    token.write_text("secret\n")
    garbage = tmp_path / "ca.pem"
    garbage.write_text("no certificate here\n")
    settings = load_settings("wss://hub.example/api/v1/agent", token, None, garbage)
    assert settings is not None and settings.ca == garbage and settings.token_file == token
    assert f"hub.ca: cannot use {garbage} as a CA file" in caplog.text
    with pytest.raises(TlsSetupError):
        settings.tls()
    assert HubSettings("ws://hub.example/api/v1/agent", "t", garbage).tls() is None, "no TLS, no CA read"
