"""The real hub (`rastos-hub serve` as its own process, on a SQLite file) and a UI client that follows
its state stream exactly as the web UI does: init, then deltas in version order, re-init on a gap."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import itertools
import json
import logging
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from alembic import command
from alembic.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from hub.store import MIGRATIONS, database_url
from ops import pki
from rastos.bundle import PARTS, Manifest, Parent, SigningKey, write_bundle

CHECKOUT = Path(__file__).resolve().parents[1]
HUB_CLI = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def postgresql_server() -> Iterator[str]:
    """A private PostgreSQL server (Debian's postgresql package) on a Unix socket, run as the user
    `postgres` in a scratch directory; yields its SQLAlchemy URL. Stopped and removed afterwards."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (./setup-host installs it)")
    bin_dir = binaries[-1].parent
    directory = Path(tempfile.mkdtemp(prefix="rastos-pg-"))
    shutil.chown(directory, "postgres", "postgres")
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    data, port = directory / "data", free_port()
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)  # fmt: skip
    server = subprocess.Popen(
        [*as_postgres, str(bin_dir / "postgres"), "-D", str(data), "-k", str(directory), "-p", str(port),
         "-c", "listen_addresses=", "-c", "fsync=on"],
        stdout=subprocess.DEVNULL, stderr=(directory / "server.log").open("w"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(bin_dir / "pg_isready"), "-h", str(directory), "-p", str(port)],
                             capture_output=True, check=False).returncode != 0:  # fmt: skip
            assert server.poll() is None and time.monotonic() < deadline, (directory / "server.log").read_text()
            time.sleep(0.1)
        yield f"postgresql://postgres@/postgres?host={directory}&port={port}"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


DATABASES = itertools.count()


