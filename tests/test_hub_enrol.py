"""`rastos-hub host enrol` with real parts: the hub serving as its own process (tests/hub_fixtures.py), a
real rastosd on a private bus that the test's sshd on 127.0.0.1 reaches as its system bus
(tests/ssh_fixtures.py), and the real ssh client, as rastosctl -H uses them."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import sqlite3
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.pki import cert_pem, make_ca
from tests.daemon_fixtures import (
    CHECKOUT,
    MANAGER,
    PLAIN_USER,
    Rastosd,
    ensure_test_users,
)
from tests.hub_fixtures import HUB_CLI, Hub
from tests.hub_fixtures import hub as hub
from tests.ssh_fixtures import SshClient, Sshd, bus_dir, closed_port, sshd
from tests.ssh_fixtures import client as client

pytestmark = pytest.mark.root


@pytest.fixture
def host(configured_rastosd: Rastosd) -> Rastosd:
    """The host to enrol: rastosd whose daemon.toml and token file are in its scratch root."""
    return configured_rastosd


@pytest.fixture
def remote(host: Rastosd, client: SshClient, tmp_path: Path) -> Iterator[Sshd]:
    with sshd(tmp_path / "sshd", client, bus_dir(host.bus.address)) as server:
        yield server


def enrol(hub: Hub, client: SshClient, destination: str, *args: str) -> subprocess.CompletedProcess[str]:
    """rastos-hub host enrol, with --debug (every command it runs is logged) and the client's ssh."""
    return subprocess.run(
        [*HUB_CLI, *hub.options, "--debug", "host", "enrol", destination, *args],
        capture_output=True, text=True, check=False, timeout=180, cwd=CHECKOUT, env=client.env(),
        start_new_session=True,
    )  # fmt: skip


