"""Entry points of the daemon and its client. The daemon itself lands with its own issue."""

import sys


def _not_yet(name: str) -> int:
    print(f"{name}: not yet available in this version of rastOS", file=sys.stderr)
    return 2


def daemon_main() -> int:
    return _not_yet("rastosd")


def ctl_main() -> int:
    return _not_yet("rastosctl")
