"""The hub's OpenAPI document: it is valid OpenAPI, and what it promises is what a live hub does.

schemathesis generates requests for every operation from the document itself (valid ones and
invalid ones, with a fixed seed and a bounded number of examples) against a real `rastos-hub serve`
on loopback, and checks each answer: never a 500, a documented status, the documented shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.config import PositiveDataAcceptanceConfig

from hub.app import openapi_document
from rastos.bundle import generate_key
from tests.hub_fixtures import Hub, _serving, make_bundle, upload

EXAMPLES = 30  # per operation and phase: enough to cover each schema's edges, bounded for CI


def test_the_openapi_document_is_valid_openapi() -> None:
    validate(openapi_document())


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub for every generated case, with a host, a run, an image and a rollout, so that the answers
    listing them are checked against the document too."""
    directory = Path(tmp_path_factory.mktemp("openapi"))
    generate_key(directory / "key")
    for hub in _serving(Hub(directory / "hub")):
        hub.api("POST", "/api/v1/hosts", {"name": "web-1", "groups": ["web"]})
        hub.api("POST", "/api/v1/runs", {"target": {"all": True}, "steps": [{"op": "motd", "params": {"text": "x"}}]})
        status, image = upload(hub, make_bundle(directory, directory / "key", "2.0").read_bytes())
        assert status == 201, image
        hub.api("POST", "/api/v1/rollouts", {"image": image["id"], "target": {"all": True}})
        yield hub


schema = schemathesis.openapi.from_dict(openapi_document()).exclude(path_regex="/(stream|agent)$")
# A run's steps are well formed by the document's schema and then checked by the op library as each
# host's rastosd checks them (a date that does not exist, an op that must come after another): such a
# step is answered 422, as documented, however valid its JSON is.
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
def test_the_hub_does_what_its_openapi_document_says(case: Any, live_hub: Hub) -> None:
    case.call_and_validate(base_url=live_hub.url, headers={"Authorization": f"Bearer {live_hub.admin_token}"})
