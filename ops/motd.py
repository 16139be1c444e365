"""`motd`: the message of the day shown at login: a static text (/etc/motd) and, with `dynamic`, the
host's state as it is at that login.

Debian's pam_motd runs the executables in /etc/update-motd.d at each login and shows what they print
before /etc/motd. The dynamic part is one of them, /etc/update-motd.d/50-rastos: the host name, the
deployment that runs (root subvolume, a rollback's snapshot, a boot that fell back) as the daemon
reports it (`rastosctl --json status`), and how many packages can be upgraded. The login waits for it,
so it gives rastosctl three seconds (a Python client starts in 0.2 s on hardware, over a second
under emulation; RASTOS_MOTD_TIMEOUT changes it) and falls back to a line saying it did not answer.
The count of upgrades is apt's simulation (about a second), kept in /run and made again only once dpkg's database
or the package lists changed, so a login normally pays nothing for it; a count that takes longer than
two seconds goes on in the background for the next login. It never fails a login: it exits 0.
"""

from __future__ import annotations

from ops.actions import Action, RemoveFile
from ops.base import Op, Plan, file_action
from ops.params import Kind, Param, Params
from ops.target import Target

MOTD = "/etc/motd"
SCRIPT = "/etc/update-motd.d/50-rastos"

# POSIX sh (dash): it runs on every host, python3 or not. python3 is only asked to format the daemon's
# JSON, and only once rastosctl (itself a Python program) answered.
DYNAMIC = r"""#!/bin/sh
# Written by rastosd (op motd, dynamic); changes made here are replaced at the next apply.
# pam_motd runs this at each login: it must be quick and must never fail the login.

lists=/var/lib/apt/lists
cache=/run/motd.rastos-updates
count() {  # upgradable packages and those from security, by apt's simulation, into the cache
    if ! simulated=$(apt-get -s -qq -o Debug::NoLocking=1 dist-upgrade 2>/dev/null); then
        rm -f "$cache"  # an old count is not shown as if it were current
        return 1
    fi
    upgrades=$(printf '%s\n' "$simulated" | grep -c '^Inst [^ ]* \[')
    security=$(printf '%s\n' "$simulated" | grep '^Inst [^ ]* \[' | grep -c -- '-security')
    printf '%s %s\n' "$upgrades" "$security" > "$cache.$$" && mv "$cache.$$" "$cache"
}
if [ "${1:-}" = --count ]; then
    count
    exit $?
fi

printf '\n  host         %s\n' "$(uname -n)"

if status=$(timeout "${RASTOS_MOTD_TIMEOUT:-3}" rastosctl --json status 2>/dev/null) && [ -n "$status" ]; then
    printf '%s' "$status" | python3 -c '
import json, sys
status = json.load(sys.stdin)
boot = status.get("boot") or {}
kind, snapshot = boot.get("kind") or "unknown", boot.get("snapshot") or "?"
root, health = boot.get("root") or "-", boot.get("health") or "unknown"
print("  deployment   %s (%s, boot %s)" % (root, kind, health))
if kind == "rollback":
    print("  rollback     running the copy of snapshot %s that a rollback made" % snapshot)
elif kind == "fallback":
    failed = (boot.get("failed_entry"), boot.get("failed_root"))
    print("  rollback     %s (%s) failed to boot: the deployment before it runs" % failed)
elif kind == "snapshot":
    print("  rollback     read-only snapshot %s: what changes now is gone at the next boot" % snapshot)
else:
    print("  rollback     none in effect")
jobs = status.get("active_jobs") or []
if jobs:
    print("  jobs         %d running or queued (rastosctl jobs)" % len(jobs))
' 2>/dev/null || echo "  rastosd      answered, but its status could not be read"
else
    echo "  rastosd      not answering: deployment and rollback state unknown (rastosctl status)"
fi

set -- "$lists"/*_Packages*
if [ ! -e "$1" ]; then
    echo "  updates      unknown: the package lists were never fetched (rastosctl apply update)"
    exit 0
fi
fetched=$(date -r "$lists" '+%Y-%m-%d %H:%M' 2>/dev/null)
# Counted again only once dpkg's database or the lists changed; a slow count finishes in the background
# for the next login rather than hold this one up.
if [ ! -s "$cache" ] || [ /var/lib/dpkg/status -nt "$cache" ] || [ "$lists" -nt "$cache" ]; then
    timeout 2 "$0" --count 2>/dev/null
    if [ $? = 124 ]; then  # timed out
        setsid "$0" --count </dev/null >/dev/null 2>&1 &
        echo "  updates      being counted: shown at the next login (package lists of $fetched)"
        exit 0
    fi
fi
if ! read -r upgrades security < "$cache" 2>/dev/null; then
    echo "  updates      not counted: apt's simulation failed (apt-get -s dist-upgrade)"
elif [ "$upgrades" = 0 ]; then
    echo "  updates      none pending (package lists of $fetched)"
else
    echo "  updates      $upgrades package(s) can be upgraded, $security from security (package lists of $fetched)"
fi
exit 0
"""


class MotdOp(Op):
    name = "motd"
    description = (
        "Set the message of the day (/etc/motd; an empty text removes it) and, with dynamic, show the host's "
        "deployment, rollback and pending updates at each login"
    )
    after = ("hostname",)  # a message that names the host is written once the host has its name
    schema = (
        Param("text", Kind.STRING, "the message; a final newline is added if missing", required=True, max_length=65536),
        Param("dynamic", Kind.BOOLEAN, f"also show the host's state at each login ({SCRIPT}, run by pam_motd)",
              default=False),
    )  # fmt: skip

    def plan(self, target: Target, params: Params) -> Plan:
        actions = static_actions(target, params["text"])
        if params.get("dynamic", False):  # params checked by the schema have it; older callers' may not
            actions += file_action(target, SCRIPT, DYNAMIC, mode=0o755)
        elif target.exists(SCRIPT):
            actions.append(RemoveFile(SCRIPT))
        return Plan(self.name, tuple(actions))


def static_actions(target: Target, text: str) -> list[Action]:
    if not text:
        return [RemoveFile(MOTD)] if target.exists(MOTD) else []
    return file_action(target, MOTD, text if text.endswith("\n") else text + "\n")
