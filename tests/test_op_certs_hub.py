"""The certs op issuing the fleet hub's certificate from the host's CA, on the real Debian tree
(tests/op_tree.py) with the hub's user made by systemd-sysusers from units/hub/rastos-hub.sysusers,
as docs/hub.md's production set-up makes it; then a real `rastos-hub serve --tls-cert --tls-key` on
the files it wrote, and real TLS clients that verify it against the CA file given to agents."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from daemon.errors import InvalidParams, UnsafePath
from ops.actions import FollowUp
from ops.base import Plan, execute
from ops.certs import CA_CERT, HUB_CA, HUB_CERT, HUB_DIR, HUB_KEY, HUB_STATE, current_params
from ops.pki import sans
from ops.steps import step_from
from ops.target import Target, in_target
from tests.hub_fixtures import Hub, Pki, _serving
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]

CHECKOUT = Path(__file__).resolve().parents[1]
NAMES = ["hub.example.org", "127.0.0.1", "2001:db8::10"]


def at(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def apply(target: Target, params: dict[str, Any]) -> tuple[Plan, list[str]]:
    """Plan, apply and verify one certs step; returns the plan and verify's problems."""
    step = step_from(target, "certs", params, "")
    plan = step.op.plan(target, step.params)
    execute(plan, target, lambda line: None)
    return plan, step.op.verify(target, step.params)


def plan_of(target: Target, params: dict[str, Any]) -> Plan:
    step = step_from(target, "certs", params, "")
    return step.op.plan(target, step.params)


def hub_ids(root: Path) -> tuple[int, int]:
    line = next(line for line in at(root, "/etc/passwd").read_text().splitlines() if line.startswith("rastos-hub:"))
    fields = line.split(":")
    return int(fields[2]), int(fields[3])


@pytest.fixture
def hub_root(op_root: Path) -> Path:
    """The tree with the hub's user, made as the production set-up makes it."""
    sysusers = CHECKOUT / "units/hub/rastos-hub.sysusers"
    subprocess.run(["systemd-sysusers", f"--root={op_root}", str(sysusers)], check=True, capture_output=True)
    return op_root


