"""The certs and zsh ops and the user op's sudo, lock and expiry, against the real Debian tree
(tests/op_tree.py): each checked with the tree's own programs (openssl, update-ca-certificates,
visudo, sudo, zsh) run inside it, as the host would run them."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from daemon.compliance import scan
from daemon.compliance.model import Status
from daemon.compliance.remediate import pipeline
from daemon.errors import InvalidParams, OpFailed
from ops import get_op
from ops.base import Plan, execute
from ops.certs import BUNDLE, CA_CERT, CA_KEY, HOST_CERT, HOST_KEY, TRUST_DIR
from ops.params import validate
from ops.pki import issue, make_ca, sans
from ops.ssh import effective_config
from ops.steps import parse_steps, step_from
from ops.sysctl import resolve_in_target
from ops.target import Target, in_target
from ops.user import CheckedSudoers
from ops.zsh import MARKER
from tests.op_tree import tree_digest

pytestmark = [pytest.mark.root, pytest.mark.network]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0KEtNPHS1x0Pu2sB9UpGdnnJcHBbt3/0IS0pYqDJa admin@laptop"
# A yescrypt hash (of "secret"): an account with a password, which a lock can be put on and taken off.
HASH = "$y$j9T$Pv1CqbLbyC1p6Ejn3LlVv0$5fQ6SNtqMjXDAV2vEwuZCNM6ZSYqDLo9FoGT0nOF5W9"
UTC = datetime.UTC


def apply(target: Target, op: str, params: dict[str, Any]) -> tuple[Plan, list[str], list[str]]:
    """Plan, apply and verify one step; returns the plan, the output lines and verify's problems."""
    step = step_from(target, op, params, "")
    plan = step.op.plan(target, step.params)
    lines: list[str] = []
    execute(plan, target, lines.append)
    return plan, lines, step.op.verify(target, step.params)


def plan_of(target: Target, op: str, params: dict[str, Any]) -> Plan:
    step = step_from(target, op, params, "")
    return step.op.plan(target, step.params)


def inside(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One of the tree's programs, run in it."""
    return subprocess.run(in_target(Target(root), argv), capture_output=True, text=True, check=check)


def at(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def entry(root: Path, path: str, name: str) -> list[str]:
    return next(line.split(":") for line in at(root, path).read_text().splitlines() if line.startswith(name + ":"))


def shadow(root: Path, name: str) -> list[str]:
    return entry(root, "/etc/shadow", name)


def passwd(root: Path, name: str) -> list[str]:
    return entry(root, "/etc/passwd", name)


# user: sudo rights


def test_sudo_rule_passes_visudo_and_sudo_lists_it(op_root: Path) -> None:
    target = Target(op_root)
    rule = op_root / "etc/sudoers.d/rastos-admin"
    plan, lines, problems = apply(target, "user", {"name": "admin", "sudo": True})
    assert problems == [] and "visudo -c accepts the new rule" in lines
    assert "checked with visudo -c" in plan.changes[-1].detail
    assert rule.read_text().endswith("admin ALL=(ALL:ALL) ALL\n") and rule.stat().st_mode & 0o7777 == 0o440
    assert "(ALL : ALL) ALL" in inside(op_root, "sudo", "-l", "-U", "admin").stdout
    assert apply(target, "user", {"name": "admin", "sudo": True, "sudo_nopasswd": True})[2] == []
    assert "(ALL : ALL) NOPASSWD: ALL" in inside(op_root, "sudo", "-l", "-U", "admin").stdout
    assert apply(target, "user", {"name": "admin"})[2] == []
    assert not rule.exists()
    assert "is not allowed to run sudo" in inside(op_root, "sudo", "-l", "-U", "admin").stdout


def test_a_sudo_rule_visudo_refuses_never_reaches_sudoers_d(op_root: Path) -> None:
    target = Target(op_root)
    before = tree_digest(op_root)
    broken = CheckedSudoers("/etc/sudoers.d/rastos-admin", "admin ALL=(ALL:ALL ALL\n", None)
    with pytest.raises(OpFailed, match="visudo -c refuses the sudo rule, left unchanged"):
        execute(Plan("user", (broken,)), target, lambda line: None)
    assert tree_digest(op_root) == before, "neither the rule nor its scratch copy is left"


def test_sudo_without_sudo_installed_and_nopasswd_alone_are_refused(op_root: Path) -> None:
    with pytest.raises(InvalidParams, match=r"^params\.sudo_nopasswd: needs sudo true"):
        step_from(Target(op_root), "user", {"name": "admin", "sudo_nopasswd": True}, "")
    (op_root / "usr/sbin/visudo").unlink()
    with pytest.raises(OpFailed, match=r"sudo is not installed on the target.*op update"):
        plan_of(Target(op_root), "user", {"name": "admin", "sudo": True})


def test_removing_an_account_removes_its_sudo_rule(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "admin", "sudo": True})[2] == []
    assert apply(target, "user", {"name": "admin", "state": "absent", "remove_home": True})[2] == []
    assert not at(op_root, "/etc/sudoers.d/rastos-admin").exists()
    assert "admin:" not in at(op_root, "/etc/passwd").read_text()


# user: password lock and expiry


def test_lock_and_unlock_a_password_in_shadow(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "admin"})[2] == []
    assert shadow(op_root, "admin")[1] == "!", "useradd's: no password"
    assert plan_of(target, "user", {"name": "admin", "locked": False}).actions == (), "nothing to unlock"
    subprocess.run(["usermod", "--prefix", op_root, "--password", HASH, "admin"], check=True)
    plan, _, problems = apply(target, "user", {"name": "admin", "locked": True})
    assert problems == [] and "--lock" in plan.changes[0].detail
    assert shadow(op_root, "admin")[1] == "!" + HASH
    assert plan_of(target, "user", {"name": "admin", "locked": True}).actions == ()
    assert apply(target, "user", {"name": "admin"})[2] == []
    assert shadow(op_root, "admin")[1] == HASH


