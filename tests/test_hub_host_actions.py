"""Actions on one host from the hub (POST /api/v1/hosts/{name}/actions): a snapshot taken, a rollback
or a one-shot boot prepared, by a real rastosd on its private bus and scratch btrfs, with the outcome
back in the host's state and both event logs; the route's refusals (role, body, host offline); and the
`action` and `action_status` frames, each checked by the other end's parser."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import btrfsutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from daemon.errors import InvalidParams, NoSuchSnapshot
from daemon.hub_actions import parse_action, refused
from daemon.store import StateStore
from hub.api import HOST_ACTION
from hub.protocol import ProtocolError, action_frame, parse_agent_message
from tests.daemon_fixtures import MANAGER, SNAPSHOTS
from tests.hub_fixtures import Hub, _serving
from tests.hub_fixtures import hub as hub
from tests.test_hub_fleet import Fleet, online
from tests.test_hub_fleet import fleet as fleet

ACTIONS = "/api/v1/hosts/{}/actions"


def finished(hub: Hub, host: str, action_id: str) -> dict[str, Any]:
    """The action once its outcome is in the host's state."""

    def ended(state: dict[str, Any]) -> bool:
        return any(a["id"] == action_id and a["state"] in ("done", "failed") for a in state["hosts"][host]["actions"])

    state = hub.wait_state(ended, f"action {action_id} on {host} answered")
    found: dict[str, Any] = next(a for a in state["hosts"][host]["actions"] if a["id"] == action_id)
    return found


@pytest.mark.root
def test_a_snapshot_a_rollback_and_a_one_shot_boot_from_the_hub_reach_the_daemon(hub: Hub, fleet: Fleet) -> None:
    agent = fleet.add("web-1", ["web"])
    hub.wait_state(online("web-1"), "the agent online")

    # A snapshot: the daemon takes it, the hub hears its id, and the host's facts list it.
    status, sent = hub.request("POST", ACTIONS.format("web-1"), {"action": "snapshot", "description": "from the hub"})
    assert status == 202 and sent["state"] == "sent" and sent["admin"] == "alice", sent
    taken = finished(hub, "web-1", sent["id"])
    assert taken["state"] == "done", taken
    snapshot = taken["result"]["snapshot"]
    assert snapshot in [row[0] for row in agent.call(SNAPSHOTS, "List")[0]], "the daemon has it"
    facts = hub.wait_state(
        lambda s: any(x["id"] == snapshot for x in s["hosts"]["web-1"]["facts"]["snapshots"]), "the facts list it"
    )["hosts"]["web-1"]["facts"]
    assert {"id": snapshot, "description": "from the hub", "kind": "manual"}.items() <= next(
        x for x in facts["snapshots"] if x["id"] == snapshot
    ).items()

    # A rollback to it: the daemon writes the deployment and its entry, ordered to boot next, and the
    # running root is left alone until a reboot (which the hub says is needed, and does not do).
    (agent.scratch.root / "etc/motd").write_text("after the snapshot\n")
    sent = hub.api("POST", ACTIONS.format("web-1"), {"action": "rollback", "snapshot": snapshot})
    rolled = finished(hub, "web-1", sent["id"])
    assert rolled["state"] == "done", rolled
    assert rolled["result"] == {"snapshot": snapshot, "entry": f"rastos-snapshot-{snapshot}.conf",
                                "reboot_needed": True, "error": None}  # fmt: skip
    entry = (agent.scratch.esp / f"loader/entries/rastos-snapshot-{snapshot}+3.conf").read_text()
    assert f"rootflags=subvol=@snapshots/{snapshot}/deployment" in entry and "sort-key rastos-1\n" in entry
    deployment = agent.scratch.snapshots / str(snapshot) / "deployment"
    assert btrfsutil.is_subvolume(deployment) and not btrfsutil.get_subvolume_read_only(deployment)
    assert (agent.scratch.root / "etc/motd").read_text() == "after the snapshot\n", "the running root is untouched"
    last_rollback = hub.api("GET", "/api/v1/hosts/web-1")["last_rollback"]
    assert last_rollback["method"] == "Rollback" and last_rollback["detail"]["snapshot"] == snapshot, last_rollback

    # A one-shot boot: the daemon writes the snapshot's read-only entry and asks bootctl to boot it next;
    # with no EFI here bootctl refuses, and that refusal is the action's outcome, word for word.
    sent = hub.api("POST", ACTIONS.format("web-1"), {"action": "boot_once", "snapshot": snapshot})
    once = finished(hub, "web-1", sent["id"])
    assert once["state"] == "failed", once
    assert once["result"]["error"].startswith(f"cannot make readonly-snapshot-{snapshot}.conf the next boot's entry")
    # One the daemon refuses (no such snapshot) fails the same way, nothing done.
    sent = hub.api("POST", ACTIONS.format("web-1"), {"action": "rollback", "snapshot": 999})
    assert finished(hub, "web-1", sent["id"])["result"]["error"] == "snapshot 999 does not exist"

    # The daemon's log holds each, as the hub's uid, under the hub's action id; the hub's holds who asked
    # and, from the agent's log, how each ended.
    log = agent.call(MANAGER, "GetEventLog", "tu", "0", "10000")[0]
    done = [(uid, json.loads(detail)) for _, _, uid, method, _, detail in log if method == "HubAction"]
    assert [(uid, d["kind"], d["state"]) for uid, d in done] == [
        (0, "snapshot", "done"), (0, "rollback", "done"), (0, "boot_once", "failed"), (0, "rollback", "failed"),
    ], done  # fmt: skip
    events = hub.api("GET", "/api/v1/events?host=web-1&limit=1000")
    asked = [(e["actor"], e["detail"]["action"]) for e in events if e["method"] == "HostActionRequested"]
    assert asked == [("alice", "snapshot"), ("alice", "rollback"), ("alice", "boot_once"), ("alice", "rollback")]
    answered = hub.api("GET", "/api/v1/events?host=web-1&actor=agent&method=HubAction")
    assert [e["detail"]["action"] for e in answered] == [d["action"] for _, d in done]


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    for server in _serving(Hub(Path(tmp_path_factory.mktemp("actions")) / "hub")):
        server.api("POST", "/api/v1/hosts", {"name": "away"})
        yield server


