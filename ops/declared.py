"""Pipelines nobody types step by step: workflows shipped with the project, and the desired state a host
declares in /etc/rastos/rastos.toml. Both become an ordinary list of steps that RunPipeline runs as one
job (with its snapshots, && semantics, confirm-or-revert), so they behave exactly like a pipeline.

Workflows (ops/workflows/NAME.toml; /etc/rastos/workflows/NAME.toml overrides one by name):

    description = "..."
    include = ["essential"]              # their steps first, in this order
    [variables.ssh_port]                 # a value the caller may set (rastosctl workflow run --set)
    description = "..."
    default = 22                         # no default: the caller must set it
    [[step]]
    op = "ssh"
    params = { port = "${ssh_port}" }    # a param that is exactly "${name}" takes the variable's value

The desired state (rastos.toml): one table per op, or an array of tables for several steps of one op:

    [hostname]
    hostname = "web-1"
    [[user]]
    name = "admin"

Neither says in which order its ops run: the steps are sorted by the ops' declared order (ops/order.py),
keeping the written order where no declaration applies. Every step's params are validated here, against
the same schemas the daemon uses, so an error names the file and the key: `rastos.toml [ssh].port: ...`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import AFTER, OPS, get_op
from ops.errors import InvalidParams, UnknownOp
from ops.order import OrderCycle, sorted_order
from ops.params import validate
from rastos.errors import RastosError

SHIPPED_WORKFLOWS = Path(__file__).parent / "workflows"
SITE_WORKFLOWS = Path("/etc/rastos/workflows")
DESIRED_STATE = Path("/etc/rastos/rastos.toml")
VARIABLE = re.compile(r"^\$\{([a-z_][a-z0-9_]*)\}$")
NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
REQUIRED = object()  # a variable without a default

Step = dict[str, Any]


@dataclass(frozen=True)
class Variable:
    name: str
    description: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    source: Path
    variables: dict[str, Variable] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()  # includes expanded, params not yet substituted

    def steps_for(self, values: dict[str, Any]) -> list[Step]:
        """The runnable steps: variables substituted, params validated, sorted by the ops' order."""
        unknown = sorted(set(values) - set(self.variables))
        if unknown:
            known = ", ".join(sorted(self.variables)) or "none"
            raise RastosError(f"workflow {self.name}: no variable {unknown[0]!r}", hint=f"its variables: {known}")
        chosen = {name: values.get(name, variable.default) for name, variable in self.variables.items()}
        missing = sorted(name for name, value in chosen.items() if value is REQUIRED)
        if missing:
            variable = self.variables[missing[0]]
            raise RastosError(f"workflow {self.name} needs variable {missing[0]!r} ({variable.description})",
                              hint=f"rastosctl workflow run {self.name} --set {missing[0]}=...")  # fmt: skip
        steps = []
        for index, step in enumerate(self.steps):
            params = {key: _substitute(value, chosen) for key, value in step["params"].items()}
            where = f"workflow {self.name} step {index + 1} ({step['op']})"
            steps.append({"op": step["op"], "params": _validated(step["op"], params, where)})
        return ordered(steps)


def _substitute(value: Any, chosen: dict[str, Any]) -> Any:
    if isinstance(value, str) and (match := VARIABLE.match(value)):
        return chosen[match.group(1)]
    return value


def _validated(op_name: str, params: Any, where: str) -> dict[str, Any]:
    try:
        op = get_op(op_name, f"{where}.op")
        validate(op.schema, params, f"{where}.params")
    except (InvalidParams, UnknownOp) as error:
        raise RastosError(str(error)) from None
    return dict(params)


def ordered(steps: list[Step]) -> list[Step]:
    try:
        order = sorted_order([step["op"] for step in steps], AFTER)
    except OrderCycle as error:
        raise RastosError(str(error)) from None
    return [steps[index] for index in order]


# Workflows


def workflow_dirs() -> tuple[Path, ...]:
    return (SITE_WORKFLOWS, SHIPPED_WORKFLOWS)


def list_workflows(dirs: tuple[Path, ...] | None = None) -> list[Workflow]:
    names = sorted({path.stem for d in dirs or workflow_dirs() if d.is_dir() for path in d.glob("*.toml")})
    return [load_workflow(name, dirs) for name in names]


