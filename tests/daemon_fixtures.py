"""The real rastosd on a private dbus-daemon, with its root on a real btrfs filesystem on a loop file.

Nothing is mocked: the bus is a dbus-daemon with the system bus's policy and our policy file, the
daemon is `python -m daemon` with the test seams (--root, --state-dir, --bus-address), snapshots are
btrfs snapshots, and callers are real uids (an unprivileged user is created for the access tests).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
STRICT_POLICY = CHECKOUT / "units" / "org.rastos.Daemon1.conf"
PERMISSIVE_POLICY = DATA / "permissive-policy.conf"
BUS_NAME = "org.rastos.Daemon1"
ROOT_PATH = "/org/rastos/Daemon1"
MANAGER = "org.rastos.Daemon1.Manager"
SNAPSHOTS = "org.rastos.Daemon1.Snapshots"
JOB = "org.rastos.Daemon1.Job"
PLAIN_USER = "rastos-test-user"
ADMIN_USER = "rastos-test-admin"
ADMIN_GROUP = "rastos-test-admins"
USERS_LOCK = Path("/run/rastos-test-users.lock")  # held while test users and groups are made


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@contextlib.contextmanager
def logged_process(
    argv: list[str], log: Path, ready: str, what: str, timeout: float, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon started with its output in `log`, handed over once `log` holds `ready` (it says
    `what`, e.g. "sshd listening", when it does not), and stopped afterwards."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            assert process.poll() is None, f"{what.split()[0]} exited at start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:g} s:\n{log.read_text()}"
            time.sleep(0.02)
        yield process
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class PrivateBus:
    address: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def private_bus(policy: Path, *more: Path) -> Iterator[PrivateBus]:
    """A dbus-daemon with the system bus's policy plus `policy` (and `more`: another service's, such as
    polkitd's), on a socket any user can reach."""
    directory = Path(tempfile.mkdtemp(prefix="rastos-bus-", dir="/run"))
    directory.chmod(0o755)
    config = directory / "bus.conf"
    socket_path = directory / "system_bus_socket"
    template = (DATA / "system-bus.conf.in").read_text()
    includes = "\n  ".join(f"<include>{path}</include>" for path in (policy, *more))
    config.write_text(template.replace("@SOCKET@", str(socket_path)).replace("@INCLUDES@", includes))
    process = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert process.poll() is None, "dbus-daemon exited at start"
            assert time.monotonic() < deadline, "dbus-daemon did not create its socket"
            time.sleep(0.02)
        yield PrivateBus(f"unix:path={socket_path}", process)
    finally:
        process.terminate()
        process.wait(10)
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


@dataclass
class ScratchRoot:
    """A btrfs filesystem on a loop file: subvolume @ is the root, @snapshots holds snapshots."""

    top: Path
    esp: Path

    @property
    def root(self) -> Path:
        return self.top / "@"

    @property
    def snapshots(self) -> Path:
        return self.top / "@snapshots"


ETC_FILES = {
    "passwd": ("root:x:0:0:root:/root:/bin/bash\n", 0o644),
    "group": ("root:x:0:\nusers:x:100:\nsudo:x:27:\n", 0o644),
    "shadow": ("root:*:19000:0:99999:7:::\n", 0o640),
    "gshadow": ("root:*::\nusers:*::\nsudo:*::\n", 0o640),
    "hostname": ("rastos\n", 0o644),
    "hosts": ("127.0.0.1\tlocalhost\n127.0.1.1\trastos\n::1\tlocalhost ip6-localhost\n", 0o644),
}
ENTRY = (
    "title rastOS\nlinux /rastos/vmlinuz\ninitrd /rastos/initrd.img\noptions root=UUID=0 rootflags=subvol=@ rw quiet\n"
)