def test_expiry_sets_the_day_count_and_clears_it(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "admin", "expires": "2031-05-06"})[2] == []
    days = (datetime.date(2031, 5, 6) - datetime.date(1970, 1, 1)).days
    assert shadow(op_root, "admin")[7] == str(days) == "22405"
    plan, _, problems = apply(target, "user", {"name": "admin", "expires": "2032-01-01"})
    assert problems == [] and "--expiredate 2032-01-01" in plan.changes[0].detail
    assert shadow(op_root, "admin")[7] == str(days + 240)
    assert apply(target, "user", {"name": "admin"})[2] == []
    assert shadow(op_root, "admin")[7] == ""
    assert plan_of(target, "user", {"name": "admin"}).actions == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2031-02-30", r"^params\.expires: '2031-02-30' is not a date YYYY-MM-DD \(day is out of range"),
        ("20310101", r"^params\.expires: '20310101' is not valid: a date YYYY-MM-DD"),
        ("1970-01-01", r"^params\.expires: '1970-01-01' is not after 1970-01-01"),
    ],
)
def test_a_bad_expiry_is_refused_naming_the_field(op_root: Path, value: str, message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        step_from(Target(op_root), "user", {"name": "admin", "expires": value}, "")


def test_ssh_lockout_check_counts_a_locked_account_but_not_an_expired_one(op_root: Path) -> None:
    target = Target(op_root)
    ssh = get_op("ssh")
    subprocess.run(["useradd", "--prefix", op_root, "admin"], check=True)
    subprocess.run(["usermod", "--prefix", op_root, "--password", HASH, "admin"], check=True)
    assert apply(target, "user", {"name": "admin", "authorized_keys": [KEY], "expires": "2001-01-01"})[2] == []
    with pytest.raises(OpFailed, match="no account that may log in has an SSH key"):
        ssh.plan(target, validate(ssh.schema, {}))
    # Locked, not expired: sshd (UsePAM yes) still lets the key in, so passwords may go.
    assert apply(target, "user", {"name": "admin", "authorized_keys": [KEY], "locked": True})[2] == []
    assert shadow(op_root, "admin")[1].startswith("!$y$")
    assert ssh.plan(target, validate(ssh.schema, {})).actions
    assert effective_config(target)["usepam"] == "yes", "what the locked account's key login rests on"


# zsh


def test_zsh_becomes_the_login_shell_and_its_zshrc_loads(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "alice"})[2] == []
    plan, _, problems = apply(target, "zsh", {"users": ["alice"]})
    assert problems == [] and [c.subject for c in plan.changes] == ["user alice", "/home/alice/.zshrc"]
    assert passwd(op_root, "alice")[6] == "/usr/bin/zsh"
    zshrc = op_root / "home/alice/.zshrc"
    uid, gid = int(passwd(op_root, "alice")[2]), int(passwd(op_root, "alice")[3])
    assert zshrc.read_text().startswith(MARKER) and (zshrc.stat().st_uid, zshrc.stat().st_gid) == (uid, gid)
    assert "oh-my-zsh" not in zshrc.read_text()
    assert inside(op_root, "zsh", "-n", "/home/alice/.zshrc").returncode == 0
    # An interactive zsh of alice's own reads it without a complaint.
    login = inside(op_root, "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "env", "-i",
                   "HOME=/home/alice", "TERM=dumb", "/usr/bin/zsh", "-i", "-c",
                   'print -r -- "$HISTSIZE|$PROMPT"; bindkey "^A"')  # fmt: skip
    assert login.stderr == "", login.stderr
    assert login.stdout.startswith("50000|%F{green}%n@%m%f:%F{blue}%~%f") and "beginning-of-line" in login.stdout
    assert plan_of(target, "zsh", {"users": ["alice"]}).actions == ()
    # The user op, given no shell, leaves the one zsh set: the two ops do not undo each other.
    assert plan_of(target, "user", {"name": "alice"}).actions == ()
    assert plan_of(target, "user", {"name": "alice", "shell": "/bin/bash"}).actions != ()


