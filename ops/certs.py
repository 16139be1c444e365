"""`certs`: a local certificate authority, the host certificate it issues, and the system's trust in it.

The CA (an ECDSA P-256 key and a self-signed certificate valid ten years) lives in /etc/rastos/ca, its
key root's alone. The host's key and certificate go where Debian keeps its own pair (ssl-cert's
snakeoil): /etc/ssl/private/rastos-host.key and /etc/ssl/certs/rastos-host.crt, so services and their
AppArmor profiles find them where they look; the key is readable by the ssl-cert group where that
group exists (services in it read the key without root), otherwise by root alone. With `trust`, the CA
certificate goes to /usr/local/share/ca-certificates/rastos/ and the target's own
update-ca-certificates puts it in the system bundle, so the host's programs (curl, apt, Python)
accept what the CA issued; without it, that file is removed and the bundle made again.

Keys are made when the plan is applied, never when it is made: a plan writes nothing and holds no
key, only what will be made and why ("create CA", "SANs changed", "renew: expires in 12 days"). A
host certificate is issued again, with a new key, when it does not chain to the CA (a CA made anew),
its names differ from `hostnames`, or it expires within `renew_before_days`; the CA is made anew when
it is missing, unreadable, named otherwise, or would expire before a certificate issued now. While
none of that holds, the plan is empty. Services that read the host certificate are not reloaded by
this op: it does not know them.

With `hub_names` (the DNS names and IP addresses agents reach the hub by; an address becomes an
iPAddress entry, which is what a client that reaches the hub by address checks), the CA also issues
the fleet hub (rastos-hub) a certificate of its own, with its own key, where the hub's unit can read
them: /var/lib/rastos-hub/tls/hub.crt and hub.key, in its StateDirectory (made as systemd makes it,
0700), the hub's user's (units/hub/rastos-hub.sysusers), the key 0600. The CA's certificate goes
beside them as ca.crt, the file agents are given as `[hub] ca`. The hub's certificate is renewed as
the host's is, and a hub unit installed on the host is then reloaded (it reads its pair again on
SIGHUP). That directory is the hub's user's: it is reached as every file is, through ops/rootfs.py,
so a link the hub's user puts there is refused, never followed. Without `hub_names` the hub's files
are left as they are.

Whoever reads ca.key can issue a certificate for any name that this host (with `trust`) accepts; the
key is root's, and root can change the trust store anyway.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ops.actions import Action, Change, FollowUp, Output
from ops.base import Op, Plan, joined
from ops.errors import InvalidParams, OpFailed, UnsafePath
from ops.params import Kind, Param, Params
from ops.pki import (
    CA_DAYS,
    Pair,
    cert_pem,
    common_name,
    ip_address,
    issue,
    issued_by,
    key_pem,
    make_ca,
    parse_pair,
    pem_bodies,
    read_certificate,
    sans,
)
from ops.rootfs import Links
from ops.target import Target, in_target, lookup_user, read_colon_file
from rastos.errors import CommandError
from rastos.process import run

if TYPE_CHECKING:
    from cryptography import x509

CA_DIR = "/etc/rastos/ca"
CA_KEY = f"{CA_DIR}/ca.key"
CA_CERT = f"{CA_DIR}/ca.crt"
HOST_KEY = "/etc/ssl/private/rastos-host.key"
HOST_CERT = "/etc/ssl/certs/rastos-host.crt"
TRUST_DIR = "/usr/local/share/ca-certificates/rastos"  # ours alone: what else is in it is a former CA
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
UPDATE_CA = "/usr/sbin/update-ca-certificates"
LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME = rf"(\*\.)?{LABEL}(\.{LABEL})*"
CA_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
# A hub's names: a DNS name whose last label is not all digits (that would be an address), an IPv4
# address, or what may be an IPv6 one (ipaddress decides, in hub_names_problem).
OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
HUB_NAME = rf"(\*\.)?({LABEL}\.)*(?=[a-z0-9-]*[a-z]){LABEL}|{OCTET}(\.{OCTET}){{3}}|[0-9a-fA-F.]*:[0-9a-fA-F:.]*"
HUB_USER = "rastos-hub"  # units/hub/rastos-hub.sysusers
HUB_STATE = "/var/lib/rastos-hub"  # the hub unit's StateDirectory=, its user's home
HUB_DIR = f"{HUB_STATE}/tls"
HUB_KEY = f"{HUB_DIR}/hub.key"
HUB_CERT = f"{HUB_DIR}/hub.crt"
HUB_CA = f"{HUB_DIR}/ca.crt"  # what agents are given as [hub] ca
HUB_UNIT = "rastos-hub.service"
UNIT_DIRS = ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
RENEW_BEFORE_DAYS = 30  # the default, and what the compliance check wants left


def unique(value: list[str]) -> str | None:
    duplicates = sorted({name for name in value if value.count(name) > 1})
    return f"names {', '.join(duplicates)} more than once" if duplicates else None


def hub_names_problem(value: list[str]) -> str | None:
    for index, name in enumerate(value):
        if ":" in name and ip_address(name) is None:
            return f"[{index}] {name!r} is not an IPv6 address"
    return unique(normal_names(value))


def normal_names(names: list[str]) -> list[str]:
    """An address as `ip_address` writes it (2001:DB8:0::1 is 2001:db8::1), a DNS name as given."""
    return [ip_address(name) or name for name in names]


class CertsOp(Op):
    name = "certs"
    description = (
        "A local CA and a host certificate it issues (renewed before it expires), the CA trusted by the system;"
        " with hub_names, the fleet hub's certificate too"
    )
    after = ("hostname", "update")  # the names default to the host's; update-ca-certificates is a package's
    schema = (
        Param("ca_name", Kind.STRING, "the CA's name (its certificate's CN and its file in the trust store)",
              default="rastos-local-ca", pattern=CA_NAME,
              pattern_help="a letter or digit, then up to 63 letters, digits, _ or -"),
        Param("hostnames", Kind.STRING_LIST, "DNS names of the host certificate (default: /etc/hostname's)",
              default=[], pattern=DNS_NAME, max_length=253, check=unique,
              pattern_help="a lower-case DNS name, e.g. web-1.example.org or *.example.org"),
        Param("days", Kind.INTEGER, "how long a host certificate issued is valid", default=397, minimum=2,
              maximum=CA_DAYS // 2),
        Param("renew_before_days", Kind.INTEGER, "renew a host certificate that expires within this many days",
              default=RENEW_BEFORE_DAYS, minimum=0, maximum=365),
        Param("trust", Kind.BOOLEAN, "add the CA to the system's trust store (update-ca-certificates)",
              default=True),
        Param("hub_names", Kind.STRING_LIST,
              f"DNS names and IP addresses agents reach the hub by: with any, a certificate for rastos-hub in "
              f"{HUB_DIR} (hub.crt, hub.key, and the CA as ca.crt for the agents' [hub] ca)",
              default=[], pattern=HUB_NAME, max_length=253, max_items=64, check=hub_names_problem,
              pattern_help="a lower-case DNS name (hub.example.org) or an IP address (192.0.2.10, 2001:db8::10)"),
    )  # fmt: skip

    def check(self, target: Target, params: Params) -> None:
        if params["renew_before_days"] >= params["days"]:
            problem = f"must be less than days ({params['days']}): a certificate would be renewed as soon as issued"
            raise InvalidParams("params.renew_before_days", problem)
        if params["hub_names"] and HUB_USER not in {entry[0] for entry in read_colon_file(target, "/etc/passwd")}:
            problem = (f"the hub's user {HUB_USER} does not exist on the target: install "
                       "units/hub/rastos-hub.sysusers first (docs/hub.md, Production set-up)")  # fmt: skip
            raise InvalidParams("params.hub_names", problem)

    def plan(self, target: Target, params: Params) -> Plan:
        if params["trust"] and not target.has_program(UPDATE_CA):
            raise OpFailed(
                "update-ca-certificates is not on the target: install ca-certificates (op update) or trust false"
            )
        names = hostnames(target, params)
        now = datetime.datetime.now(datetime.UTC)
        ca = read_pair(target, CA_KEY, CA_CERT)
        actions: list[Action] = []
        ca_reason = ca_problem(ca, params, now)
        if ca_reason is not None:
            actions.append(CreateCa(params["ca_name"], ca_reason))
        host_reason = host_problem(target, ca, names, params, now)
        if ca_reason is not None and host_reason != "none yet":
            host_reason = "the CA is made anew"
        mode, group = host_key_mode(target)
        if host_reason is not None:
            actions.append(IssueHostCertificate(tuple(names), params["days"], mode, group, host_reason))
        elif (problem := mode_problem(target, mode, group)) is not None:
            actions.append(SetKeyMode(HOST_KEY, mode, group, problem))
        if params["hub_names"]:
            actions += hub_actions(target, ca, ca_reason, params, now)
        trust = "the new CA" if params["trust"] and ca_reason is not None else trust_problem(target, params)
        if trust is not None:
            actions.append(UpdateTrust(params["ca_name"], params["trust"], trust))
        return Plan(self.name, tuple(actions))

    def verify(self, target: Target, params: Params) -> list[str]:
        names = hostnames(target, params)
        now = datetime.datetime.now(datetime.UTC)
        ca = read_pair(target, CA_KEY, CA_CERT)
        problems = [f"CA: {problem}"] if (problem := ca_problem(ca, params, now)) else []
        if (problem := host_problem(target, ca, names, params, now)) is not None:
            problems.append(f"host certificate: {problem}")
        if (problem := mode_problem(target, *host_key_mode(target))) is not None:
            problems.append(f"{HOST_KEY}: {problem}")
        if (problem := trust_problem(target, params)) is not None:
            problems.append(f"trust store: {problem}")
        if params["hub_names"]:
            owed = [action.describe() for action in hub_actions(target, ca, None, params, now)
                    if not isinstance(action, FollowUp)]  # fmt: skip
            problems += [f"hub: {change.subject}: {change.detail}" for change in owed]
        return problems


# Facts


def read_pair(target: Target, key_path: str, cert_path: str) -> Pair:
    key_pem, cert_pem = target.files.read_bytes(key_path), target.files.read_bytes(cert_path)
    if key_pem is None or cert_pem is None:
        return Pair(None, None, "none yet")
    return parse_pair(key_pem, cert_pem, key_path, cert_path)


def hostnames(target: Target, params: Params) -> list[str]:
    if params["hostnames"]:
        return list(params["hostnames"])
    name = (target.read_text("/etc/hostname") or "").strip().lower()
    if not re.fullmatch(DNS_NAME, name):
        raise OpFailed(f"no hostnames given and /etc/hostname holds no DNS name ({name!r}): name them (hostnames)")
    return [name]


def ca_problem(ca: Pair, params: Params, now: datetime.datetime) -> str | None:
    """Why the CA must be made (anew), or None."""
    if ca.problem is not None or ca.cert is None:
        return ca.problem or "cannot be read"
    if (name := common_name(ca.cert)) != params["ca_name"]:
        return f"named {name!r}, wants {params['ca_name']!r}"
    if ca.cert.not_valid_after_utc < now + datetime.timedelta(days=params["days"]):
        return f"expires on {ca.cert.not_valid_after_utc:%Y-%m-%d}, before a certificate issued now would"
    return None


def host_problem(target: Target, ca: Pair, names: list[str], params: Params, now: datetime.datetime) -> str | None:
    """Why the host certificate must be issued (again), or None."""
    return leaf_problem(read_pair(target, HOST_KEY, HOST_CERT), ca, names, params, now)


def leaf_problem(host: Pair, ca: Pair, names: list[str], params: Params, now: datetime.datetime) -> str | None:
    """Why a certificate the CA issues (the host's, the hub's) must be issued (again), or None."""
    if host.problem is not None or host.cert is None:
        return host.problem or "cannot be read"
    if ca.cert is None or not issued_by(host.cert, ca.cert):
        return f"not issued by the CA {params['ca_name']}"
    have = sans(host.cert)
    if have != names:
        added, dropped = [n for n in names if n not in have], [n for n in have if n not in names]
        changes = [f"+{n}" for n in added] + [f"-{n}" for n in dropped] or ["order"]
        return f"SANs changed ({', '.join(changes)})"
    left = host.cert.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        return f"expired on {host.cert.not_valid_after_utc:%Y-%m-%d}"
    if left < datetime.timedelta(days=params["renew_before_days"]):
        return f"expires in {left.days} days (renew_before_days {params['renew_before_days']})"
    return None


def host_key_mode(target: Target) -> tuple[int, str]:
    """0640 root:ssl-cert where the group exists (Debian's convention for service keys), else 0600."""
    groups = {entry[0] for entry in read_colon_file(target, "/etc/group")}
    return (0o640, "ssl-cert") if "ssl-cert" in groups else (0o600, "root")


def mode_problem(target: Target, mode: int, group: str) -> str | None:
    status = target.files.lstat(HOST_KEY)
    if status is None:
        return None  # issued, not fixed
    gid = group_id(target, group)
    if status.st_mode & 0o7777 != mode or status.st_uid != 0 or status.st_gid != gid:
        return f"mode {status.st_mode & 0o7777:04o} {status.st_uid}:{status.st_gid}, wants {mode:04o} root:{group}"
    return None


def group_id(target: Target, group: str) -> int:
    for entry in read_colon_file(target, "/etc/group"):
        if entry[0] == group and len(entry) > 2:
            return int(entry[2])
    return 0


def hub_actions(
    target: Target, ca: Pair, ca_reason: str | None, params: Params, now: datetime.datetime
) -> list[Action]:
    """The hub's certificate issued (again) when it must be, its files given back to the hub's user,
    the CA's certificate put beside them, and a reload of the hub that reads them."""
    names = normal_names(params["hub_names"])
    reason = leaf_problem(read_pair(target, HUB_KEY, HUB_CERT), ca, names, params, now)
    if ca_reason is not None and reason != "none yet":
        reason = "the CA is made anew"
    actions: list[Action] = []
    if reason is not None:
        actions.append(IssueHubCertificate(tuple(names), params["days"], reason))
    else:
        actions += [SetHubOwner(path, mode, problem) for path, mode in ((HUB_KEY, 0o600), (HUB_CERT, 0o644))
                    if (problem := hub_owner_problem(target, path, mode)) is not None]  # fmt: skip
    if (problem := hub_ca_problem(target, ca_reason)) is not None:
        actions.append(WriteHubCa(problem))
    if reason is not None and hub_unit_installed(target):
        actions.append(FollowUp("try-reload-or-restart", HUB_UNIT))
    return actions


def hub_owner_problem(target: Target, path: str, mode: int) -> str | None:
    status = target.files.lstat(path)
    uid, gid = lookup_user(target, HUB_USER)
    if status is not None and (status.st_mode & 0o7777, status.st_uid, status.st_gid) != (mode, uid, gid):
        have = f"{status.st_mode & 0o7777:04o} {status.st_uid}:{status.st_gid}"
        return f"mode {have}, wants {mode:04o} {HUB_USER}:{HUB_USER} ({uid}:{gid})"
    return None


def hub_ca_problem(target: Target, ca_reason: str | None) -> str | None:
    have = target.read_text(HUB_CA)
    if have is None:
        return "none yet"
    if ca_reason is not None:
        return "the CA is made anew"
    if have != target.read_text(CA_CERT):
        return "not the CA's certificate"
    return hub_owner_problem(target, HUB_CA, 0o644)


def hub_unit_installed(target: Target) -> bool:
    """The hub's unit is on the host (a reload of one that is not would fail the step)."""
    return any(target.files.kind(f"{d}/{HUB_UNIT}", links=Links.SYSTEM) == "file" for d in UNIT_DIRS)


def trust_file(ca_name: str) -> str:
    return f"{TRUST_DIR}/{ca_name}.crt"


def trust_problem(target: Target, params: Params) -> str | None:
    """What the trust store lacks (with `trust`) or still holds (without), or None."""
    present = trusted_names(target)
    ca_pem = target.read_text(CA_CERT)
    if not params["trust"]:
        return f"holds {joined(present)}: to be removed" if present else None
    if ca_pem is None:
        return "no CA yet"
    if target.read_text(trust_file(params["ca_name"])) != ca_pem:
        return f"{trust_file(params['ca_name'])} is not the CA's certificate"
    if stale := [name for name in present if name != f"{params['ca_name']}.crt"]:
        return f"holds former CAs: {joined(stale)}"
    ours = pem_bodies(ca_pem)
    if not ours or ours[0] not in pem_bodies(target.read_text(BUNDLE) or ""):
        return f"{BUNDLE} lacks the CA"
    return None


# Actions: what is made is made when applied


def write(target: Target, path: str, content: str, mode: int, group: str = "root") -> None:
    target.files.write(path, content, mode, 0, group_id(target, group))


def trusted_names(target: Target) -> list[str]:
    return [name for name in target.files.names(TRUST_DIR) if name.endswith(".crt")]


@dataclass(frozen=True)
class CreateCa(Action):
    """A new CA key and self-signed certificate, made when applied."""

    ca_name: str
    reason: str

    def describe(self) -> Change:
        verb = "create" if self.reason == "none yet" else "replace"
        detail = (f"{verb} CA {self.ca_name!r} ({self.reason}): a new ECDSA P-256 key, made when applied, "
                  f"and a self-signed certificate valid {CA_DAYS} days")  # fmt: skip
        return Change(CA_CERT, verb, detail)

    def execute(self, target: Target, output: Output) -> None:
        key, cert = make_ca(self.ca_name, datetime.datetime.now(datetime.UTC))
        target.files.make_directory(CA_DIR, 0o700)
        write(target, CA_KEY, key_pem(key), 0o600)
        write(target, CA_CERT, cert_pem(cert), 0o644)
        output(f"created CA {self.ca_name!r}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (CA_KEY, CA_CERT)


@dataclass(frozen=True)
class IssueHostCertificate(Action):
    """A new host key and certificate, signed by the CA as it is when applied."""

    names: tuple[str, ...]
    days: int
    key_mode: int
    key_group: str
    reason: str

    def describe(self) -> Change:
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.days)
        what = f"issue host cert for {', '.join(self.names)} valid until {until:%Y-%m-%d}"
        if self.reason == "none yet":
            return Change(HOST_CERT, "create", f"{what}; a new key in {HOST_KEY}")
        return Change(HOST_CERT, "renew", f"renew: {self.reason}; {what}; a new key in {HOST_KEY}")

    def execute(self, target: Target, output: Output) -> None:
        ca = read_pair(target, CA_KEY, CA_CERT)
        if ca.key is None or ca.cert is None:
            raise OpFailed(f"the CA cannot sign: {CA_KEY} {ca.problem}")
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.days)
        key, cert = issue(ca.key, ca.cert, self.names, until)
        private = HOST_KEY.rsplit("/", 1)[0]
        if not target.is_dir(private):
            target.files.make_directory(private, 0o700)
        write(target, HOST_KEY, key_pem(key), self.key_mode, self.key_group)
        write(target, HOST_CERT, cert_pem(cert), 0o644)
        output(f"issued {HOST_CERT} for {', '.join(self.names)}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (HOST_KEY, HOST_CERT)


@dataclass(frozen=True)
class IssueHubCertificate(Action):
    """A new key and certificate for the hub, signed by the CA as it is when applied, the hub's user's."""

    names: tuple[str, ...]
    days: int
    reason: str

    def describe(self) -> Change:
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.days)
        what = f"issue hub cert for {', '.join(self.names)} valid until {until:%Y-%m-%d}; a new key in {HUB_KEY}"
        if self.reason == "none yet":
            return Change(HUB_CERT, "create", what)
        return Change(HUB_CERT, "renew", f"renew: {self.reason}; {what}")

    def execute(self, target: Target, output: Output) -> None:
        ca = read_pair(target, CA_KEY, CA_CERT)
        if ca.key is None or ca.cert is None:
            raise OpFailed(f"the CA cannot sign: {CA_KEY} {ca.problem}")
        uid, gid = lookup_user(target, HUB_USER)
        for directory in (HUB_STATE, HUB_DIR):  # as systemd makes a StateDirectory=: the unit's user's, 0700
            if not target.is_dir(directory):
                target.files.make_directory(directory, 0o700, uid, gid)
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=self.days)
        key, cert = issue(ca.key, ca.cert, self.names, until)
        target.files.write(HUB_KEY, key_pem(key), 0o600, uid, gid)
        target.files.write(HUB_CERT, cert_pem(cert), 0o644, uid, gid)
        output(f"issued {HUB_CERT} for {', '.join(self.names)}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (HUB_KEY, HUB_CERT)


@dataclass(frozen=True)
class WriteHubCa(Action):
    """The CA's certificate beside the hub's, as the CA is when applied: what agents verify the hub with."""

    reason: str

    def describe(self) -> Change:
        return Change(HUB_CA, "create" if self.reason == "none yet" else "set", f"the CA certificate ({self.reason})")

    def execute(self, target: Target, output: Output) -> None:
        uid, gid = lookup_user(target, HUB_USER)
        if not target.is_dir(HUB_DIR):
            raise OpFailed(f"{HUB_DIR} is missing: the hub's certificate was not issued")
        target.files.write(HUB_CA, target.read_text(CA_CERT) or "", 0o644, uid, gid)
        output(f"wrote {HUB_CA}, the CA agents verify the hub with ([hub] ca)")

    @property
    def paths(self) -> tuple[str, ...]:
        return (HUB_CA,)


@dataclass(frozen=True)
class SetHubOwner(Action):
    path: str
    mode: int
    reason: str

    def describe(self) -> Change:
        return Change(self.path, "set", self.reason)

    def execute(self, target: Target, output: Output) -> None:
        uid, gid = lookup_user(target, HUB_USER)
        target.files.set_owner_and_mode(self.path, self.mode, uid, gid)
        output(f"{self.path}: mode {self.mode:04o}, {HUB_USER}:{HUB_USER}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class SetKeyMode(Action):
    path: str
    mode: int
    group: str
    reason: str

    def describe(self) -> Change:
        return Change(self.path, "set", self.reason)

    def execute(self, target: Target, output: Output) -> None:
        target.files.set_owner_and_mode(self.path, self.mode, 0, group_id(target, self.group))
        output(f"{self.path}: mode {self.mode:04o}, root:{self.group}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclass(frozen=True)
class UpdateTrust(Action):
    """The CA's certificate put in the trust store (or every one of ours taken out), then the target's
    update-ca-certificates --fresh: a former CA's links and bundle entry go too."""

    ca_name: str
    trust: bool
    reason: str

    def describe(self) -> Change:
        if self.trust:
            return Change(
                trust_file(self.ca_name), "set", f"{self.reason}: the CA certificate, then update-ca-certificates"
            )
        return Change(TRUST_DIR, "remove", f"{self.reason}; then update-ca-certificates")

    def execute(self, target: Target, output: Output) -> None:
        for stale in trusted_names(target):
            if not self.trust or stale != f"{self.ca_name}.crt":
                target.files.remove(f"{TRUST_DIR}/{stale}")
        if self.trust:
            write(target, trust_file(self.ca_name), target.read_text(CA_CERT) or "", 0o644)
        try:
            run(in_target(target, [UPDATE_CA, "--fresh"]), capture=True)
        except CommandError as error:
            raise OpFailed(f"update-ca-certificates failed: {error}") from None
        output(f"{'added' if self.trust else 'removed'} CA {self.ca_name!r} in the system trust store")

    @property
    def paths(self) -> tuple[str, ...]:
        return (trust_file(self.ca_name), BUNDLE)


# What the compliance scan reads


def load_cert(target: Target, path: str) -> x509.Certificate | None:
    try:
        pem = target.files.read_bytes(path)
    except UnsafePath:
        return None
    return read_certificate(pem) if pem is not None else None


def current_params(target: Target) -> dict[str, Any]:
    """The params that keep the CA and the host certificate's names as they are, so a renewal made
    from a compliance remediation renames nothing: empty while there is no host certificate."""
    host, ca = load_cert(target, HOST_CERT), load_cert(target, CA_CERT)
    if host is None:
        return {}
    params: dict[str, Any] = {"trust": bool(trusted_names(target))}
    if names := [name for name in sans(host) if re.fullmatch(DNS_NAME, name)]:
        params["hostnames"] = names
    if ca is not None and re.fullmatch(CA_NAME, name := common_name(ca)):
        params["ca_name"] = name
    hub = load_cert(target, HUB_CERT)
    if hub is not None and (names := [name for name in sans(hub) if re.fullmatch(HUB_NAME, name)]):
        params["hub_names"] = names  # so a renewal of the host's renews the hub's too, for the same names
    return params