def test_actions_are_refused_to_a_viewer_for_an_offline_host_and_for_no_host(shared_hub: Hub) -> None:
    hub = shared_hub
    added = hub.call("admin", "add", "vera", "--role", "viewer")
    assert added.returncode == 0, added.stderr
    before = hub.api("GET", "/api/v1/events?limit=1000")
    body = {"action": "rollback", "snapshot": 1}
    status, answer = hub.request("POST", ACTIONS.format("away"), body, token=added.stdout.strip().splitlines()[-1])
    assert (status, answer) == (403, {
        "error": "role: POST /api/v1/hosts/{name}/actions needs the role operator; vera has the role viewer",
        "needed_role": "operator", "role": "viewer",
    }), answer  # fmt: skip
    status, answer = hub.request("POST", ACTIONS.format("away"), body)
    assert status == 409 and answer["error"].startswith("name: host away is offline;"), answer
    status, answer = hub.request("POST", ACTIONS.format("nowhere"), body)
    assert (status, answer["error"]) == (404, "name: no host named 'nowhere'"), answer
    assert hub.api("GET", "/api/v1/events?limit=1000") == before, "nothing refused is logged, nor queued"
    assert hub.api("GET", "/api/v1/hosts/away")["actions"] == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"action": "snapshot"}, "description: required for the action snapshot"),
        ({"action": "rollback"}, "snapshot: required for the action rollback"),
        ({"action": "snapshot", "description": "x", "snapshot": 1}, "snapshot: the action snapshot takes none"),
        ({"action": "boot_once", "snapshot": 1, "description": "x"}, "description: the action boot_once takes none"),
        ({"action": "reboot", "snapshot": 1}, "action: 'reboot' is not one of"),
        ({"action": "rollback", "snapshot": "1"}, "snapshot: '1' is not of type 'integer'"),
        ({"action": "rollback", "snapshot": 0}, "snapshot: 0 is less than the minimum of 1"),
        ({"action": "snapshot", "description": "two\nlines"}, "description: 'two\\nlines' does not match"),
        ({"action": "snapshot", "description": "x" * 201}, "description: "),
        ({"action": "rollback", "snapshot": 1, "force": True}, "body: Additional properties are not allowed ('force'"),
        ([], "body: [] is not of type 'object'"),
    ],
)
def test_a_malformed_body_is_refused_naming_the_field(shared_hub: Hub, body: object, error: str) -> None:
    status, answer = shared_hub.request("POST", ACTIONS.format("away"), body)
    assert status == 400 and answer["error"].startswith(error), answer


