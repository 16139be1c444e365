"""A run that names a workflow: the hub lists its workflows with a schema for each variable, and expands
one into steps itself, refusing a variable that is unknown, missing or of the wrong kind by its name."""

from __future__ import annotations

import pytest

from hub import api
from hub.errors import HubError, NotFound, Unprocessable
from hub.runs_api import published_workflows, workflow_run_steps


def test_each_variable_has_the_schema_of_the_parameter_it_fills_and_its_own_default() -> None:
    workflows = {workflow["name"]: workflow for workflow in published_workflows()}
    assert {"essential", "security", "development"} <= set(workflows)
    ssh_port = next(v for v in workflows["security"]["variables"] if v["name"] == "ssh_port")
    assert ssh_port["fills"] == ["ssh.port", "firewall.ssh_port"]
    assert ssh_port["schema"]["type"] == "integer" and ssh_port["schema"]["maximum"] == 65535
    assert ssh_port["schema"]["default"] == 22 and ssh_port["required"] is False
    users = workflows["development"]["variables"][0]
    assert users["name"] == "users" and users["required"] is True and "default" not in users["schema"]
    assert workflows["essential"]["variables"] == []


def test_a_workflow_is_expanded_with_its_variables_set() -> None:
    steps = workflow_run_steps({"name": "development", "variables": {"users": ["alice"]}})
    assert {"op": "zsh", "params": {"users": ["alice"]}} in steps
    assert [step["op"] for step in steps] == ["update", "zsh", "sysctl"]


@pytest.mark.parametrize(
    ("chosen", "error", "message"),
    [
        ({"name": "development"}, Unprocessable, "workflow.variables.users: required"),
        ({"name": "development", "variables": {"users": "alice"}}, Unprocessable,
         "workflow.variables.users: 'alice' is not of type 'array' (it fills zsh.users)"),
        ({"name": "security", "variables": {"ssh_port": 70000}}, Unprocessable,
         "workflow.variables.ssh_port: 70000 is greater than the maximum of 65535 (it fills ssh.port)"),
        ({"name": "essential", "variables": {"port": 1}}, Unprocessable,
         "workflow.variables.port: workflow essential has no such variable"),
        ({"name": "nothing"}, NotFound, "workflow.name: no workflow named 'nothing'"),
    ],
)  # fmt: skip
def test_a_refused_variable_is_named(chosen: dict[str, object], error: type[HubError], message: str) -> None:
    with pytest.raises(error) as raised:
        workflow_run_steps(chosen)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"target": {"all": True}}, "steps: required (or a workflow, or compliance)"),
        ({"target": {"all": True}, "steps": [{"op": "motd"}], "workflow": {"name": "essential"}},
         "workflow: a run has one of steps, a workflow or compliance, not steps and workflow"),
        ({"target": {"all": True}, "workflow": {"name": "Essential"}}, "workflow.name: 'Essential' does not match"),
        ({"target": {"all": True}, "workflow": {"name": "essential", "vars": {}}}, "workflow: Additional properties"),
        ({"target": {"all": True}, "workflow": {"name": "essential", "variables": []}},
         "workflow.variables: [] is not of type 'object'"),
    ],
)  # fmt: skip
def test_a_run_body_has_steps_or_a_workflow_of_the_right_shape(body: dict[str, object], message: str) -> None:
    with pytest.raises(HubError) as raised:
        api.check_new_run(api.validate(api.NEW_RUN_FIELDS, body))
    assert str(raised.value).startswith(message)
