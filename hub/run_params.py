"""A run's steps from the command line, typed and checked by the ops' JSON Schemas as the hub publishes
them (GET /api/v1/ops) before anything is sent: an op with `KEY=VALUE` parameters, a pipeline file, or
a workflow (ops/workflows) with `--var NAME=VALUE`.

A VALUE is read as its parameter's schema says: `port=22` is the integer 22 for an integer parameter
and the text "22" for a string one. A list parameter takes a JSON list or the key once per item
(`groups=wheel groups=docker`); a map takes a JSON object or `KEY=NAME=VALUE` once per entry
(`settings=vm.swappiness=10`). An unknown parameter, a value of the wrong type, or one the schema
refuses is an error naming it.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from hub.client import UsageError
from ops.declared import VARIABLE, Workflow, load_workflow
from rastos.errors import RastosError

TRUE, FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})
INTEGER = re.compile(r"[+-]?[0-9]{1,19}")
Step = dict[str, Any]


@dataclass(frozen=True)
class OpSchema:
    name: str
    description: str
    schema: dict[str, Any]  # its params, as JSON Schema

    @property
    def properties(self) -> dict[str, Any]:
        properties: dict[str, Any] = self.schema.get("properties", {})
        return properties


@dataclass(frozen=True)
class OpLibrary:
    """The ops a hub's hosts run, as the hub publishes them."""

    ops: dict[str, OpSchema]

    @classmethod
    def from_json(cls, document: object) -> OpLibrary:
        wrong = RastosError("hub: /api/v1/ops answered something other than a list of ops")
        if not isinstance(document, list):
            raise wrong
        try:
            return cls({item["name"]: OpSchema(item["name"], item["description"], item["schema"]) for item in document})
        except (KeyError, TypeError):
            raise wrong from None

    def op(self, name: str, where: str) -> OpSchema:
        if name not in self.ops:
            raise UsageError(f"{where}: the hub knows no op {name!r}", hint=f"its ops: {', '.join(sorted(self.ops))}")
        return self.ops[name]

    def check(self, steps: list[Step], where: str) -> list[Step]:
        """Each step's op known and its params as its schema says, or an error naming the first bad field."""
        for index, step in enumerate(steps):
            op = self.op(step["op"], f"{where}steps[{index}].op")
            checked(op, step["params"], f"{where}steps[{index}].params")
        return steps


def op_step(library: OpLibrary, name: str, arguments: list[str]) -> Step:
    """`--op NAME KEY=VALUE...` as a step, its values typed by the op's schema."""
    op = library.op(name, "--op")
    where = f"--op {name}"
    params = {key: typed(op, key, texts, where) for key, texts in _pairs(arguments, where).items()}
    return {"op": name, "params": checked(op, params, where)}


def _pairs(arguments: list[str], where: str) -> dict[str, list[str]]:
    """KEY=VALUE arguments, a key's values in the order given (a key given again is a list's next item)."""
    pairs: dict[str, list[str]] = {}
    for argument in arguments:
        key, separator, value = argument.partition("=")
        if not separator or not key:
            raise UsageError(f"{where}: {argument!r}: write KEY=VALUE")
        pairs.setdefault(key, []).append(value)
    return pairs


def typed(op: OpSchema, key: str, texts: list[str], where: str) -> Any:
    spec = op.properties.get(key)
    if spec is None:
        known = ", ".join(op.properties) or "none"
        raise UsageError(f"{where}: {key}: {op.name} has no such parameter", hint=f"its parameters: {known}")
    return _value(spec, texts, f"{where}: {key}")


def _value(spec: dict[str, Any], texts: list[str], field: str) -> Any:
    kind = spec.get("type")
    if kind == "array":
        return _list(spec, texts, field)
    if kind == "object":
        return _map(spec, texts, field)
    if len(texts) > 1:
        raise UsageError(f"{field}: given {len(texts)} times; it takes one value")
    return _scalar(kind, texts[0], field)


def _scalar(kind: object, text: str, field: str) -> Any:
    if kind == "integer":
        if not INTEGER.fullmatch(text):
            raise UsageError(f"{field}: must be an integer, got {text!r}")
        return int(text)
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{field}: must be a number, got {text!r}") from None
    if kind == "boolean":
        if text.lower() not in TRUE | FALSE:
            raise UsageError(f"{field}: must be true or false, got {text!r}")
        return text.lower() in TRUE
    if kind == "string":
        return text
    try:  # a parameter of no one type: JSON if it reads as JSON, text otherwise
        return json.loads(text)
    except ValueError:
        return text


