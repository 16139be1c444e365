"""Entry point of the hub. The hub itself lands with its own issue."""

import sys


def main() -> int:
    print("rastos-hub: not yet available in this version of rastOS", file=sys.stderr)
    return 2
