"""Steps: an op and its params, checked the one way, and run the one way.

The daemon's jobs, the image builder's desired-state stage and the hub (which validates a run before
it sends anything) all read steps here, so a bad step is refused with the same field path
(`steps[1].params.groups[0]: ...`) wherever it is given. `run_step` is the one loop that changes a
target: plan, nothing to do or the caller's last look at the plan, execute exactly that plan, verify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ops import AFTER, get_op
from ops.actions import Output
from ops.base import FollowUpLog, Op, Plan, execute
from ops.errors import InvalidParams, OpFailed
from ops.order import check_order
from ops.params import Params, parse_json, validate
from ops.target import Target

MAX_STEPS = 256


@dataclass(frozen=True)
class Step:
    op: Op
    params: Params

    def as_json(self) -> dict[str, Any]:
        return {"op": self.op.name, "params": self.params}


def checked_step(op_name: object, params: object, where: str) -> Step:
    """A step whose params its op's schema accepts; nothing of any target is looked at."""
    if not isinstance(op_name, str):
        raise InvalidParams(f"{where}.op" if where else "op", "must be the name of an op")
    op = get_op(op_name, f"{where}.op" if where else "op")
    return Step(op, validate(op.schema, params, f"{where}.params" if where else "params"))


def step_from(target: Target, op_name: object, params: object, where: str) -> Step:
    """A step checked by its schema and then against the target (a group exists, a kernel key)."""
    step = checked_step(op_name, params, where)
    try:
        step.op.check(target, step.params)
    except InvalidParams as error:
        if where:
            raise InvalidParams(f"{where}.{error.field}", str(error).split(": ", 1)[1]) from None
        raise
    return step


def checked_steps(document: object) -> list[Step]:
    """A pipeline's steps, each by its schema, in an order the ops allow; no target needed."""
    steps = [checked_step(op, params, where) for where, op, params in _items(document)]
    check_order([step.op.name for step in steps], AFTER)
    return steps


def parse_steps(target: Target, steps_json: str) -> list[Step]:
    """A pipeline's steps from a caller's JSON, checked by schema, order and against the target."""
    document = parse_json(steps_json, "steps")
    steps = [step_from(target, op, params, where) for where, op, params in _items(document)]
    check_order([step.op.name for step in steps], AFTER)
    return steps


def _items(document: object) -> list[tuple[str, object, object]]:
    if not isinstance(document, list) or not document:
        raise InvalidParams("steps", 'must be a non-empty JSON list of {"op": ..., "params": {...}}')
    if len(document) > MAX_STEPS:
        raise InvalidParams("steps", f"at most {MAX_STEPS} steps, got {len(document)}")
    items = []
    for index, item in enumerate(document):
        where = f"steps[{index}]"
        if not isinstance(item, dict):
            raise InvalidParams(where, "must be an object with keys op and params")
        unknown = set(item) - {"op", "params"}
        if unknown:
            raise InvalidParams(f"{where}.{sorted(unknown)[0]}", "unknown key; a step has op and params")
        items.append((where, item.get("op"), item.get("params", {})))
    return items


def run_step(
    step: Step,
    target: Target,
    output: Output,
    *,
    before_changes: Callable[[Plan], None] | None = None,
    follow_ups: FollowUpLog | None = None,
) -> Plan:
    """Plan the step; when the plan is empty, that is all. Otherwise `before_changes` sees the plan
    (a snapshot, a copy of the files a risky change may need back), the executor carries out exactly
    that plan, and verify must find nothing left to do. Returns the plan carried out."""
    plan = step.op.plan(target, step.params)
    if not plan.actions:
        return plan
    if before_changes is not None:
        before_changes(plan)
    execute(plan, target, output, follow_ups)
    problems = step.op.verify(target, step.params)
    if problems:
        raise OpFailed(f"verify found: {'; '.join(problems)}")
    return plan
