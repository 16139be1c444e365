"""Stage `desired-state`: the image built to the rastos.toml its profile names.

The file declares state per op (docs/daemon.md, "Desired state"); the same ops the daemon runs on a
live host apply it here to the image's root, so a host boots configured, and the same file ships as
/etc/rastos/rastos.toml for `rastosctl apply-config` to keep it so. Runtime actions (a reload, loading
a ruleset) are left out: the image's own units read the files when it boots.
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

from imagebuilder.context import BuildContext
from ops import get_op
from ops.declared import desired_state_steps
from ops.errors import OpFailed
from ops.params import validate
from ops.steps import Step, run_step
from ops.target import Target
from rastos.errors import RastosError

log = logging.getLogger("rastos.build.desired_state")
SHIPPED_AT = "etc/rastos/rastos.toml"


def apply_desired_state(ctx: BuildContext) -> str:
    source = ctx.profile.system.desired_state
    if not source:
        return "none declared"
    changed = apply_file(Path(source), ctx.rootfs)
    destination = ctx.rootfs / SHIPPED_AT
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    destination.chmod(0o640)  # user names, key comments and addresses are nobody else's business
    return f"{changed} of {len(desired_state_steps(Path(source)))} steps changed the image"


def log_line(op_name: str, line: str) -> None:
    log.info("%s: %s", op_name, line)


def apply_file(source: Path, root: Path) -> int:
    """Apply every step of `source` to the tree at `root`; returns how many changed something."""
    target = Target(root, runtime=False)
    changed = 0
    for index, declared in enumerate(desired_state_steps(source), 1):
        op = get_op(declared["op"])
        step = Step(op, validate(op.schema, declared["params"], f"{source.name} [{op.name}]"))
        op.check(target, step.params)
        try:
            plan = run_step(step, target, functools.partial(log_line, op.name))
        except OpFailed as error:
            raise RastosError(f"{source}: step {index} ({op.name}) did not take: {error}") from None
        changed += bool(plan.actions)
    return changed
