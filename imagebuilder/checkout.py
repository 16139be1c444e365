"""Where the builder's own files are: profiles, guest files, units, the daemon it installs.

A module of its own, imported by everything that needs the path and importing nothing: the build
context imports the profile, which imports the kernel profiles, which need this path.
"""

from __future__ import annotations

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