@contextlib.contextmanager
def scratch_root(directory: Path, size: str = "512M") -> Iterator[ScratchRoot]:
    image = directory / "btrfs.img"
    top = directory / "top"
    top.mkdir()
    subprocess.run(["truncate", "-s", size, image], check=True)
    subprocess.run(["mkfs.btrfs", "-q", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, top], check=True)
    try:
        for name in ("@", "@snapshots"):
            subprocess.run(["btrfs", "-q", "subvolume", "create", top / name], check=True)
        etc = top / "@" / "etc"
        etc.mkdir()
        for name, (content, mode) in ETC_FILES.items():
            (etc / name).write_text(content)
            (etc / name).chmod(mode)
        (etc / "login.defs").write_text(Path("/etc/login.defs").read_text())
        (top / "@" / "home").mkdir()
        esp = directory / "esp"
        (esp / "loader" / "entries").mkdir(parents=True)
        (esp / "loader" / "entries" / "rastos-0.conf").write_text(ENTRY)
        (esp / "loader" / "loader.conf").write_text("timeout 0\n")
        yield ScratchRoot(top, esp)
    finally:
        subprocess.run(["umount", "--lazy", top], check=False)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def small_esp(scratch: ScratchRoot, size: str = "256k") -> Iterator[ScratchRoot]:
    """The host with its ESP copied onto a small tmpfs: a real file system, which fills up."""
    esp = scratch.esp.with_name("small-esp")
    esp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", esp], check=True)
    try:
        shutil.copytree(scratch.esp, esp, dirs_exist_ok=True)
        yield ScratchRoot(scratch.top, esp)
    finally:
        subprocess.run(["umount", esp], check=True)


def config_in_root(scratch: ScratchRoot, extra: str = "") -> Path:
    """daemon.toml in the scratch root's /etc/rastos, with a setting and a comment of its own, naming a
    token file there too: what Hub.Join writes stays inside the root (on a host, both are in /etc/rastos)."""
    config = scratch.root / "etc/rastos/daemon.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    token_file = scratch.root / "etc/rastos/hub-token"
    config.write_text(f'# kept\n[snapshots]\nkeep_pairs = 7\n\n[hub]\ntoken_file = "{token_file}"\n{extra}')
    return config