def token_hash(hub: Hub, name: str) -> str | None:
    with contextlib.closing(sqlite3.connect(hub.database)) as db:
        row = db.execute("SELECT token_hash FROM hosts WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def hub_events(hub: Hub, name: str) -> list[tuple[str, str]]:
    return [(e["actor"], e["method"]) for e in hub.api("GET", f"/api/v1/events?host={name}&limit=1000")]


def root_files(host: Rastosd) -> dict[str, str]:
    directory = host.scratch.root / "etc/rastos"
    return {path.name: path.read_text() for path in sorted(directory.iterdir())}


def online(name: str) -> Any:
    return lambda state: bool(state["hosts"].get(name, {}).get("online") and state["hosts"][name]["facts"])


def test_a_host_is_enrolled_over_ssh_and_comes_online_and_its_token_is_in_no_log(
    hub: Hub, host: Rastosd, remote: Sshd, client: SshClient
) -> None:
    enrolled = enrol(hub, client, remote.destination(), "--name", "web-1", "--group", "web", "--hub-url", hub.url)
    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout.splitlines() == [
        f"web-1: rastosd 0.1.0 answers on {remote.destination()} (host name rastos)",
        "web-1: added to the hub (groups web)",
        f"web-1: rastosd there wrote its token to {host.scratch.root}/etc/rastos/hub-token and the hub's URL "
        f"{hub.agent_url} to {host.scratch.root}/etc/rastos/daemon.toml",
        "web-1: waiting up to 60 s for its agent to connect",
        f"web-1: online on the hub (its agent connected to {hub.agent_url})",
    ]
    state = hub.wait_state(online("web-1"), "web-1 online", timeout=10)
    assert state["hosts"]["web-1"]["groups"] == ["web"] and state["hosts"]["web-1"]["facts"]["hostname"] == "rastos"
    token_file = host.scratch.root / "etc/rastos/hub-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.stat().st_uid == 0
    token = token_file.read_text().strip()
    assert hashlib.sha256(token.encode()).hexdigest() == token_hash(hub, "web-1"), "the hub's token, and only there"
    settings = tomllib.loads((host.scratch.root / "etc/rastos/daemon.toml").read_text())
    assert settings == {"snapshots": {"keep_pairs": 7}, "hub": {"token_file": str(token_file), "url": hub.agent_url}}
    assert (host.scratch.root / "etc/rastos/daemon.toml").read_text().startswith("# kept\n")
    # The host's own event log says it joined, and so does the hub's copy of it; neither has the token.
    joins = [json.loads(e[5]) for e in host.call(MANAGER, "GetEventLog", "tu", "0", "100")[0] if e[3] == "HubJoin"]
    assert [join["url"] for join in joins] == [hub.agent_url]
    hub.wait_state(lambda s: any(e["method"] == "HubJoin" for e in s["events"]), "the host's HubJoin on the hub")
    hub_log = json.dumps(hub.api("GET", "/api/v1/events?limit=1000"))
    assert hub_events(hub, "web-1")[:1] == [("cli", "HostAdded")]
    # Every command the hub ran is in its debug log: none holds the token, nor does anything else logged.
    assert f"+ {CHECKOUT}" in enrolled.stderr or "daemon.ctl -H" in enrolled.stderr, enrolled.stderr
    for where, text in (("the hub's output", enrolled.stdout + enrolled.stderr), ("the hub's log", hub.log.read_text()),
                        ("the hub's event log", hub_log), ("rastosd's log", host.log_text()),
                        ("rastosd's event log", json.dumps(host.call(MANAGER, "GetEventLog", "tu", "0", "1000"))),
                        ("sshd's log", remote.log.read_text())):  # fmt: skip
        assert token not in text, f"the token is in {where}"


def test_a_host_that_cannot_be_reached_is_refused_before_anything_is_made(hub: Hub, client: SshClient) -> None:
    port = closed_port()
    refused = enrol(hub, client, f"root@127.0.0.1:{port}", "--name", "web-1", "--hub-url", hub.url)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert (f"rastos-hub: web-1: cannot reach rastosd on root@127.0.0.1:{port}: connect to host 127.0.0.1 port "
            f"{port}: Connection refused; nothing was made on the hub") in refused.stderr  # fmt: skip
    assert token_hash(hub, "web-1") is None and hub_events(hub, "web-1") == []
    named = enrol(hub, client, f"root@127.0.0.1:{port}", "--hub-url", hub.url)
    assert named.returncode == 1 and "rastos-hub: --name: needed: root@127.0.0.1" in named.stderr


def test_a_user_who_may_not_change_the_host_is_refused_and_the_hub_is_put_back(
    hub: Hub, host: Rastosd, remote: Sshd, client: SshClient
) -> None:
    ensure_test_users()
    subprocess.run(["usermod", "--password", "*", PLAIN_USER], check=True)  # "!" would lock the login
    before = root_files(host)
    refused = enrol(hub, client, remote.destination(PLAIN_USER), "--name", "web-1", "--hub-url", hub.url)
    assert refused.returncode == 1
    assert (f"rastos-hub: web-1: rastosd on {remote.destination(PLAIN_USER)} did not take the token: "
            "org.freedesktop.DBus.Error.AccessDenied: Join changes the host: only root or members of group "
            "'rastos' may call it; host web-1 was removed from the hub again: nothing of it is left there"
            ) in refused.stderr  # fmt: skip
    assert root_files(host) == before, "nothing changed on the host"
    assert token_hash(hub, "web-1") is None
    assert hub_events(hub, "web-1") == [("cli", "HostAdded"), ("cli", "HostRemoved")], "the hub's log says what it did"


def test_an_agent_that_cannot_reach_the_hub_is_told_with_its_own_reason(
    hub: Hub, host: Rastosd, remote: Sshd, client: SshClient
) -> None:
    port = closed_port()
    late = enrol(hub, client, remote.destination(), "--name", "web-1", "--timeout", "2",
                 "--hub-url", f"http://127.0.0.1:{port}")  # fmt: skip
    assert late.returncode == 1
    assert (
        f"rastos-hub: web-1: enrolled, but the agent did not connect within 2 s: check the URL the host reaches "
        f"the hub at (ws://127.0.0.1:{port}/api/v1/agent); the agent says: unreachable: hub at "
        f"ws://127.0.0.1:{port}/api/v1/agent unreachable: Cannot connect to host 127.0.0.1:{port}"
    ) in late.stderr
    assert f"rastosctl -H {remote.destination()} hub status" in late.stderr, "the hint says how to follow it"
    assert token_hash(hub, "web-1") is not None, "the host stays enrolled: its agent goes on trying"


def test_a_host_on_the_hub_already_is_refused_unless_rotated_and_the_new_token_replaces_the_old(
    hub: Hub, host: Rastosd, remote: Sshd, client: SshClient
) -> None:
    assert enrol(hub, client, remote.destination(), "--name", "web-1", "--hub-url", hub.url).returncode == 0
    first = token_hash(hub, "web-1")
    again = enrol(hub, client, remote.destination(), "--name", "web-1", "--hub-url", hub.url)
    assert again.returncode == 1
    assert "rastos-hub: web-1: the hub has a host of that name already\nhint: --rotate gives it a new token" in (
        again.stderr
    )
    assert token_hash(hub, "web-1") == first
    other_groups = enrol(hub, client, remote.destination(), "--name", "web-1", "--group", "db", "--rotate",
                         "--hub-url", hub.url)  # fmt: skip
    assert other_groups.returncode == 1 and "--rotate keeps a host's groups" in other_groups.stderr
    # Rotated, and given every hub of several on one database: it connects to the first that answers.
    elsewhere = f"ws://127.0.0.2:{hub.port}/api/v1/agent"  # nothing listens there (the hub, on 127.0.0.1 only)
    rotated = enrol(hub, client, remote.destination(), "--name", "web-1", "--rotate", "--hub-url", elsewhere,
                    "--hub-url", hub.url)  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert "web-1: a new token on the hub; the one before ends now" in rotated.stdout
    settings = tomllib.loads((host.scratch.root / "etc/rastos/daemon.toml").read_text())
    assert settings["hub"]["url"] == [elsewhere, hub.agent_url]
    token = (host.scratch.root / "etc/rastos/hub-token").read_text().strip()
    assert token_hash(hub, "web-1") == hashlib.sha256(token.encode()).hexdigest() != first
    hub.wait_state(online("web-1"), "web-1 online with its new token")
    assert [m for a, m in hub_events(hub, "web-1") if a == "cli"] == ["HostAdded", "HostTokenReplaced"]


def test_a_ca_is_checked_here_and_installed_there(
    hub: Hub, host: Rastosd, remote: Sshd, client: SshClient, tmp_path: Path
) -> None:
    ca_file = tmp_path / "hub-ca.pem"
    ca_file.write_text(cert_pem(make_ca("fleet CA", datetime.datetime.now(datetime.UTC))[1]))
    plain = enrol(hub, client, remote.destination(), "--name", "web-1", "--hub-url", hub.url, "--ca", str(ca_file))
    assert plain.returncode == 1 and "rastos-hub: --ca: a CA is for a wss:// hub (TLS)" in plain.stderr
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    wrong = enrol(hub, client, remote.destination(), "--name", "web-1", "--hub-url", "wss://hub", "--ca", str(not_pem))
    assert wrong.returncode == 1 and f"rastos-hub: --ca {not_pem}: holds no PEM certificate" in wrong.stderr
    assert token_hash(hub, "web-1") is None
    # A wss:// URL of this hub, which speaks no TLS: the CA is installed, and the agent says what failed.
    tls = enrol(hub, client, remote.destination(), "--name", "web-1", "--timeout", "2", "--ca", str(ca_file),
                "--hub-url", hub.url.replace("http://", "https://"))  # fmt: skip
    assert tls.returncode == 1 and "the agent did not connect within 2 s" in tls.stderr
    files = root_files(host)
    assert files["hub-ca.pem"] == ca_file.read_text()
    assert tomllib.loads(files["daemon.toml"])["hub"]["ca"] == str(host.scratch.root / "etc/rastos/hub-ca.pem")
