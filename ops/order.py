"""Order between ops: an op declares which ops it must come after (`Op.after`), the registry checks the
declarations have no cycle, explicit pipelines are checked against them and generated ones sorted.

`firewall` after `network` (rules name the interfaces network makes), `ssh` after `user` (turning
passwords off before the admin's key is in place locks the admin out). A pipeline written by hand keeps
its order, so a step placed before one it must follow is refused with both named; a workflow or
`apply-config`, whose order nobody wrote, is sorted, keeping the written order where no rule applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from graphlib import CycleError, TopologicalSorter

from ops.errors import InvalidParams

After = Mapping[str, Sequence[str]]  # op name -> ops it must come after


class OrderCycle(ValueError):
    """Declarations that cannot all hold; the message names the ops of the cycle."""


def check_declarations(after: After) -> None:
    sorter = TopologicalSorter({name: set(before) for name, before in after.items()})
    try:
        sorter.prepare()
    except CycleError as error:
        cycle = error.args[1]
        raise OrderCycle(f"op order declarations form a cycle: {' after '.join(cycle)}") from None


def check_order(names: Sequence[str], after: After, where: str = "steps") -> None:
    """Refuse a written pipeline whose steps break a declaration, naming both steps."""
    for index, name in enumerate(names):
        for later in range(index + 1, len(names)):
            if names[later] in after.get(name, ()):
                raise InvalidParams(
                    f"{where}[{index}].op",
                    f"{name} must come after {names[later]} (step {later + 1}): move it after that step",
                )


def sorted_order(names: Sequence[str], after: After) -> list[int]:
    """Positions of `names` in an order that satisfies the declarations, otherwise as written."""
    graph = {i: {j for j, other in enumerate(names) if j != i and other in after.get(name, ())} for i, name in
             enumerate(names)}  # fmt: skip
    sorter = TopologicalSorter(graph)
    try:
        sorter.prepare()
    except CycleError as error:
        raise OrderCycle(f"steps cannot be ordered: {' after '.join(names[i] for i in error.args[1])}") from None
    order: list[int] = []
    ready: set[int] = set(sorter.get_ready())
    while ready:
        first = min(ready)  # the earliest written step among those free to go: stable
        ready.discard(first)
        order.append(first)
        sorter.done(first)
        ready.update(sorter.get_ready())
    return order