def fill(directory: Path) -> Path:
    """A file that takes all the space left on `directory`'s file system."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def ensure_test_users() -> None:
    """An unprivileged user, and a member of the admin group the daemon is configured with. Under a
    lock: xdist workers starting their first daemon test together would both find the user missing,
    and the second useradd fail (or find /etc/passwd locked by the first)."""
    with USERS_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["getent", "group", ADMIN_GROUP], capture_output=True, check=False).returncode != 0:
            subprocess.run(["groupadd", "--system", ADMIN_GROUP], check=True)
        for user, groups in ((PLAIN_USER, []), (ADMIN_USER, [ADMIN_GROUP])):
            if subprocess.run(["id", user], capture_output=True, check=False).returncode != 0:
                extra = ["--groups", ",".join(groups)] if groups else []
                subprocess.run(["useradd", "--system", "--no-create-home", *extra, user], check=True)


Completed = subprocess.CompletedProcess[str]

# rastosctl as another user: imported as root, then every id dropped before it connects (the bus
# takes the caller's credentials at connect). The test's interpreter may be one only root can read
# (tox makes .tox 0700), so starting it as the user, with setpriv, would find no sdbus.
CTL_AS_USER = """
import os, pwd, sys
import daemon.ctl
from daemon.cli import ctl_main
user = pwd.getpwnam(sys.argv.pop(1))
os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
sys.exit(ctl_main())
"""


@dataclass
class Rastosd:
    bus: PrivateBus
    scratch: ScratchRoot
    state_dir: Path
    config: Path | None = None
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)  # e.g. ip netns exec NS: the daemon in a namespace

    def start(self, timeout: float = 30) -> None:
        """Start the daemon and wait for its READY=1 on a notify socket, as systemd would."""
        notify_path = self.state_dir.parent / f"notify-{len(self.logs)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify_path))
        listener.settimeout(timeout)
        self.launch({"NOTIFY_SOCKET": str(notify_path)})
        log = self.logs[-1]
        try:
            while True:
                message = listener.recv(4096).decode()
                if "READY=1" in message.split("\n"):
                    break
        except TimeoutError:
            self.stop()
            raise AssertionError(f"rastosd sent no READY=1 within {timeout}s:\n{log.read_text()}") from None
        finally:
            listener.close()
            notify_path.unlink()

    def launch(self, env: dict[str, str], bus_address: str | None = None) -> None:
        """The daemon's process started, its output in a log of its own; nothing waited for."""
        log = self.state_dir.parent / f"rastosd-{len(self.logs)}.log"
        self.logs.append(log)
        argv = [
            *self.wrapper, sys.executable, "-m", "daemon", "--root", str(self.scratch.root),
            "--snapshots-dir", str(self.scratch.snapshots), "--esp", str(self.scratch.esp),
            "--state-dir", str(self.state_dir), "--bus-address", bus_address or self.bus.address, "--debug",
        ]  # fmt: skip
        if self.config is not None:
            argv += ["--config", str(self.config)]
        argv += self.extra
        env = {**os.environ, **self.env, **env, "PYTHONPATH": str(CHECKOUT)}
        with log.open("w") as output:
            self.process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, text=True, env=env, cwd=CHECKOUT
            )

    def killed_at(self, point: str, timeout: float = 60) -> None:
        """Wait until the daemon stops at failpoint `point` (daemon/failpoints.py), then kill it there
        (SIGKILL: nothing it had not written survives, as in a power cut)."""
        deadline = time.monotonic() + timeout
        while f"rastos failpoint {point} reached" not in self.log_text():
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.1)
        assert self.stop(signal.SIGKILL) == -signal.SIGKILL

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        returncode = self.process.wait(30)
        self.process = None
        return returncode

    def log_text(self) -> str:
        return "\n".join(path.read_text() for path in self.logs)

    def busctl(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["busctl", f"--address={self.bus.address}", "--json=short", *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if check:
            assert result.returncode == 0, f"busctl {' '.join(args)} failed: {result.stderr}"
        return result

    def call(self, interface: str, method: str, signature: str = "", *args: str, path: str = ROOT_PATH) -> Any:
        """A method call through busctl; returns the reply's data (a list of its out arguments)."""
        result = self.busctl("call", BUS_NAME, path, interface, method, *([signature, *args] if signature else []))
        return json.loads(result.stdout)["data"] if result.stdout.strip() else None

    def call_error(self, interface: str, method: str, signature: str = "", *args: str, user: str | None = None) -> str:
        """A call that must fail; returns busctl's error text."""
        argv = ["call", BUS_NAME, ROOT_PATH, interface, method, *([signature, *args] if signature else [])]
        result = self.busctl(*argv, user=user, check=False)
        assert result.returncode != 0, f"{method} should have failed but returned {result.stdout}"
        return result.stderr.strip()

    def gdbus(
        self, interface: str, method: str, *args: str, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A call through gdbus, a second independent client: it prints the error name and message in
        full, where busctl shows only errno's text for AccessDenied. Arguments are GVariant text."""
        argv = ["gdbus", "call", "--address", self.bus.address, "--dest", BUS_NAME, "--object-path", ROOT_PATH,
                "--method", f"{interface}.{method}", *args]  # fmt: skip
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)

    def get(self, interface: str, name: str, path: str = ROOT_PATH) -> Any:
        return json.loads(self.busctl("get-property", BUS_NAME, path, interface, name).stdout)["data"]

    def ctl_argv(self, user: str | None = None) -> list[str]:
        """rastosctl on this daemon's bus (run it with the checkout as working directory or on PYTHONPATH)."""
        argv = [sys.executable, "-c", "import sys; from daemon.cli import ctl_main; sys.exit(ctl_main())"]
        if user is not None:
            argv = [sys.executable, "-c", CTL_AS_USER, user]
        return [*argv, "--bus-address", self.bus.address]

    def ctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ctl_argv(user), *args], capture_output=True, text=True, check=False, timeout=120, cwd=CHECKOUT
        )

    def wait_job(self, path: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state: str = self.get(JOB, "State", path)
            if state in ("done", "failed", "cancelled", "interrupted"):
                return state
            time.sleep(0.05)
        raise AssertionError(f"{path} did not end within {timeout}s")

    def job(self, job_id: int) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.call(MANAGER, "GetJob", "u", str(job_id))[0])
        return document


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[tuple[PrivateBus, ScratchRoot, Path]]:
    require_root()
    ensure_test_users()  # every daemon test may call as them, whichever runs first or alone
    with private_bus(STRICT_POLICY) as bus, scratch_root(tmp_path) as scratch:
        yield bus, scratch, tmp_path / "state"


@pytest.fixture
def rastosd(daemon_env: tuple[PrivateBus, ScratchRoot, Path]) -> Iterator[Rastosd]:
    bus, scratch, state_dir = daemon_env
    yield from _running(Rastosd(bus, scratch, state_dir))


@pytest.fixture
def configured_rastosd(daemon_env: tuple[PrivateBus, ScratchRoot, Path]) -> Iterator[Rastosd]:
    """rastosd whose daemon.toml (and the token file it names) is in its scratch root, so that what it
    writes to its own configuration lands there, as on a host."""
    bus, scratch, state_dir = daemon_env
    yield from _running(Rastosd(bus, scratch, state_dir, config=config_in_root(scratch)))


def _running(daemon: Rastosd) -> Iterator[Rastosd]:
    daemon.start()
    yield daemon
    if daemon.process is not None:
        assert daemon.stop() == 0, daemon.log_text()


def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """check()'s first true answer, asked every 0.1 s; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)
    return found
