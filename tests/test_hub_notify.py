"""rastos-hub under systemd (Type=notify): READY=1 once its port takes connections, watchdog pings from
its event loop while it serves, STOPPING=1 at SIGTERM. A real `rastos-hub serve`, with the notify socket
systemd would give it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.hub_fixtures import Hub, made


def messages(listener: socket.socket, until: float) -> list[str]:
    """Every notification received before `until` (monotonic), each split into its assignments."""
    received = []
    while (left := until - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            received += listener.recv(4096).decode().split("\n")
        except TimeoutError:
            break
    return received


def test_the_hub_says_ready_once_it_serves_pings_its_watchdog_and_says_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    server = made(Hub(tmp_path / "hub"))
    server.start()  # returns once the hub answers over HTTP
    try:
        assert server.process is not None
        first = messages(listener, time.monotonic() + 1.0)
        assert "READY=1" in first, first
        assert f"STATUS=serving on http://127.0.0.1:{server.port}" in first, first
        assert first.index("READY=1") < first.index("WATCHDOG=1"), "pings only once it serves"
        assert first.count("WATCHDOG=1") >= 4, f"about ten pings a second: {first}"
    finally:
        assert server.stop() == 0
    assert "STOPPING=1" in messages(listener, time.monotonic() + 0.5)
    listener.close()