def hello(port: int, context: ssl.SSLContext, name: str) -> str:
    """A TLS handshake with the hub at 127.0.0.1 as a client that reaches it by `name` (SNI and the
    name checked), then one HTTP request; the status line."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET /api/v1/openapi.json HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        return tls.recv(4096).decode(errors="replace").splitlines()[0]


@pytest.fixture
def served(hub_root: Path, tmp_path: Path) -> Iterator[Hub]:
    """A real hub serving the pair the certs op issued, in place."""
    target = Target(hub_root)
    plan, problems = apply(target, {"hub_names": NAMES, "trust": False})
    assert problems == []
    assert [(c.subject, c.action) for c in plan.changes if c.subject.startswith(HUB_DIR)] == [
        (HUB_CERT, "create"), (HUB_CA, "create")]  # fmt: skip
    files = Pki(at(hub_root, HUB_CA), at(hub_root, HUB_CERT), at(hub_root, HUB_KEY))
    yield from _serving(Hub(tmp_path / "hub", tls=files))


def test_the_hub_serves_the_issued_certificate_to_clients_by_name_and_by_address(served: Hub, hub_root: Path) -> None:
    assert served.tls is not None
    agent = ssl.create_default_context(cafile=str(served.tls.ca))  # as an agent's [hub] ca verifies
    assert hello(served.port, agent, "hub.example.org").startswith("HTTP/1.1 200")
    assert hello(served.port, agent, "127.0.0.1").startswith("HTTP/1.1 200"), "an address checks the iPAddress SAN"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        hello(served.port, agent, "other.example.org")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        hello(served.port, agent, "127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        hello(served.port, ssl.create_default_context(cafile=str(Pki.make(served.directory / "other").ca)),
              "hub.example.org")  # fmt: skip
    text = subprocess.run(in_target(Target(hub_root), ["openssl", "x509", "-in", HUB_CERT, "-noout", "-ext",
                          "subjectAltName"]), capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "DNS:hub.example.org, IP Address:127.0.0.1, IP Address:2001:DB8:0:0:0:0:0:10" in text, text


def test_the_hub_can_read_its_key_and_no_one_else(hub_root: Path) -> None:
    target = Target(hub_root)
    assert apply(target, {"hub_names": NAMES, "trust": False})[1] == []
    uid, gid = hub_ids(hub_root)
    found = {path: at(hub_root, path).stat() for path in (HUB_STATE, HUB_DIR, HUB_KEY, HUB_CERT, HUB_CA)}
    assert {path: (s.st_mode & 0o7777, s.st_uid, s.st_gid) for path, s in found.items()} == {
        HUB_STATE: (0o700, uid, gid), HUB_DIR: (0o700, uid, gid), HUB_KEY: (0o600, uid, gid),
        HUB_CERT: (0o644, uid, gid), HUB_CA: (0o644, uid, gid)}  # fmt: skip
    assert at(hub_root, HUB_CA).read_text() == at(hub_root, CA_CERT).read_text()
    verified = subprocess.run(in_target(target, ["openssl", "verify", "-CAfile", HUB_CA, HUB_CERT]),
                              capture_output=True, text=True, check=False)  # fmt: skip
    assert verified.stdout.strip() == f"{HUB_CERT}: OK", verified.stderr
    assert sans(x509.load_pem_x509_certificate(at(hub_root, HUB_CERT).read_bytes())) == NAMES
    assert current_params(target)["hub_names"] == NAMES, "a compliance renewal keeps the hub's names"


def test_a_second_apply_changes_nothing_and_new_names_renew_the_hub_which_takes_them_on_sighup(
    served: Hub, hub_root: Path
) -> None:
    target = Target(hub_root)
    before = tree_digest(hub_root)
    assert plan_of(target, {"hub_names": NAMES, "trust": False}).actions == ()
    respelled = ["hub.example.org", "127.0.0.1", "2001:DB8:0::10"]
    assert plan_of(target, {"hub_names": respelled, "trust": False}).actions == (), "an address has one spelling"
    assert tree_digest(hub_root) == before
    old_key = at(hub_root, HUB_KEY).read_bytes()
    wider = [*NAMES, "hub2.example.org"]
    plan, problems = apply(target, {"hub_names": wider, "trust": False})
    assert problems == [] and [(c.subject, c.action) for c in plan.changes] == [(HUB_CERT, "renew")]
    assert plan.changes[0].detail.startswith("renew: SANs changed (+hub2.example.org)")
    assert at(hub_root, HUB_KEY).read_bytes() != old_key, "a renewal makes a new key"
    assert served.tls is not None and served.process is not None
    agent = ssl.create_default_context(cafile=str(served.tls.ca))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        hello(served.port, agent, "hub2.example.org")
    served.process.send_signal(signal.SIGHUP)  # what the op's follow-up, systemctl reload, sends
    deadline = time.monotonic() + 20
    while True:
        try:
            assert hello(served.port, agent, "hub2.example.org").startswith("HTTP/1.1 200")
            break
        except ssl.SSLCertVerificationError:
            assert time.monotonic() < deadline, served.log.read_text()[-2000:]
            time.sleep(0.2)


def test_a_hub_certificate_near_its_end_is_renewed_and_a_new_ca_reissues_it(hub_root: Path) -> None:
    target = Target(hub_root)
    assert apply(target, {"hub_names": NAMES, "days": 40, "trust": False})[1] == []
    plan = plan_of(target, {"hub_names": NAMES, "days": 60, "renew_before_days": 45, "trust": False})
    hub = [c for c in plan.changes if c.subject == HUB_CERT]
    assert [c.detail.split(";")[0] for c in hub] == ["renew: expires in 39 days (renew_before_days 45)"]
    plan, problems = apply(target, {"hub_names": NAMES, "ca_name": "second-ca", "trust": False})
    assert problems == []
    changes = {c.subject: c for c in plan.changes}
    assert changes[HUB_CERT].detail.startswith("renew: the CA is made anew")
    assert changes[HUB_CA].action == "set", "agents are given the new CA"
    assert at(hub_root, HUB_CA).read_text() == at(hub_root, CA_CERT).read_text()
    left = x509.load_pem_x509_certificate(at(hub_root, HUB_CERT).read_bytes()).not_valid_after_utc
    assert left - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=396)


def test_owners_and_modes_drifted_are_put_back_without_a_new_key(hub_root: Path) -> None:
    target = Target(hub_root)
    assert apply(target, {"hub_names": NAMES, "trust": False})[1] == []
    key = at(hub_root, HUB_KEY).read_bytes()
    os.chown(at(hub_root, HUB_KEY), 0, 0)
    at(hub_root, HUB_KEY).chmod(0o644)
    at(hub_root, HUB_CA).write_text("not the CA\n")
    plan, problems = apply(target, {"hub_names": NAMES, "trust": False})
    assert problems == [] and [(c.subject, c.action) for c in plan.changes] == [(HUB_KEY, "set"), (HUB_CA, "set")]
    uid, gid = hub_ids(hub_root)
    status = at(hub_root, HUB_KEY).stat()
    assert (status.st_mode & 0o7777, status.st_uid, status.st_gid) == (0o600, uid, gid)
    assert at(hub_root, HUB_KEY).read_bytes() == key
    assert at(hub_root, HUB_CA).read_text() == at(hub_root, CA_CERT).read_text()


def test_an_installed_hub_unit_is_reloaded_after_a_renewal_only(hub_root: Path) -> None:
    target = Target(hub_root)
    unit = at(hub_root, "/etc/systemd/system/rastos-hub.service")
    shutil.copy(CHECKOUT / "units/hub/rastos-hub.service", unit)
    plan = plan_of(target, {"hub_names": NAMES, "trust": False})
    assert FollowUp("try-reload-or-restart", "rastos-hub.service") in plan.actions
    execute(plan, target, lambda line: None)  # a scratch root: the follow-up is the live system's alone
    assert plan_of(target, {"hub_names": NAMES, "trust": False}).actions == ()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["hub.example.org", "300.1.2.3"], r"params\.hub_names\[1\]: '300\.1\.2\.3' is not valid: a lower-case DNS"),
        (["Hub.example.org"], r"params\.hub_names\[0\]: 'Hub\.example\.org' is not valid"),
        (["fe80::1%eth0"], r"params\.hub_names\[0\]: 'fe80::1%eth0' is not valid"),
        (["1:2"], r"params\.hub_names: \[0\] '1:2' is not an IPv6 address"),
        (["2001:db8::1", "2001:DB8:0::1"], r"params\.hub_names: names 2001:db8::1 more than once"),
    ],
)
def test_bad_hub_names_are_refused_naming_the_field(hub_root: Path, names: list[str], message: str) -> None:
    with pytest.raises(InvalidParams, match=f"^{message}"):
        step_from(Target(hub_root), "certs", {"hub_names": names}, "")


def test_no_hub_user_is_refused_before_anything_is_made(op_root: Path) -> None:
    before = tree_digest(op_root)
    with pytest.raises(InvalidParams, match=r"^params\.hub_names: the hub's user rastos-hub does not exist"):
        step_from(Target(op_root), "certs", {"hub_names": NAMES}, "")
    assert tree_digest(op_root) == before


@pytest.mark.parametrize("place", ["dir-link", "key-link", "key-hard-link", "ca-link"])
def test_a_link_the_hub_user_plants_in_its_state_directory_is_refused(hub_root: Path, place: str) -> None:
    """The state directory is the hub's user's: what it puts there is never followed or written through."""
    target = Target(hub_root)
    uid, gid = hub_ids(hub_root)
    state, tls = at(hub_root, HUB_STATE), at(hub_root, HUB_DIR)
    state.mkdir(mode=0o700)
    os.chown(state, uid, gid)
    secret = at(hub_root, "/etc/shadow")
    kept = secret.read_bytes()
    if place == "dir-link":
        tls.symlink_to("../../../etc")  # hub.key would then be written into the tree's /etc
    else:
        assert apply(target, {"hub_names": NAMES, "trust": False})[1] == []
        victim = at(hub_root, HUB_KEY if place.startswith("key") else HUB_CA)
        victim.unlink()
        if place == "key-hard-link":
            os.link(secret, victim)
        else:
            victim.symlink_to(secret)
    os.lchown(tls, uid, gid)
    before = tree_digest(hub_root)
    with pytest.raises(UnsafePath) as refused:
        apply(target, {"hub_names": [*NAMES, "new.example.org"], "trust": False})
    assert HUB_DIR in str(refused.value) and "root:" not in str(refused.value)
    assert secret.read_bytes() == kept and tree_digest(hub_root) == before, "nothing was changed, half or whole"