def test_a_users_own_zshrc_is_kept_and_the_plan_says_so(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "bob"})[2] == []
    own = op_root / "home/bob/.zshrc"
    own.write_text("PROMPT='mine> '\n")
    plan, lines, problems = apply(target, "zsh", {"users": ["bob"]})
    assert problems == []
    assert ("/home/bob/.zshrc", "keep") in [(c.subject, c.action) for c in plan.changes]
    assert own.read_text() == "PROMPT='mine> '\n" and "left /home/bob/.zshrc as it is: the user's own" in lines
    assert plan_of(target, "zsh", {"users": ["bob"]}).actions == (), "what is kept is no change of its own"
    # One of ours is brought back to what the op writes.
    own.write_text(MARKER + "\nPROMPT='edited> '\n")
    assert apply(target, "zsh", {"users": ["bob"]})[2] == [] and "edited" not in own.read_text()


def test_zsh_is_added_to_etc_shells_where_it_is_missing(op_root: Path) -> None:
    target = Target(op_root)
    shells = op_root / "etc/shells"
    shells.write_text("".join(line + "\n" for line in shells.read_text().splitlines() if "zsh" not in line))
    assert apply(target, "user", {"name": "alice"})[2] == []
    assert apply(target, "zsh", {"users": ["alice"], "config": False})[2] == []
    assert "/usr/bin/zsh" in shells.read_text().splitlines() and not (op_root / "home/alice/.zshrc").exists()


def test_zsh_refuses_a_missing_user_and_a_missing_zsh(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "user", {"name": "alice"})[2] == []
    with pytest.raises(InvalidParams, match=r"^params\.users\[1\]: user 'nobody2' does not exist on the target"):
        plan_of(target, "zsh", {"users": ["alice", "nobody2"]})
    for path in ("usr/bin/zsh", "bin/zsh"):
        (op_root / path).unlink(missing_ok=True)
    with pytest.raises(OpFailed, match=r"zsh is not installed on the target: install it first \(op update"):
        plan_of(target, "zsh", {"users": ["alice"]})
    # A dry run's shadow, where an update step before this one only simulated installing zsh.
    planned = plan_of(Target(op_root, simulated=True), "zsh", {"users": ["alice"]})
    assert "usermod --prefix {root} --shell /usr/bin/zsh alice" in [c.detail for c in planned.changes]


def test_zsh_comes_after_user_and_update_in_a_pipeline(op_root: Path) -> None:
    steps = [{"op": "zsh", "params": {"users": ["alice"]}}, {"op": "user", "params": {"name": "alice"}}]
    with pytest.raises(InvalidParams, match=r"steps\[0\]\.op: zsh must come after user \(step 2\)"):
        parse_steps(Target(op_root), json.dumps(steps))
    # Submitted before the user exists: the account is looked for when the step is planned.
    parse_steps(Target(op_root), json.dumps(steps[::-1]))


# certs


