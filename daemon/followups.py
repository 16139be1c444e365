"""Follow-ups: the service actions a step owes after its files changed (reload sshd after sshd_config).

The executor (ops/base.py) records a step's follow-ups in the state store before the step writes
anything and marks each done once it ran. A crash or power cut in between leaves them recorded and not
done; the daemon's next start runs them (`run_owed`), so a changed sshd_config is never left unread
until someone happens to reload it. Running one twice is harmless: they are reloads and restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.failpoints import failpoint
from daemon.store import StateStore
from ops.actions import FollowUp, Output
from ops.target import Target
from rastos.errors import RastosError

log = logging.getLogger("rastosd.followups")


@dataclass
class JobFollowUps:
    """The state store as one job's follow-up log (the executor's FollowUpLog)."""

    store: StateStore
    job_id: int | None

    def add_follow_ups(self, follow_ups: Sequence[FollowUp]) -> list[int]:
        ids = self.store.add_follow_ups(self.job_id, [(f.verb, f.unit) for f in follow_ups])
        return ids

    def before_follow_ups(self) -> None:
        failpoint("follow-ups-owed")

    def finish_follow_up(self, follow_up_id: int, outcome: str) -> None:
        self.store.finish_follow_up(follow_up_id, outcome)


def run_owed(store: StateStore, target: Target, output: Output = log.info) -> list[str]:
    """At start: run what a crash left owed. Returns what happened, one line per follow-up."""
    done = []
    for follow_up_id, job_id, verb, unit in store.owed_follow_ups():
        follow_up = FollowUp(verb, unit)
        if not target.acts_at_runtime:
            outcome = "not run: the target is not the running system"
        else:
            try:
                outcome = follow_up.run(output)
            except (RastosError, OSError) as error:
                outcome = f"failed: {error}"
        store.finish_follow_up(follow_up_id, outcome)
        line = f"follow-up of job {job_id} owed since a crash: systemctl {verb} {unit}: {outcome}"
        log.warning("%s", line)
        done.append(line)
    return done
