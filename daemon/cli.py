"""Entry points: `rastosd` (the service) and `rastosctl` (its client, in daemon/ctl.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rastos.errors import RastosError


@dataclass(frozen=True)
class DaemonArguments:
    """rastosd's command line; what is None is left to the configuration's default."""

    config: Path | None = None
    root: Path | None = None
    state_dir: Path | None = None
    snapshots_dir: Path | None = None
    esp: Path | None = None
    bus_address: str | None = None
    booted_entry: str | None = None
    root_runtime: bool | None = None
    kernel_cmdline: str | None = None
    debug: bool = False


def parse_daemon_arguments(argv: list[str]) -> DaemonArguments:
    import argparse

    parser = argparse.ArgumentParser(prog="rastosd", description="rastOS host daemon (org.rastos.Daemon1)")
    parser.add_argument("--config", type=Path, help="configuration file (default /etc/rastos/daemon.toml)")
    # Test seams: run the real daemon against a scratch root, a private state and a private bus.
    parser.add_argument("--root", type=Path, help="root the ops change and snapshots copy (default /)")
    parser.add_argument("--state-dir", type=Path, help="where state.db lives (default /var/lib/rastos)")
    parser.add_argument("--snapshots-dir", type=Path, help="where snapshots live (default ROOT/.snapshots)")
    parser.add_argument("--esp", type=Path, help="the EFI system partition (default /efi)")
    parser.add_argument("--bus-address", help="D-Bus address to serve on instead of the system bus")
    parser.add_argument(
        "--booted-entry", help="the boot entry to take as booted (default: systemd-boot's EFI variable)"
    )
    parser.add_argument(
        "--root-runtime", action="store_true", default=None,
        help="make runtime changes (nft, sysctl) for a root other than / (tests, in namespaces of their own)",
    )  # fmt: skip
    parser.add_argument("--kernel-cmdline", help="the kernel command line of this boot (default /proc/cmdline)")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return DaemonArguments(**vars(parser.parse_args(argv)))


def daemon_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # systemd starts rastosd with no arguments: the parser (argparse, with gettext) is for the test seams
    # and --help, and is not imported at boot, where under emulation it is a tenth of a second.
    args = parse_daemon_arguments(argv) if argv else DaemonArguments()

    from daemon.config import load_config
    from daemon.logs import setup_logging

    setup_logging(args.debug)
    try:
        # Absolute: Hub.Join writes this file back through the file access that takes absolute paths only.
        config = load_config(args.config.absolute() if args.config is not None else None)
        overrides: dict[str, Any] = {
            "root": args.root, "state_dir": args.state_dir, "snapshots_dir": args.snapshots_dir,
            "esp": args.esp, "bus_address": args.bus_address, "booted_entry": args.booted_entry,
            "kernel_cmdline": args.kernel_cmdline, "root_runtime": args.root_runtime,
        }  # fmt: skip
        config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
        from daemon.service import serve

        asyncio.run(serve(config))
    except RastosError as error:
        logging.getLogger("rastosd").error("%s", error)
        return 1
    return 0


def ctl_main(argv: list[str] | None = None) -> int:
    from daemon.ctl import main

    return main(sys.argv[1:] if argv is None else argv)