def _list(spec: dict[str, Any], texts: list[str], field: str) -> list[Any]:
    if len(texts) == 1 and texts[0].lstrip().startswith("["):
        items: list[Any] = _json(texts[0], list, field, "a JSON list")
        return items
    if texts == [""]:
        return []  # `groups=`: the empty list
    return [_value(spec.get("items", {}), [text], f"{field}[{index}]") for index, text in enumerate(texts)]


def _map(spec: dict[str, Any], texts: list[str], field: str) -> dict[str, Any]:
    if len(texts) == 1 and texts[0].lstrip().startswith("{"):
        entries: dict[str, Any] = _json(texts[0], dict, field, "a JSON object")
        return entries
    values = spec.get("additionalProperties", {})
    entries = {}
    for text in texts:
        key, separator, value = text.partition("=")
        if not separator or not key:
            raise UsageError(f"{field}: {text!r}: write {field.rpartition(' ')[2]}=NAME=VALUE or a JSON object")
        entries[key] = _value(values if isinstance(values, dict) else {}, [value], f"{field}.{key}")
    return entries


def _json(text: str, kind: type, field: str, what: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UsageError(f"{field}: not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{field}: must be {what}")
    return value


def checked(op: OpSchema, params: object, where: str) -> dict[str, Any]:
    """`params` if the op's schema takes them; a UsageError naming the first field it refuses otherwise."""
    errors = sorted(Draft202012Validator(op.schema).iter_errors(params), key=lambda e: list(map(str, e.path)))
    if errors:
        error = errors[0]
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        field = f"{where}: {path[1:]}" if path.startswith(".") else f"{where}{path}"
        raise UsageError(f"{field}: {error.message[:300]}")
    assert isinstance(params, dict)
    return params


# Pipeline files


def pipeline_steps(library: OpLibrary, path: Path) -> list[Step]:
    """A pipeline file's steps: a JSON list of {"op", "params"}, or TOML with a [[step]] table for each
    (as rastosctl pipeline and the workflows take them)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise UsageError(f"--pipeline: cannot read {path}: {error.strerror}") from None
    try:
        document: object = tomllib.loads(text).get("step", []) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise UsageError(f"--pipeline: {path}: not valid {kind}: {error}") from None
    return library.check(_shaped(document, f"{path}: "), f"{path}: ")


def _shaped(document: object, where: str) -> list[Step]:
    if not isinstance(document, list) or not document:
        raise UsageError(f'{where}steps: must be a non-empty list of {{"op": ..., "params": {{...}}}}')
    steps = []
    for index, item in enumerate(document):
        field = f"{where}steps[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise UsageError(f"{field}: must be an object with op (the op's name) and params")
        if unknown := sorted(set(item) - {"op", "params"}):
            raise UsageError(f"{field}.{unknown[0]}: not a key of a step (op, params)")
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise UsageError(f"{field}.params: must be an object")
        steps.append({"op": item["op"], "params": params})
    return steps


# Workflows


def workflow_steps(library: OpLibrary, name: str, arguments: list[str]) -> list[Step]:
    """A workflow's steps with its variables set: each VALUE typed by the parameter the variable fills."""
    workflow = _workflow(name)
    values = {}
    for variable, texts in _pairs(arguments, "--var").items():
        if variable not in workflow.variables:
            known = ", ".join(workflow.variables) or "none"
            raise UsageError(f"--var {variable}: workflow {name} has no such variable", hint=f"its variables: {known}")
        values[variable] = _variable_value(library, workflow, variable, texts)
    try:
        steps = workflow.steps_for(values)
    except RastosError as error:
        raise UsageError(error.message, hint=error.hint) from None
    return library.check(steps, f"workflow {name}: ")


def _workflow(name: str) -> Workflow:
    try:
        return load_workflow(name)
    except RastosError as error:
        raise UsageError(f"--workflow: {error.message}", hint=error.hint) from None


def _variable_value(library: OpLibrary, workflow: Workflow, variable: str, texts: list[str]) -> Any:
    for step in workflow.steps:
        for key, value in step["params"].items():
            match = VARIABLE.match(value) if isinstance(value, str) else None
            if match and match.group(1) == variable and step["op"] in library.ops:
                spec = library.ops[step["op"]].properties.get(key)
                if spec is not None:
                    return _value(spec, texts, f"--var {variable} ({step['op']}.{key})")
    return _value({}, texts, f"--var {variable}")