def load_workflow(name: str, dirs: tuple[Path, ...] | None = None, _seen: tuple[str, ...] = ()) -> Workflow:
    if not NAME.match(name):
        raise RastosError(f"workflow name {name!r} is not valid: lower-case letters, digits and hyphens")
    if name in _seen:
        raise RastosError(f"workflows include each other in a cycle: {' -> '.join((*_seen, name))}")
    search = dirs or workflow_dirs()
    source = next((d / f"{name}.toml" for d in search if (d / f"{name}.toml").is_file()), None)
    if source is None:
        known = sorted({p.stem for d in search if d.is_dir() for p in d.glob("*.toml")})
        raise RastosError(f"no workflow named {name!r}", hint=f"workflows: {', '.join(known) or 'none'}")
    document = _read_toml(source)
    unknown = sorted(set(document) - {"description", "include", "variables", "step"})
    if unknown:
        raise RastosError(f"{source}: unknown key {unknown[0]!r}", hint="keys: description, include, variables, step")
    variables: dict[str, Variable] = {}
    steps: list[Step] = []
    for included in _list_of(document.get("include", []), str, f"{source}: include"):
        workflow = load_workflow(included, dirs, (*_seen, name))
        variables.update(workflow.variables)
        steps += workflow.steps
    for variable_name, spec in _table(document.get("variables", {}), f"{source}: variables").items():
        where = f"{source}: variables.{variable_name}"
        spec = _table(spec, where)
        if set(spec) - {"description", "default"} or not isinstance(spec.get("description"), str):
            raise RastosError(f"{where}: needs a description (text) and may have a default, nothing else")
        variables[variable_name] = Variable(variable_name, spec["description"], spec.get("default", REQUIRED))
    for index, step in enumerate(_list_of(document.get("step", []), dict, f"{source}: step")):
        where = f"{source}: step[{index}]"
        if set(step) - {"op", "params"} or not isinstance(step.get("op"), str):
            raise RastosError(f"{where}: a step has op (the op's name) and params, nothing else")
        params = _table(step.get("params", {}), f"{where}.params")
        for key, value in params.items():
            if isinstance(value, str) and (match := VARIABLE.match(value)) and match.group(1) not in variables:
                raise RastosError(f"{where}.params.{key}: uses variable {match.group(1)!r}, which is not declared")
        steps.append({"op": step["op"], "params": params})
    description = document.get("description")
    if not isinstance(description, str) or not description:
        raise RastosError(f"{source}: needs a description")
    return Workflow(name, description, source, variables, tuple(steps))


# The desired state


def desired_state_steps(path: Path = DESIRED_STATE) -> list[Step]:
    """The steps that make the host what `path` declares."""
    return declared_steps(_read_toml(path), path)


def desired_state_from_text(text: str, path: Path = DESIRED_STATE) -> list[Step]:
    """The same from the file's text, read by the caller: an update reads it from the running root
    through the link-refusing file access, which a path given to open() would not be."""
    try:
        return declared_steps(tomllib.loads(text), path)
    except tomllib.TOMLDecodeError as error:
        raise RastosError(f"{path}: {error}") from None


def declared_steps(document: dict[str, Any], path: Path) -> list[Step]:
    steps: list[Step] = []
    for op_name, value in document.items():
        if op_name not in OPS:
            raise RastosError(f"{path}: [{op_name}] is not an op", hint=f"ops: {', '.join(sorted(OPS))}")
        tables = value if isinstance(value, list) else [value]
        for index, params in enumerate(tables):
            where = (
                f"{path.name} [{op_name}]" if not isinstance(value, list) else f"{path.name} [[{op_name}]] #{index + 1}"
            )
            if not isinstance(params, dict):
                raise RastosError(f"{where}: must be a table of the op's params")
            steps.append({"op": op_name, "params": _validated_config(op_name, params, where)})
    return ordered(steps)


def _validated_config(op_name: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        validate(get_op(op_name).schema, params, where)
    except InvalidParams as error:
        raise RastosError(str(error)) from None
    return params


# TOML shapes


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as error:
        raise RastosError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise RastosError(f"{path}: {error}") from None


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RastosError(f"{where}: must be a table")
    return value


def _list_of(value: Any, kind: type, where: str) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(item, kind) for item in value):
        raise RastosError(f"{where}: must be a list of {'tables' if kind is dict else 'names'}")
    return value