def new_database(server: str) -> str:
    """A new database on the PostgreSQL server at `server` (as postgresql_server yields it); its URL."""
    name = f"hub_{next(DATABASES)}"
    engine = create_engine(server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return server.replace("/postgres?", f"/{name}?")


def call_main(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`rastos-hub ARGV` run by rastos-hub's main() in this process: for a command whose own process is
    not what a test checks, without the 0.6 s (2 s on a busy machine) a new interpreter takes to start
    and import the hub. Its exit status, stdout and stderr as a process of its own gives them; what
    main() logs goes to pytest's log capture, not to stderr (a root handler stands in, so main's
    basicConfig adds none). In a thread of its own: main() may call asyncio.run, which a thread whose
    event loop runs (sync Playwright's) refuses."""
    from hub.cli import main

    stdout, stderr, root = io.StringIO(), io.StringIO(), logging.getLogger()

    def command() -> int:
        try:
            return main(argv)
        except SystemExit as stopped:  # argparse's usage errors
            return stopped.code if isinstance(stopped.code, int) else 1

    stand_in = logging.NullHandler()
    root.addHandler(stand_in)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), ThreadPoolExecutor(1) as pool:
            code = pool.submit(command).result(timeout=60)
    finally:
        root.removeHandler(stand_in)
    return subprocess.CompletedProcess(["rastos-hub", *argv], code, stdout.getvalue(), stderr.getvalue())


@dataclass(frozen=True)
class Pki:
    """A CA, and a certificate and key it issued for the hub (as the certs op makes them: ops/pki.py),
    as PEM files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path, names: tuple[str, ...] = ("localhost",), expired: bool = False) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key, ca_cert = pki.make_ca(f"ca-{directory.name}", now)
        key, cert = pki.issue(ca_key, ca_cert, names, now + datetime.timedelta(days=30))
        if expired:  # the same certificate, from ten days ago to yesterday
            cert = _expired(ca_key, cert)
        found = cls(directory / "ca.crt", directory / "hub.crt", directory / "hub.key")
        found.ca.write_text(pki.cert_pem(ca_cert))
        found.cert.write_text(pki.cert_pem(cert))
        found.key.write_text(pki.key_pem(key))
        return found

    def client(self) -> ssl.SSLContext:
        """What a client that trusts this CA verifies the hub with."""
        return ssl.create_default_context(cafile=str(self.ca))


def _expired(ca_key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(ca_key, hashes.SHA256())


@dataclass
class Hub:
    directory: Path
    port: int = field(default_factory=free_port)
    database_url: str | None = None  # default: SQLite in `directory`
    process: subprocess.Popen[str] | None = None
    admin_token: str = ""
    starts: int = 0
    open_files: int | None = None  # the hub's open-file limit, soft and hard (None: this process's)
    global_options: list[str] = field(default_factory=list)  # more options of every `rastos-hub` command
    serve_options: list[str] = field(default_factory=list)  # more options of `rastos-hub serve`
    tls: Pki | None = None  # serve HTTPS with its certificate, reached as localhost (the name it is for)
    client: ssl.SSLContext | None = None  # what the tests' own requests verify it with; default: its CA

    @property
    def database(self) -> str:
        return self.database_url or str(self.directory / "hub.db")

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}" if self.tls else f"http://127.0.0.1:{self.port}"

    @property
    def agent_url(self) -> str:
        return f"wss://localhost:{self.port}/api/v1/agent" if self.tls else f"ws://127.0.0.1:{self.port}/api/v1/agent"

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self.client or (self.tls.client() if self.tls else None)

    @property
    def log(self) -> Path:
        return self.directory / "hub.log"

    @property
    def options(self) -> list[str]:
        """The options every command of this hub's CLI takes: its database, its data directory, and more."""
        return ["--database", self.database, "--data-dir", str(self.directory), *self.global_options]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HUB_CLI, *self.options, *args],
            capture_output=True, text=True, check=False, timeout=60, cwd=CHECKOUT,
        )  # fmt: skip

    def call(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The same command as `cli`, run by rastos-hub's main() in this process (`call_main`)."""
        return call_main([*self.options, *args])

    def start(self, timeout: float = 30) -> None:
        self.starts += 1
        tls = ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)] if self.tls else []
        with self.log.open("a") as output:
            self.process = subprocess.Popen(
                [*HUB_CLI, *self.options, "serve", "--listen", f"127.0.0.1:{self.port}", "--sync-interval", "0.5",
                 *tls, *self.serve_options],
                stdout=output, stderr=subprocess.STDOUT, text=True, cwd=CHECKOUT, preexec_fn=self._limits,
            )  # fmt: skip
        # Whether it answers, not whom it is: a hub serving an expired certificate has started too.
        unverified = None
        if self.tls:
            unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"rastos-hub exited at start:\n{self.log.read_text()}"
            try:
                urllib.request.urlopen(f"{self.url}/api/v1/openapi.json", timeout=2, context=unverified).close()
                return
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"rastos-hub did not answer:\n{self.log.read_text()}"
                time.sleep(0.1)

    def _limits(self) -> None:
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def memory(self) -> dict[str, int]:
        """The hub process's resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status)
        return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        code = self.process.wait(30)
        self.process = None
        return code

    def request(
        self, method: str, path: str, body: object = None, token: str | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        token = self.admin_token if token is None else token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.client_tls) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as error:
            text = error.read().decode()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text

    def api(self, method: str, path: str, body: object = None) -> Any:
        status, document = self.request(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {document}"
        return document

    def state(self) -> dict[str, Any]:
        document: dict[str, Any] = self.api("GET", "/api/v1/state")["state"]
        return document

    def wait_state(self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"hub state never showed {what}:\n{json.dumps(state, indent=1)[:6000]}")
            time.sleep(0.1)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from _serving(Hub(tmp_path / "hub"))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    """The hub on each database it supports: the same schema and behaviour on both (PostgreSQL in a new
    database of the session's server)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgresql_database")
    yield from _serving(Hub(tmp_path / "hub", database_url=url))


def made(server: Hub) -> Hub:
    """The hub's directory and database, with its first admin, alice (her token in `admin_token`); not
    started."""
    server.directory.mkdir()
    created = server.call("admin", "add", "alice")
    assert created.returncode == 0, created.stderr
    server.admin_token = created.stdout.strip().splitlines()[-1]
    return server


def _serving(server: Hub) -> Iterator[Hub]:
    made(server).start()
    yield server
    if server.process is not None:
        assert server.stop() == 0, server.log.read_text()


@contextlib.contextmanager
def shared_hubs(cluster: str, directory: Path) -> Iterator[tuple[Hub, Hub]]:
    """Two `rastos-hub serve` processes on one PostgreSQL database, a new one on `cluster` (a server
    as postgresql_server yields it): one admin, whose token both take."""
    name = f"hub_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    url = make_url(cluster).set(database=name).render_as_string(hide_password=False)
    first, second = Hub(directory / "a", database_url=url), Hub(directory / "b", database_url=url)
    for each in (first, second):
        each.directory.mkdir(parents=True)
    created = first.cli("admin", "add", "alice")
    assert created.returncode == 0, created.stderr
    first.admin_token = second.admin_token = created.stdout.strip().splitlines()[-1]
    first.start()
    second.start()
    try:
        yield first, second
    finally:
        for each in (first, second):
            if each.process is not None:
                assert each.stop() == 0, each.log.read_text()


class UiClient:
    """Follows /api/v1/stream like the web UI: state from init, deltas applied in version order."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.state: dict[str, Any] = {}
        self.version = -1
        self.epoch = ""
        self.inits = 0
        self.gaps = 0
        self.drop_deltas = 0  # deltas to lose on purpose, as a flaky network would
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._requests: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> UiClient:
        self._session = aiohttp.ClientSession()
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        assert self._session is not None
        await self._session.close()

    async def connect(self) -> None:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.hub.admin_token}"}
        self._socket = await self._session.ws_connect(f"{self.hub.url}/api/v1/stream", headers=headers)
        await self.receive()  # the init
        assert self.inits >= 1

    async def receive(self, timeout: float = 10) -> dict[str, Any]:
        assert self._socket is not None
        message: dict[str, Any] = await self._socket.receive_json(timeout=timeout)
        self.apply(message)
        return message

    def apply(self, message: dict[str, Any]) -> None:
        if message["type"] == "delta" and self.drop_deltas > 0:
            self.drop_deltas -= 1
            return
        if message["type"] == "init":
            self.state, self.version, self.epoch = message["state"], message["version"], message["epoch"]
            self.inits += 1
        elif message["epoch"] != self.epoch or message["version"] > self.version + (message["type"] == "delta"):
            self.gaps += 1  # missed something: ask for the whole state, as the web UI does
            assert self._socket is not None
            request = asyncio.ensure_future(self._socket.send_json({"type": "get_state"}))
            self._requests.add(request)
            request.add_done_callback(self._requests.discard)
        elif message["type"] == "delta" and message["version"] == self.version + 1:
            self.version = message["version"]
            change = message["change"]
            kind = change["kind"]
            if kind == "host":
                self.state["hosts"][change["host"]["name"]] = change["host"]
            elif kind == "host_removed":
                self.state["hosts"].pop(change["name"], None)
            elif kind == "run":
                self.state["runs"][change["run"]["id"]] = change["run"]
            elif kind == "run_removed":
                self.state["runs"].pop(change["id"], None)
            elif kind == "event":
                self.state["events"].append(change["event"])
            elif kind == "image":
                self.state["images"][change["image"]["id"]] = change["image"]
            elif kind == "image_removed":
                self.state["images"].pop(change["id"], None)
            elif kind == "rollout":
                self.state["rollouts"][change["rollout"]["id"]] = change["rollout"]
            elif kind == "rollout_removed":
                self.state["rollouts"].pop(change["id"], None)

    async def assert_converged(self, timeout: float = 30) -> None:
        """The UI's state equals the hub's at the same version (the hub may move on meanwhile: retry)."""
        deadline = time.monotonic() + timeout
        while True:
            truth = await asyncio.to_thread(self.hub.api, "GET", "/api/v1/state")
            while self.version < truth["version"] and time.monotonic() < deadline:
                await self.receive(timeout=max(0.1, deadline - time.monotonic()))
            if self.version == truth["version"]:
                assert self.state == truth["state"], "the UI's state differs from the hub's at the same version"
                return
            assert time.monotonic() < deadline, "the UI never caught up with the hub's version"

    async def until(self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.state):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the UI never showed {what}:\n{json.dumps(self.state, indent=1)[:6000]}")
            with contextlib.suppress(TimeoutError):
                await self.receive(timeout=left)


# Update bundles, small but complete, and their upload


async def the_close(
    socket: aiohttp.ClientWebSocketResponse, timeout: float, passing: tuple[str, ...] | None = None
) -> aiohttp.WSMessage:
    """The first message on `socket` that is not text (nor a ping or a pong): the hub's close, where a
    test expects one. Text before it is what the hub had on its way already (a periodic sync, a delta);
    with `passing`, each must be of one of those types."""
    while (message := await socket.receive(timeout=timeout)).type in (
        aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG
    ):  # fmt: skip
        if passing is not None and message.type == aiohttp.WSMsgType.TEXT:
            assert json.loads(message.data)["type"] in passing, message.data
    return message


def make_bundle(directory: Path, key_file: Path, version: str, parent: str | None = None) -> Path:
    """A small but complete bundle of profile `minimal` (parts of a few kilobytes each)."""
    parts = {}
    for name in PARTS:
        parts[name] = directory / f"{version}-{parent}.{name}"
        parts[name].write_bytes(f"{name} of {version} from {parent}\n".encode() * 200)
    identity = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rastos/{version}"))
    manifest = Manifest(
        profile="minimal", version=version, built_at="2025-06-01T12:00:00Z", rastos_version="0.1",
        kernel_version="6.12.0", subvolume_name=f"minimal-{version}", subvolume_uuid=identity,
        parent=None if parent is None else Parent(parent, str(uuid.uuid5(uuid.NAMESPACE_URL, f"rastos/{parent}"))),
        packages=(("bash", "5.2.37-1"), ("linux-image", "6.12.0")),
    )  # fmt: skip
    name = f"rastos-minimal-{version}" + (f"-from-{parent}" if parent else "") + ".rbundle"
    write_bundle(directory / name, manifest, SigningKey.load(key_file), parts)
    return directory / name


def upload(hub: Hub, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, Any]:
    request = urllib.request.Request(f"{hub.url}/api/v1/images", data=data, method="POST")
    request.add_header("Content-Type", content_type)
    request.add_header("Authorization", f"Bearer {hub.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=60, context=hub.client_tls) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def scratch_database(backend: str, folder: Path, request: pytest.FixtureRequest) -> str:
    """A database for a hub to make: SQLite in `folder`, or a new database of the session's PostgreSQL
    server. What `--database` takes."""
    return str(folder / "hub.db") if backend == "sqlite" else str(request.getfixturevalue("postgresql_database"))


@contextlib.contextmanager
def database_at(
    revision: str, backend: str, folder: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Engine]]:
    """A hub database migrated only to `revision` (SQLite in `folder`, or a new PostgreSQL database):
    a test fills it as a hub of that age left it, then migrates it on. Its URL and an engine."""
    with contextlib.ExitStack() as stack:
        url = database_url(scratch_database(backend, folder, request))
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        stack.callback(engine.dispose)
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        yield url, engine
