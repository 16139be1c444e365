"""Booting images in QEMU: firmware, accelerator choice, and a supervised VM for tests and --wait.

KVM is used when it really works. `/dev/kvm` can exist and still fail (nested virtualisation that
cannot run OVMF's flash code: "KVM internal error"), so a short probe boots the firmware under KVM
once per host boot and QEMU version, and falls back to TCG when it fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from rastos.errors import RastosError
from rastos.process import run, start

log = logging.getLogger("rastos.vm")

QEMU = "qemu-system-x86_64"
FIRMWARE_PAIRS = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
STATUS_PORT = "org.rastos.status"
KVM_PROBE_SECONDS = 2.0
POWER_BUTTON_REPEAT = 15.0
PROBE_CACHE = Path("/run/rastos")


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path


def find_firmware() -> Firmware:
    for code, template in FIRMWARE_PAIRS:
        if code.is_file() and template.is_file():
            return Firmware(code, template)
    raise RastosError("no OVMF UEFI firmware found in /usr/share/OVMF", hint="install the Debian package 'ovmf'")


def qemu_version() -> str:
    return run([QEMU, "--version"], capture=True).stdout.splitlines()[0]


def kvm_works(firmware: Firmware) -> bool:
    """Whether KVM can run this firmware here. The answer is kept until the host reboots."""
    if not Path("/dev/kvm").exists():
        return False
    key = hashlib.sha256(f"{qemu_version()}|{firmware.code}".encode()).hexdigest()[:16]
    cached = PROBE_CACHE / f"kvm-probe-{key}"
    if cached.is_file():
        return cached.read_text().strip() == "works"
    works = _probe_kvm(firmware)
    with contextlib.suppress(OSError):
        PROBE_CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text("works\n" if works else "fails\n")
    log.info("KVM probe: %s", "works" if works else "fails, using TCG")
    return works


def _probe_kvm(firmware: Firmware) -> bool:
    with tempfile.TemporaryDirectory(prefix="rastos-kvm-probe-") as tmp:
        vars_file = Path(tmp) / "vars.fd"
        shutil.copyfile(firmware.vars_template, vars_file)
        argv = [
            QEMU, *MACHINE, "-accel", "kvm", "-m", "256", "-nodefaults",
            "-display", "none", "-serial", "none", "-monitor", "none",
            *firmware_args(firmware, vars_file),
        ]  # fmt: skip
        proc = start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=KVM_PROBE_SECONDS)
            return False  # QEMU must not exit by itself: it failed to start under KVM
        except subprocess.TimeoutExpired:
            pass
        finally:
            proc.kill()
            _, stderr = proc.communicate()
        return b"KVM internal error" not in stderr and b"emulation failure" not in stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_format(image: Path) -> str:
    return "qcow2" if image.suffix == ".qcow2" else "raw"


def efivars_path(image: Path) -> Path:
    """Each image keeps its own UEFI variables (boot counting, one-shot entries) beside it."""
    return image.with_name(image.name + ".efivars")


CPUS_VARIABLE = "RASTOS_VM_CPUS"


def default_cpus() -> int:
    """Two vCPUs, or $RASTOS_VM_CPUS: where several VMs share a few cores under TCG (the boot tests on
    two workers), one vCPU each boots faster than two, whose threads preempt each other and a vCPU
    holding a guest spinlock."""
    text = os.environ.get(CPUS_VARIABLE, "2")
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 1 <= int(text) <= 64:
        raise RastosError(f"${CPUS_VARIABLE} is {text!r}, not a number of vCPUs from 1 to 64")
    return int(text)


DEFAULT_MEMORY = "1G"


@dataclass
class VmOptions:
    image: Path
    accel: str = "auto"  # auto, kvm or tcg
    memory: str = DEFAULT_MEMORY
    cpus: int = field(default_factory=default_cpus)
    snapshot: bool = False  # leave the image (and its UEFI variables) unchanged
    ssh_port: int = field(default_factory=free_port)
    # systemd credentials for the guest (NAME -> value), e.g. rastos.hub.token: how one image is given
    # per-host secrets at boot, without baking them in (systemd imports SMBIOS type 11 strings).
    credentials: tuple[tuple[str, str], ...] = ()
    forwards: tuple[tuple[int, int], ...] = ()  # (host port, guest port) beside ssh's, on 127.0.0.1


def choose_accel(requested: str, firmware: Firmware) -> str:
    if requested == "auto":
        return "kvm" if kvm_works(firmware) else "tcg"
    if requested not in ("kvm", "tcg"):
        raise RastosError(f"unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    return requested


MACHINE = ["-machine", "q35,smm=off,vmport=off"]


def accelerator_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # Multi-threaded TCG with a larger translation cache: the two biggest wins under emulation. A
    # Nehalem (x86-64-v2: SSE4.2, POPCNT; no AVX) rather than `max`: emulated, the wide vector and
    # newer features cost more than they save, and the firmware, the kernel and the boot's first call
    # to rastosd came 0.5-2 s sooner in each of seven paired boots here.
    return ["-accel", "tcg,thread=multi,tb-size=512", "-cpu", "Nehalem"]


def firmware_args(firmware: Firmware, vars_file: Path) -> list[str]:
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
    ]  # fmt: skip


def machine_args(*, accel: str, cpus: int, memory: str, firmware: Firmware, vars_file: Path) -> list[str]:
    """The emulated machine, without its disk and devices: one description for rastOS's VMs and the
    benchmarks' baselines (OVMF alone, mkosi's image), so what they compare runs on the same machine."""
    return [
        *MACHINE, *accelerator_args(accel), "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none",
        *firmware_args(firmware, vars_file),
    ]  # fmt: skip


def qemu_argv(
    options: VmOptions,
    *,
    accel: str,
    firmware: Firmware,
    vars_file: Path,
    qmp_socket: Path,
    status_socket: Path,
    console: list[str],
) -> list[str]:
    if not options.image.is_file():
        raise RastosError(f"image {options.image} does not exist")
    drive = f"if=none,id=root,file={options.image},format={image_format(options.image)},discard=unmap"
    if options.snapshot:
        drive += ",snapshot=on"
    return [
        QEMU,
        "-name", "rastos,process=rastos-vm",
        *machine_args(accel=accel, cpus=options.cpus, memory=options.memory, firmware=firmware, vars_file=vars_file),
        "-drive", drive,
        "-device", "virtio-blk-pci,drive=root,bootindex=0",
        "-netdev", "user,id=net0," + ",".join(
            f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in ((options.ssh_port, 22), *options.forwards)
        ),
        # No option ROM: OVMF would otherwise load iPXE and offer network boot first.
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        # A hardware watchdog, as servers have: systemd (RuntimeWatchdogSec) keeps it fed; a guest
        # that hangs hard is reset, so a trial boot that hangs uses up its tries too.
        "-device", "i6300esb", "-action", "watchdog=reset",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=status,path={status_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=status,name={STATUS_PORT}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        *credential_args(options.credentials),
        *console,
    ]  # fmt: skip


def parse_forward(text: str) -> tuple[int, int]:
    """HOSTPORT:GUESTPORT from the command line."""
    host, separator, guest = text.partition(":")
    if not separator or not host.isdigit() or not guest.isdigit() or not all(0 < int(p) < 65536 for p in (host, guest)):
        raise RastosError(f"--forward {text!r}: write HOSTPORT:GUESTPORT, two ports from 1 to 65535")
    return int(host), int(guest)


CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


def parse_credential(text: str) -> tuple[str, str]:
    """NAME=VALUE from the command line, with the name checked as systemd checks it."""
    name, separator, value = text.partition("=")
    if not separator or not CREDENTIAL_NAME.match(name):
        raise RastosError(f"--credential: expected NAME=VALUE with a name of letters, digits, '_.-', got {text!r}")
    return name, value


def credential_args(credentials: tuple[tuple[str, str], ...]) -> list[str]:
    # The binary form carries the value in base64: no comma in it can end QEMU's option early.
    args = []
    for name, value in credentials:
        encoded = base64.b64encode(value.encode()).decode()
        args += ["-smbios", f"type=11,value=io.systemd.credential.binary:{name}={encoded}"]
    return args


def prepare_vars(options: VmOptions, firmware: Firmware, scratch: Path) -> Path:
    if options.snapshot:
        vars_file = scratch / "efivars.fd"
        source = efivars_path(options.image)
        shutil.copyfile(source if source.is_file() else firmware.vars_template, vars_file)
        return vars_file
    vars_file = efivars_path(options.image)
    if not vars_file.is_file():
        shutil.copyfile(firmware.vars_template, vars_file)
    return vars_file


class VirtualMachine:
    """A QEMU guest driven through QMP, with its console in a file and its boot report on a socket."""

    def __init__(self, options: VmOptions, scratch: Path, console_log: Path) -> None:
        self.options = options
        self.scratch = scratch
        self.console_log = console_log
        self.qmp_socket = scratch / "qmp.sock"
        self.status_socket = scratch / "status.sock"
        self.firmware = find_firmware()
        self.accel = choose_accel(options.accel, self.firmware)
        self.vars_file = prepare_vars(options, self.firmware, scratch)
        self.process: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("rastos-vm")
        self.started_at = 0.0
        self._status: asyncio.StreamReader | None = None
        self._status_writer: asyncio.StreamWriter | None = None

    def argv(self) -> list[str]:
        console = ["-chardev", f"file,id=console,path={self.console_log}", "-serial", "chardev:console"]
        return qemu_argv(
            self.options,
            accel=self.accel,
            firmware=self.firmware,
            vars_file=self.vars_file,
            qmp_socket=self.qmp_socket,
            status_socket=self.status_socket,
            console=console,
        )

    async def start(self) -> None:
        argv = self.argv()
        log.debug("+ %s &", " ".join(argv))
        self.started_at = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise RastosError(f"{QEMU} was not found", hint="install the Debian package 'qemu-system-x86'") from None
        await self._wait_for_socket(self.qmp_socket)
        await self.qmp.connect(str(self.qmp_socket))
        self._status, self._status_writer = await asyncio.open_unix_connection(str(self.status_socket))

    async def _wait_for_socket(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            await self._check_alive()
            if time.monotonic() > deadline:
                raise RastosError(f"QEMU did not create {path} within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.returncode is not None:
            stderr = await self.process.stderr.read() if self.process.stderr else b""
            raise RastosError(
                f"QEMU exited with status {self.process.returncode}: {stderr.decode(errors='replace').strip()}"
            )

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The guest's boot report: waits until the guest has finished booting and sent it."""
        assert self._status is not None and self.process is not None
        line_task = asyncio.ensure_future(self._status.readline())
        exit_task = asyncio.ensure_future(self.process.wait())
        done, _ = await asyncio.wait({line_task, exit_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if line_task in done and line_task.result():
            exit_task.cancel()
            report: dict[str, Any] = json.loads(line_task.result())
            to_report = time.monotonic() - self.started_at
            report["host_seconds_to_ready"] = round(to_report, 2)
            # QEMU start to the kernel's start: the wall time to the report less the guest's uptime.
            to_kernel = to_report - report.get("sent_usec", 0) / 1e6
            report["host_seconds_to_kernel"] = round(to_kernel, 2)
            multi_user = report.get("timestamps", {}).get("multi_user_usec", 0)
            report["host_seconds_to_multi_user"] = round(to_kernel + multi_user / 1e6, 2) if multi_user else None
            # QEMU start to rastosd's answer to the boot's first call to it, which is what a user waits for.
            answered = report.get("daemon", {}).get("first_answer_usec", 0)
            report["host_seconds_to_daemon"] = round(to_kernel + answered / 1e6, 2) if answered else None
            return report
        line_task.cancel()
        exit_task.cancel()
        tail = self.console_tail()
        if line_task in done:
            raise RastosError(f"the boot report channel closed before a report arrived; console:\n{tail}")
        if exit_task in done:
            raise RastosError(f"the VM stopped before it finished booting; console:\n{tail}")
        raise RastosError(f"the VM did not finish booting within {timeout:.0f}s; console:\n{tail}")

    async def diagnostics(self, timeout: float = 120) -> dict[str, Any]:
        """The second line of the boot report: slowest units, critical chain, journal if unhealthy."""
        assert self._status is not None
        try:
            line = await asyncio.wait_for(self._status.readline(), timeout)
        except TimeoutError:
            raise RastosError(f"the guest sent no boot diagnostics within {timeout:.0f}s") from None
        result: dict[str, Any] = json.loads(line)
        return result

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    async def powerdown(self, timeout: float = 120) -> int:
        """Press the ACPI power button until the guest shuts down; returns QEMU's exit status.

        The button is pressed again every few seconds: a guest still settling after its boot (the
        input device for the button not yet watched by logind) misses a single press, and logind
        ignores presses while a shutdown is already under way.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # QMP goes away as QEMU exits
                await self.qmp.execute("system_powerdown")
            try:
                return await asyncio.wait_for(asyncio.shield(self.process.wait()), POWER_BUTTON_REPEAT)
            except TimeoutError:
                continue
        raise RastosError(f"the VM did not power off within {timeout:.0f}s; console:\n{self.console_tail()}")

    async def kill(self) -> None:
        """Stop QEMU at once, as a power cut would."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), 5)
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def close(self) -> None:
        await self.kill()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._status_writer is not None:
            self._status_writer.close()


@contextlib.asynccontextmanager
async def running_vm(options: VmOptions, console_log: Path) -> AsyncIterator[VirtualMachine]:
    with tempfile.TemporaryDirectory(prefix="rastos-vm-") as tmp:
        vm = VirtualMachine(options, Path(tmp), console_log)
        try:
            await vm.start()
            yield vm
        finally:
            await vm.close()