DOCUMENTED = Draft202012Validator(HOST_ACTION)
VALID = st.one_of(
    st.fixed_dictionaries({"action": st.just("snapshot"), "description": st.text(min_size=1, max_size=5)}),
    st.fixed_dictionaries({"action": st.sampled_from(["rollback", "boot_once"]), "snapshot": st.integers(1, 3)}),
)
VALUE = (
    st.sampled_from(["snapshot", "rollback", "reboot"])
    | st.integers(-1, 3)
    | st.text(max_size=3)
    | st.none()
    | (st.floats(0, 3) | st.booleans())
)
FIELD = st.sampled_from(["action", "snapshot", "description", "extra"])
# A valid body, then as often as not a field or two set to something else, or one taken away.
BODY = st.builds(
    lambda valid, changes, removed: {key: value for key, value in {**valid, **changes}.items() if key not in removed},
    VALID, st.dictionaries(FIELD, VALUE, max_size=2), st.lists(FIELD, max_size=1),
) | st.lists(st.integers(-9, 9), max_size=2) | st.none()  # fmt: skip


@settings(max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODY)
def test_any_body_is_refused_naming_a_field_unless_the_document_allows_it(shared_hub: Hub, body: Any) -> None:
    """What the OpenAPI document's schema allows is what the hub takes (here answered 409: the host is
    offline); anything else is a 400 whose message starts with the field, and nothing is logged."""
    before = len(shared_hub.api("GET", "/api/v1/events?limit=1000"))
    status, answer = shared_hub.request("POST", ACTIONS.format("away"), body)
    if DOCUMENTED.is_valid(body):
        assert status == 409, (body, answer)
    else:
        assert status == 400, (body, answer)
        assert answer["error"].split(":")[0] in ("body", "action", "snapshot", "description"), (body, answer)
    assert len(shared_hub.api("GET", "/api/v1/events?limit=1000")) == before, body


def test_each_end_takes_the_others_frames_and_refuses_a_bad_one_naming_the_field(tmp_path: Path) -> None:
    for kind, snapshot, description in (("snapshot", None, "before"), ("rollback", 3, None), ("boot_once", 4, None)):
        parsed = parse_action(action_frame("a1", kind, snapshot, description))
        assert (parsed.id, parsed.kind, parsed.snapshot, parsed.description) == ("a1", kind, snapshot, description)
    bad: tuple[tuple[dict[str, Any], str], ...] = (
        ({"id": "a1", "kind": "rollback", "snapshot": True, "description": None}, "action.snapshot"),
        ({"id": "a1", "kind": "rollback", "snapshot": 1, "description": "x"}, "action.description"),
        ({"id": "a1", "kind": "snapshot", "snapshot": None, "description": "a\tb"}, "description"),
        ({"id": "a 1", "kind": "snapshot", "snapshot": None, "description": "x"}, "action.id"),
        ({"id": "a1", "kind": "reboot", "snapshot": 1, "description": None}, "action.kind"),
        ({"id": "a1", "kind": "rollback", "snapshot": 1, "description": None, "admin": "x"}, "action.admin"),
    )
    for action, field in bad:
        with pytest.raises(InvalidParams) as caught:
            parse_action({"type": "action", "action": action})
        assert caught.value.field == field, caught.value
        if "admin" not in action:
            with pytest.raises(ProtocolError):  # the hub would not have sent it
                action_frame(action["id"], action["kind"], action["snapshot"], action["description"])
    # The agent's answer to a refused one is what the hub takes; a changed one, the hub refuses by field.
    answer = refused(StateStore(tmp_path / "state.db"), "a1", NoSuchSnapshot("snapshot 9 does not exist"), 0)
    kind, status = parse_agent_message(answer)
    assert kind == "action_status" and status.error == "snapshot 9 does not exist"  # type: ignore[union-attr]
    for change, message in (({"state": "maybe"}, "message.state: 'maybe' is not one of"),
                            ({"reboot_needed": "yes"}, "message.reboot_needed: 'yes' is not of type 'boolean'"),
                            ({"extra": 1}, "message: Additional properties are not allowed")):  # fmt: skip
        with pytest.raises(ProtocolError) as error:
            parse_agent_message({**answer, **change})
        assert error.value.message.startswith(message), error.value.message
