"""rastos-image: list, show, build and boot image profiles; build kernels; make signing keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from imagebuilder.build import build_image, default_output_dir
from imagebuilder.events import BuildEvents, ConsoleEvents, JsonEvents
from imagebuilder.kernel import cli as kernel_cli
from imagebuilder.keys import DEFAULT_KEY
from imagebuilder.profile import available_profiles, load_profile
from imagebuilder.profile.load import PROFILE_DIR, profile_to_dict
from imagebuilder.profile.model import VERSION_RULE
from imagebuilder.vm import (
    VmOptions,
    choose_accel,
    find_firmware,
    parse_credential,
    parse_forward,
    prepare_vars,
    qemu_argv,
    running_vm,
)
from rastos.bundle import VERSION, generate_key
from rastos.errors import RastosError
from rastos.process import run_foreground

DEFAULT_PROFILE = "minimal"
DEFAULT_CACHE = Path(os.environ.get("RASTOS_CACHE_DIR", "/var/cache/rastos"))
READY_TIMEOUT = 300.0

log = logging.getLogger("rastos")


def cmd_profiles(args: argparse.Namespace) -> int:
    for path in available_profiles(args.profile_dir):
        profile = load_profile(path.stem, args.profile_dir)
        marker = " (default)" if profile.name == DEFAULT_PROFILE else ""
        print(f"{profile.name:16} {profile.description}{marker}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, args.profile_dir)
    data = profile_to_dict(profile)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_toml_like(data)
    return 0


def _print_toml_like(data: dict[str, Any]) -> None:
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    for key, value in data.items():
        if key not in tables and key not in arrays:
            print(f"{key} = {json.dumps(value)}")
    for name, table in tables.items():
        print(f"\n[{name}]")
        for key, value in table.items():
            print(f"{key} = {json.dumps(value)}")
    for name, items in arrays.items():
        for item in items:
            print(f"\n[[{name}]]")
            for key, value in item.items():
                print(f"{key} = {json.dumps(value)}")


def cmd_build(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, args.profile_dir)
    output_dir = args.output_dir or default_output_dir(profile)
    events: BuildEvents = JsonEvents() if args.json else ConsoleEvents()
    try:
        result = build_image(
            profile,
            output_dir=output_dir,
            cache_dir=args.cache_dir,
            events=events,
            refresh_bootstrap=args.refresh_bootstrap,
            loop_fallback=args.loop_fallback,
            version=args.image_version,
            signing_key_path=args.signing_key,
            delta_from=args.delta_from,
        )
    finally:
        events.close()
    image = result.outputs.get("qcow2") or result.outputs["raw"]
    if not args.json:
        print(f"\nimage: {image}")
        print(f"bundle: {_sized(result.outputs['bundle'])}, version {result.version}")
        if delta := result.outputs.get("delta"):
            print(f"delta: {_sized(delta)}, for hosts that run version {result.delta_from}")
        print(f"boot it again: rastos-image boot {shlex.quote(str(image))}")
    if args.boot:
        return _boot_until_ready(VmOptions(image=image, accel=args.accel, snapshot=True), args.json)
    return 0


def _sized(path: Path) -> str:
    return f"{path} ({path.stat().st_size / (1024 * 1024):.1f} MiB)"


def cmd_key_generate(args: argparse.Namespace) -> int:
    try:
        public, key_id = generate_key(args.path)
    except OSError as error:
        raise RastosError(f"cannot write the key {args.path}: {error.strerror}") from None
    print(f"private key: {args.path}")
    print(f"public key: {public}")
    print(f"key id: {key_id}")
    print(f"sign with it: rastos-image build --signing-key {shlex.quote(str(args.path))}")
    return 0


def image_version(text: str) -> str:
    if not VERSION.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} {VERSION_RULE}")
    return text


def cmd_boot(args: argparse.Namespace) -> int:
    credentials = tuple(parse_credential(text) for text in args.credential)
    forwards = tuple(parse_forward(text) for text in args.forward)
    options = VmOptions(
        image=args.image, accel=args.accel, memory=args.memory, snapshot=args.snapshot,
        credentials=credentials, forwards=forwards, **({"ssh_port": args.ssh_port} if args.ssh_port else {}),
        **({"cpus": args.cpus} if args.cpus is not None else {}),
    )  # fmt: skip
    if args.until_ready:
        return _boot_until_ready(options, args.json, args.timeout)
    return _boot_interactive(options)


def _boot_interactive(options: VmOptions) -> int:
    firmware = find_firmware()
    accel = choose_accel(options.accel, firmware)
    with tempfile.TemporaryDirectory(prefix="rastos-vm-") as tmp:
        scratch = Path(tmp)
        vars_file = prepare_vars(options, firmware, scratch)
        argv = qemu_argv(
            options,
            accel=accel,
            firmware=firmware,
            vars_file=vars_file,
            qmp_socket=scratch / "qmp.sock",
            status_socket=scratch / "status.sock",
            console=["-serial", "mon:stdio"],
        )
        print(f"booting {options.image} with {accel.upper()}{' (changes discarded)' if options.snapshot else ''}")
        print(f"  ssh:  ssh -p {options.ssh_port} root@127.0.0.1   QMP: {scratch / 'qmp.sock'}")
        print("  quit: Ctrl-A X")
        return run_foreground(argv)


def _boot_until_ready(options: VmOptions, as_json: bool, timeout: float = READY_TIMEOUT) -> int:
    console_log = options.image.with_name(options.image.name + ".console.log")
    report = asyncio.run(_wait_ready(options, console_log, timeout))
    healthy = is_healthy(report)
    if as_json:
        print(json.dumps({"event": "boot-report", **report}))
        return 0 if healthy else 1
    console = Console()
    style = "green" if healthy else "red"
    console.print(
        f"[{style}]guest is {report['state']}[/{style}] after {report['host_seconds_to_ready']}s "
        f"(root {report['root'].get('fsroot')}, entry {report['loader']['selected']})"
    )
    daemon = report.get("daemon") or {}
    if daemon.get("answered"):
        first = f", first after {report['host_seconds_to_daemon']}s" if report.get("host_seconds_to_daemon") else ""
        console.print(f"rastosd {daemon['version']} answers on the system bus (org.rastos.Daemon1{first})")
    elif daemon:
        console.print(f"[red]rastosd does not answer:[/red] {daemon.get('error')}")
    if report["failed_units"]:
        console.print(f"[red]failed units:[/red] {' '.join(report['failed_units'])}")
        console.print(f"console log: {console_log}\njournal: {report.get('journal_file')}")
    return 0 if healthy else 1


def is_healthy(report: dict[str, Any]) -> bool:
    """Booted to `running`, no failed unit, and rastosd answering where the image has it."""
    daemon = report.get("daemon") or {}
    return report["state"] == "running" and not report["failed_units"] and (not daemon or daemon.get("answered", False))


async def _wait_ready(options: VmOptions, console_log: Path, timeout: float) -> dict[str, Any]:
    async with running_vm(options, console_log) as vm:
        report = await vm.wait_ready(timeout)
        report["accel"] = vm.accel
        if not is_healthy(report):
            journal = (await vm.diagnostics()).get("journal", "")
            journal_file = console_log.with_name(console_log.name.replace(".console.log", ".journal.txt"))
            journal_file.write_text(journal)
            report["journal_file"] = str(journal_file)
        if options.snapshot:
            await vm.kill()  # every change is discarded anyway: no need to wait for a shutdown
        else:
            await vm.powerdown()
        return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rastos-image", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks and log commands to stderr")
    p.add_argument("--profile-dir", type=Path, default=PROFILE_DIR, help="where profiles are (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("profiles", help="list profiles with a one-line description").set_defaults(func=cmd_profiles)

    show = sub.add_parser("show", help="print a profile's resolved configuration")
    show.add_argument("profile", nargs="?", default=DEFAULT_PROFILE)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    build = sub.add_parser("build", help="build a profile's image")
    build.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help="name or .toml path (default: %(default)s)")
    build.add_argument("--output-dir", type=Path, help="default: build/PROFILE")
    build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="default: %(default)s")
    build.add_argument("--refresh-bootstrap", action="store_true", help="ignore the cached bootstrap")
    build.add_argument("--json", action="store_true", help="machine-readable events on stdout")
    build.add_argument(
        "--loop-fallback",
        action="store_true",
        help="fill the root file system through a loop mount, as hosts with btrfs-progs < 6.7 do",
    )
    build.add_argument(
        "--image-version", type=image_version, metavar="V",
        help="the image's version (default: the profile's `version`, else the build's UTC time, YYYYMMDD.HHMMSS)",
    )  # fmt: skip
    build.add_argument(
        "--signing-key", type=Path, metavar="PATH",
        help=f"sign the update bundles with this key (rastos-image key generate); default: {DEFAULT_KEY}, "
        "made on first use",
    )  # fmt: skip
    build.add_argument(
        "--delta-from", type=Path, metavar="OLD.rbundle",
        help="also write a delta bundle from this full bundle of an earlier version (signed with the same key)",
    )  # fmt: skip
    build.add_argument("--boot", action="store_true", help="then boot it until the system inside is up")
    build.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    build.set_defaults(func=cmd_build)

    boot = sub.add_parser("boot", help="boot an image in QEMU (UEFI, serial console on this terminal)")
    boot.add_argument("image", type=Path)
    boot.add_argument("--snapshot", action="store_true", help="discard every change when the VM stops")
    boot.add_argument("--until-ready", action="store_true", help="wait for the guest's boot report, then power off")
    boot.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="with --until-ready (seconds)")
    boot.add_argument("--json", action="store_true", help="with --until-ready: print the report as JSON")
    boot.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    boot.add_argument("--memory", default="1G")
    boot.add_argument("--cpus", type=int, help="vCPUs (default: 2, or $RASTOS_VM_CPUS)")
    boot.add_argument(
        "--credential", action="append", default=[], metavar="NAME=VALUE",
        help="a systemd credential for the guest, e.g. rastos.hub.url=ws://10.0.2.2:8470/api/v1/agent (repeatable)",
    )  # fmt: skip
    boot.add_argument("--ssh-port", type=int, help="the host port forwarded to the guest's 22 (default: a free one)")
    boot.add_argument(
        "--forward", action="append", default=[], metavar="HOSTPORT:GUESTPORT",
        help="forward 127.0.0.1:HOSTPORT to the guest's TCP GUESTPORT (repeatable)",
    )  # fmt: skip
    boot.set_defaults(func=cmd_boot)

    key = sub.add_parser("key", help="signing keys for update bundles")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    generate = key_commands.add_parser(
        "generate", help="make an ed25519 key pair: PATH (private, mode 0600) and PATH.pub, which hosts trust"
    )
    generate.add_argument("path", type=Path)
    generate.set_defaults(func=cmd_key_generate)

    kernel_cli.add_parser(sub, DEFAULT_CACHE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.DEBUG)
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        return int(args.func(args))
    except RastosError as e:
        if args.debug:
            raise
        print(f"rastos-image: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rastos-image: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rastos-image show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
