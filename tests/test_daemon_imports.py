"""What rastosd's start imports: under emulation each module is tens of milliseconds of a boot
before the daemon answers, so what a call may never need is imported when it is first needed."""

from __future__ import annotations

import subprocess
import sys

from ops import OP_CLASSES
from tests.conftest import CHECKOUT


def test_rastosd_s_start_imports_only_what_every_start_needs() -> None:
    code = "import sys, daemon.cli, daemon.service; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, check=True)
    imported = set(result.stdout.split())
    assert "daemon.service" in imported and "daemon.hub_link_settings" in imported  # what it does need
    # The link (its protocol, actions, output) only on a host with a hub; Hub.Join's checks when called.
    assert not imported & {"daemon.hub_link", "daemon.hub_join", "daemon.hub_actions", "daemon.hub_output"}
    # The op modules when a call first names an op (ops/__init__.py's registry).
    assert not imported & {module for module, _ in OP_CLASSES.values()}
    # A configuration file's parser, a hub's URL and CA checks, a plan's diff: where there is one.
    assert not imported & {"tomllib", "rastos.hub_settings", "difflib"}
    # systemd starts it with no arguments: no command-line parser.
    assert "argparse" not in imported
