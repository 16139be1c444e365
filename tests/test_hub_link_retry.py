"""The hub link's retries while the host has no route yet (early in a boot, before DHCP has answered):
no route is told apart from a hub that refuses, which the backoff spares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_fixtures import require_root

CHECKOUT = Path(__file__).resolve().parents[1]


NO_ROUTE_PROBE = """
import asyncio, aiohttp
from daemon.hub_link import no_route_yet
async def main():
    try:
        async with aiohttp.ClientSession() as session:
            await session.ws_connect(URL)
    except Exception as error:
        print(type(error).__name__, no_route_yet(error))
asyncio.run(main())
"""


@pytest.mark.root
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # A network namespace of its own has no route at all: DHCP has not answered yet.
        ("http://192.0.2.1:9/", "True"),
        # Loopback is up there once `ip link set lo up` ran, and nothing listens: a refusal is the hub's.
        ("http://127.0.0.1:9/", "False"),
    ],
)
def test_the_hub_link_tells_no_route_from_a_hub_that_refuses(url: str, expected: str) -> None:
    require_root()
    probe = NO_ROUTE_PROBE.replace("URL", repr(url))
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable, probe],
        capture_output=True, text=True, timeout=60, cwd=CHECKOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == expected, result.stdout
