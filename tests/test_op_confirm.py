"""Confirm-or-revert with the real daemon on a real Debian root, its firewall in a network namespace
a client probes: an unconfirmed change comes back by itself, a confirmed one stays, a deadline that
passed while the daemon was down is kept at its next start."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_fixtures import MANAGER, STRICT_POLICY, Rastosd, private_bus
from tests.netns import Pair, namespace_pair
from tests.op_tree import op_scratch_root

pytestmark = [pytest.mark.root, pytest.mark.network]


@pytest.fixture
def firewalled(op_tree_base: Path, tmp_path: Path) -> Iterator[tuple[Rastosd, Pair]]:
    """rastosd acting on the tree as if it were the host inside the pair's host namespace."""
    with namespace_pair() as pair, private_bus(STRICT_POLICY) as bus, \
            op_scratch_root(op_tree_base, f"confirm-{tmp_path.name}") as scratch:  # fmt: skip
        state_dir = tmp_path / "state"
        # Its own UTS namespace too: a runtime host name change could never reach this machine's.
        wrapper = ["ip", "netns", "exec", pair.host, "unshare", "--uts", "--"]
        daemon = Rastosd(bus, scratch, state_dir, extra=["--root-runtime"], wrapper=wrapper)
        daemon.start()
        try:
            with pair.serving(8080):
                yield daemon, pair
        finally:
            if daemon.process is not None:
                daemon.stop()


def firewall(daemon: Rastosd, timeout: int, *ports: str) -> int:
    params = {"allow_tcp": list(ports), "confirm_timeout": timeout}
    path = daemon.call(MANAGER, "Apply", "sst", "firewall", json.dumps(params), "2")[0]
    assert daemon.wait_job(path) == "done", daemon.log_text()
    return int(path.rsplit("/", 1)[1])


def confirmation(daemon: Rastosd, job_id: int) -> dict[str, Any]:
    document: dict[str, Any] = daemon.job(job_id)["confirmation"]
    return document


def wait_confirmation(daemon: Rastosd, job_id: int, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (current := confirmation(daemon, job_id))["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id}: still {current} after {timeout}s"
        time.sleep(0.2)
    return current


def test_an_unconfirmed_firewall_change_reverts_by_itself(firewalled: tuple[Rastosd, Pair]) -> None:
    daemon, pair = firewalled
    ruleset = daemon.scratch.root / "etc/nftables.conf"
    first = firewall(daemon, 0, "8080")
    assert confirmation(daemon, first) is None, "confirm_timeout 0: stands at once"
    assert pair.can_connect(8080)
    confirmed_rules = ruleset.read_text()

    closing = firewall(daemon, 3)  # closes 8080, unconfirmed
    pending = confirmation(daemon, closing)
    assert pending["state"] == "pending" and pending["paths"] == ["/etc/nftables.conf"]
    assert not pair.can_connect(8080), "the change is in force while it waits"
    reverted = wait_confirmation(daemon, closing, "reverted")
    assert "/etc/nftables.conf" in reverted["detail"]
    assert ruleset.read_text() == confirmed_rules, "the confirmed file is back"
    assert pair.can_connect(8080), "and loaded: the port is open again"
    methods = [event[3] for event in daemon.call(MANAGER, "GetEventLog", "tu", "0", "1000")[0]]
    assert methods.count("ConfirmationPending") == 1 and methods.count("ConfirmationExpired") == 1


def test_a_confirmed_change_stays_and_cannot_be_confirmed_twice(firewalled: tuple[Rastosd, Pair]) -> None:
    daemon, pair = firewalled
    closing = firewall(daemon, 3)
    confirmed = daemon.ctl("confirm", str(closing))
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmation(daemon, closing)["state"] == "confirmed"
    time.sleep(4)
    assert confirmation(daemon, closing)["state"] == "confirmed"
    assert not pair.can_connect(8080), "the confirmed rules still hold after the deadline"
    again = daemon.ctl("confirm", str(closing))
    assert again.returncode == 1 and "NotPending" in again.stderr and "already confirmed" in again.stderr
    error = daemon.call_error(MANAGER, "Confirm", "u", "999")
    assert "job 999 made no change that waits for a confirmation" in error


def test_a_second_change_folds_in_the_first_and_a_revert_goes_back_to_the_confirmed_state(
    firewalled: tuple[Rastosd, Pair],
) -> None:
    daemon, pair = firewalled
    ruleset = daemon.scratch.root / "etc/nftables.conf"
    firewall(daemon, 0, "8080")
    confirmed_rules = ruleset.read_text()
    first = firewall(daemon, 60, "8080", "9000")
    second = firewall(daemon, 2)
    assert confirmation(daemon, first)["state"] == "superseded"
    wait_confirmation(daemon, second, "reverted")
    assert ruleset.read_text() == confirmed_rules, "both unconfirmed changes are undone"
    assert pair.can_connect(8080)


def test_a_deadline_that_passed_while_the_daemon_was_down_reverts_at_its_start(
    firewalled: tuple[Rastosd, Pair],
) -> None:
    daemon, pair = firewalled
    closing = firewall(daemon, 2)
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(3)
    assert not pair.can_connect(8080), "nobody reverted while the daemon was away"
    daemon.start()
    wait_confirmation(daemon, closing, "reverted")
    assert pair.can_connect(8080)
