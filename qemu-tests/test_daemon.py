"""rastosd inside a built image: active after boot, introspectable on the system bus, and an op applied
over D-Bus changes the guest and leaves a pre-snapshot of the root behind."""

from __future__ import annotations

import pytest
from guest_console import PROMPT, GuestConsole

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


def test_daemon_serves_in_the_guest_and_applies_an_op(guest: GuestConsole) -> None:
    assert guest.wait_for(PROMPT, 300), "root is logged in on the serial console"
    # The boot is over when systemd's job queue is empty.
    waited = 'systemctl is-system-running --wait; echo "ACTIVE=$(systemctl is-active rastosd)"'
    active = guest.run(waited, "ACTIVE", 180)
    assert active == "active"
    methods = guest.run(
        'echo "METHODS=$(busctl introspect org.rastos.Daemon1 /org/rastos/Daemon1 | grep -c "^\\.")"', "METHODS"
    )
    assert int(methods) >= 20, "busctl introspect lists the Manager, Snapshots and standard members"
    # An op over D-Bus with busctl (an independent client), then the result read back in the guest.
    guest.type("busctl call org.rastos.Daemon1 /org/rastos/Daemon1 org.rastos.Daemon1.Manager Apply sst "
               "hostname '{\"hostname\": \"guest-42\"}' 0")  # fmt: skip
    state = guest.run(
        'sleep 5; echo "STATE=$(busctl get-property org.rastos.Daemon1 /org/rastos/Daemon1/job/1 '
        'org.rastos.Daemon1.Job State)"',
        "STATE",
    )
    assert state == 's "done"'
    answer = guest.run(
        'echo "HOST=$(cat /etc/hostname) $(hostname) PRE=$(cat /.snapshots/1/snapshot/etc/hostname) '
        'PRES=$(rastosctl --json snapshot list | grep -c \'"kind": "pre"\')"',
        "HOST",
    )
    assert answer == "guest-42 guest-42 PRE=rastos PRES=1"