def read_cert(root: Path, path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(at(root, path).read_bytes())


def forge(root: Path, not_before: datetime.datetime, not_after: datetime.datetime) -> None:
    """The host certificate replaced by one the tree's CA signs with the validity given."""
    ca_key = serialization.load_pem_private_key(at(root, CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    host = read_cert(root, HOST_CERT)
    public = read_cert(root, HOST_CERT).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    builder = x509.CertificateBuilder(host.issuer, host.subject, public, x509.random_serial_number(), not_before,
                                      not_after, list(host.extensions))  # fmt: skip
    at(root, HOST_CERT).write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_certs_issues_a_host_certificate_openssl_verifies_and_the_system_trusts(op_root: Path) -> None:
    target = Target(op_root)
    names = ["web-1.example.org", "web-1"]
    before = tree_digest(op_root)
    plan = plan_of(target, "certs", {"hostnames": names})
    assert tree_digest(op_root) == before, "planning makes no key"
    text = json.dumps(plan.as_json())
    assert "PRIVATE KEY" not in text and "create CA 'rastos-local-ca'" in text
    assert "issue host cert for web-1.example.org, web-1 valid until" in text
    _, _, problems = apply(target, "certs", {"hostnames": names})
    assert problems == []
    assert inside(op_root, "openssl", "verify", "-CAfile", CA_CERT, HOST_CERT).stdout.strip() == f"{HOST_CERT}: OK"
    # No -CAfile: the system's trust store, which update-ca-certificates gave the CA.
    assert inside(op_root, "openssl", "verify", HOST_CERT).stdout.strip() == f"{HOST_CERT}: OK"
    assert "DNS:web-1.example.org, DNS:web-1" in inside(op_root, "openssl", "x509", "-in", HOST_CERT, "-noout",
                                                       "-ext", "subjectAltName").stdout  # fmt: skip
    assert sans(read_cert(op_root, HOST_CERT)) == names
    modes = {path: at(op_root, path).stat().st_mode & 0o7777 for path in (CA_KEY, HOST_KEY, CA_CERT)}
    assert modes == {CA_KEY: 0o600, HOST_KEY: 0o600, CA_CERT: 0o644}, "no ssl-cert group in the tree: root's alone"
    not_after = read_cert(op_root, HOST_CERT).not_valid_after_utc
    assert abs(not_after - datetime.datetime.now(UTC) - datetime.timedelta(days=397)) < datetime.timedelta(minutes=5)
    assert plan_of(target, "certs", {"hostnames": names}).actions == ()


def test_the_host_key_goes_to_ssl_cert_where_that_group_exists(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "certs", {"trust": False})[2] == []
    subprocess.run(["groupadd", "--prefix", op_root, "--system", "ssl-cert"], check=True)
    plan, _, problems = apply(target, "certs", {"trust": False})
    assert problems == [] and [(c.subject, c.action) for c in plan.changes] == [(HOST_KEY, "set")]
    key = at(op_root, HOST_KEY).stat()
    gid = int(entry(op_root, "/etc/group", "ssl-cert")[2])
    assert (key.st_mode & 0o7777, key.st_uid, key.st_gid) == (0o640, 0, gid)


def test_the_host_name_is_the_default_and_names_changed_are_a_renewal(op_root: Path) -> None:
    target = Target(op_root)
    (op_root / "etc/hostname").write_text("box-7\n")
    assert apply(target, "certs", {})[2] == []
    assert sans(read_cert(op_root, HOST_CERT)) == ["box-7"]
    first_key = at(op_root, HOST_KEY).read_text()
    plan, _, problems = apply(target, "certs", {"hostnames": ["box-7", "box-7.lan"]})
    assert problems == [] and [c.action for c in plan.changes] == ["renew"]
    assert plan.changes[0].detail.startswith("renew: SANs changed (+box-7.lan)")
    assert sans(read_cert(op_root, HOST_CERT)) == ["box-7", "box-7.lan"]
    assert at(op_root, HOST_KEY).read_text() != first_key, "a renewal makes a new key"


def test_a_certificate_near_its_end_or_past_it_is_renewed(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "certs", {"days": 40, "trust": False})[2] == []
    # Valid 40 days, renewed when fewer than 45 are left: now.
    plan = plan_of(target, "certs", {"days": 60, "renew_before_days": 45, "trust": False})
    assert [c.detail.split(";")[0] for c in plan.changes] == ["renew: expires in 39 days (renew_before_days 45)"]
    now = datetime.datetime.now(UTC)
    forge(op_root, now - datetime.timedelta(days=20), now - datetime.timedelta(days=1))
    problems = get_op("certs").verify(target, validate(get_op("certs").schema, {"trust": False}))
    assert problems == [f"host certificate: expired on {now - datetime.timedelta(days=1):%Y-%m-%d}"]
    expired = inside(op_root, "openssl", "verify", "-CAfile", CA_CERT, HOST_CERT, check=False)
    assert "certificate has expired" in expired.stdout + expired.stderr, "openssl agrees"
    plan, _, problems = apply(target, "certs", {"days": 60, "trust": False})
    assert problems == [] and plan.changes[0].detail.startswith("renew: expired on")
    left = read_cert(op_root, HOST_CERT).not_valid_after_utc - now
    assert datetime.timedelta(days=59) < left < datetime.timedelta(days=61)


def test_a_certificate_another_ca_signed_is_replaced(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "certs", {"trust": False})[2] == []
    other_key, other_ca = make_ca("rastos-local-ca", datetime.datetime.now(UTC))  # same name, other key
    key, cert = issue(other_key, other_ca, ("vm",), datetime.datetime.now(UTC) + datetime.timedelta(days=300))
    at(op_root, HOST_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    at(op_root, HOST_KEY).write_bytes(key.private_bytes(serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    plan, _, problems = apply(target, "certs", {"trust": False})
    assert problems == [] and plan.changes[0].detail.startswith("renew: not issued by the CA rastos-local-ca")
    assert inside(op_root, "openssl", "verify", "-CAfile", CA_CERT, HOST_CERT).returncode == 0


def test_trust_off_and_a_renamed_ca_leave_no_former_ca_trusted(op_root: Path) -> None:
    target = Target(op_root)
    assert apply(target, "certs", {"ca_name": "first-ca"})[2] == []
    first = at(op_root, CA_CERT).read_text()
    plan, _, problems = apply(target, "certs", {"ca_name": "second-ca"})
    assert problems == [] and [c.action for c in plan.changes] == ["replace", "renew", "set"]
    assert "named 'first-ca', wants 'second-ca'" in plan.changes[0].detail
    assert sorted(p.name for p in at(op_root, TRUST_DIR).iterdir()) == ["second-ca.crt"]
    bundle = at(op_root, BUNDLE).read_text()
    assert first.strip() not in bundle and at(op_root, CA_CERT).read_text().strip() in bundle
    links = [link for link in at(op_root, "/etc/ssl/certs").iterdir() if link.is_symlink()]
    resolved = [resolve_in_target(target, f"/etc/ssl/certs/{link.name}") for link in links]
    dangling = [
        link.name for link, path in zip(links, resolved, strict=True) if not path or not at(op_root, path).exists()
    ]
    assert links and dangling == [], "the former CA's links went with it"
    assert apply(target, "certs", {"ca_name": "second-ca", "trust": False})[2] == []
    assert not list(at(op_root, TRUST_DIR).iterdir())
    untrusted = inside(op_root, "openssl", "verify", HOST_CERT, check=False)
    assert untrusted.returncode != 0, "the system no longer trusts the CA"


def test_renewing_before_days_is_refused_when_it_would_never_end(op_root: Path) -> None:
    with pytest.raises(InvalidParams, match=r"^params\.renew_before_days: must be less than days \(30\)"):
        step_from(Target(op_root), "certs", {"days": 30, "renew_before_days": 30}, "")


def test_compliance_flags_an_expiring_certificate_and_renews_it_keeping_its_names(op_root: Path) -> None:
    target = Target(op_root)
    found = {result.id: result for result in scan(target).results}
    assert found["certs-host-not-expiring"].status is Status.NOT_APPLICABLE
    assert apply(target, "certs", {"hostnames": ["db.example.org"], "ca_name": "site-ca"})[2] == []
    now = datetime.datetime.now(UTC)
    forge(op_root, now - datetime.timedelta(days=300), now + datetime.timedelta(days=10))
    report = scan(target)
    check = next(result for result in report.results if result.id == "certs-host-not-expiring")
    assert check.status is Status.FAIL and "in 9 days (wants 30 or more)" in check.finding
    steps = [step for step in pipeline(report.results, report.context) if step["op"] == "certs"]
    assert steps == [{"op": "certs", "params": {"trust": True, "hostnames": ["db.example.org"], "ca_name": "site-ca"}}]
    assert apply(target, "certs", steps[0]["params"])[2] == []
    after = next(result for result in scan(target).results if result.id == "certs-host-not-expiring")
    assert after.status is Status.PASS and sans(read_cert(op_root, HOST_CERT)) == ["db.example.org"]
