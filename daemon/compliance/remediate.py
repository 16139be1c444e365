"""The failed checks' remediations as one pipeline: a step per op, the params of every check that maps
to it merged, ordered by the ops' declared order (ops/order.py). Pure: the client builds it from a
report (`rastosctl compliance remediate --check ...`) as well as the daemon.

A step starts from the report's `context`: the op's params that keep what the host has now (sshd's
port and allowed users, the ports that listen, what the compliance sysctl file holds), then each
check's params over it. So a remediation changes what the failed checks name and nothing else the op
manages, and a second remediation adds to the first instead of undoing it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from daemon.compliance.model import CheckResult, Status
from ops import AFTER
from ops.order import sorted_order
from ops.sysctl import SETS

Step = dict[str, Any]


def pipeline(results: Iterable[CheckResult], context: Mapping[str, Mapping[str, Any]]) -> list[Step]:
    wanted: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.status is Status.FAIL and result.remediation is not None:
            merge(wanted.setdefault(result.remediation.op, {}), result.remediation.params)
    steps: list[Step] = [{"op": op, "params": finish(op, context.get(op, {}), params)} for op, params in wanted.items()]
    return [steps[index] for index in sorted_order([step["op"] for step in steps], AFTER)]


def merge(into: dict[str, Any], params: Mapping[str, Any]) -> None:
    """Lists join (sysctl sets), maps join (sysctl settings), anything else: the later check's."""
    for key, value in params.items():
        current = into.get(key)
        if isinstance(current, list) and isinstance(value, list):
            into[key] = list(dict.fromkeys([*current, *value]))
        elif isinstance(current, dict) and isinstance(value, dict):
            into[key] = {**current, **value}
        else:
            into[key] = copy.deepcopy(value)


def finish(op: str, base: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    if op == "sysctl":
        return finish_sysctl(base, wanted)
    return {**copy.deepcopy(dict(base)), **wanted}


def finish_sysctl(base: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The sets wanted, and what the compliance file holds beyond them kept as explicit settings (a
    set remediated before stays; its keys are written again from the set, as the set says now)."""
    sets: list[str] = list(wanted.get("sets", []))
    covered = {key for name in sets for key in SETS[name]}
    kept = {key: value for key, value in base.get("settings", {}).items() if key not in covered}
    params: dict[str, Any] = {"sets": sets, "settings": kept | dict(wanted.get("settings", {}))}
    if "name" in base:
        params["name"] = base["name"]
    return params


def select(results: Sequence[CheckResult], ids: Sequence[str]) -> list[CheckResult]:
    """The results of the checks named (all when none is); an unknown id is a ValueError naming it."""
    if not ids:
        return list(results)
    known = {result.id: result for result in results}
    unknown = [check_id for check_id in ids if check_id not in known]
    if unknown:
        raise ValueError(f"no check {', '.join(map(repr, unknown))}; rastosctl compliance scan lists them")
    return [known[check_id] for check_id in dict.fromkeys(ids)]
