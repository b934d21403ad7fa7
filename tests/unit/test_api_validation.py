"""api λ: request validation (answered before any AWS call) and the committed OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spotguard_functions import api

from tests.integration.ops_fixtures import FakeLambdaContext, rest_event

OPENAPI_FILE = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def call(event):
    response = api.handler(event, FakeLambdaContext())
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"dryRun": "maybe"}, "dryRun"),
        ({"maxMigrations": 0}, "maxMigrations"),
        ({"maxMigrations": -3}, "maxMigrations"),
        ({"maxMigrations": api.MAX_MIGRATIONS_LIMIT + 1}, "maxMigrations"),
        ({"maxMigrations": "ten"}, "maxMigrations"),
        ({"dryrun": True}, "dryrun"),  # a typo is an error, not silently ignored
    ],
)
def test_trigger_rejects_bad_bodies_with_400_naming_the_field(body, field):
    status, payload = call(rest_event("POST", "/migration/trigger", body=body))
    assert status == 400
    assert payload["message"].startswith("invalid request: ")
    assert field in payload["message"]
    assert any(error["field"].endswith(field) for error in payload["errors"])


def test_trigger_rejects_malformed_json():
    status, payload = call(rest_event("POST", "/migration/trigger", raw_body="{not json"))
    assert status == 400 and "invalid request" in payload["message"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": str(api.HISTORY_MAX_OFFSET + 1)}, "offset"),
    ],
)
def test_history_bounds_are_validated(query, field):
    status, payload = call(rest_event("GET", "/migration/history", query=query))
    assert status == 400
    assert field in payload["message"]


@pytest.mark.parametrize("instance_id", ["not-an-instance", "i-XYZ", "i-123"])
def test_fleet_instance_id_must_look_like_an_instance_id(instance_id):
    status, payload = call(
        rest_event(
            "GET",
            f"/fleet/{instance_id}",
            resource="/fleet/{instanceId}",
            path_parameters={"instanceId": instance_id},
        )
    )
    assert status == 400 and "instanceId" in payload["message"]


def test_unknown_route_is_404():
    status, _ = call(rest_event("GET", "/nope"))
    assert status == 404


def test_committed_openapi_document_is_current():
    """docs/openapi.json is generated from the routes: regenerate it with
    ``.venv/bin/python -m spotguard_functions.api > docs/openapi.json``."""
    assert OPENAPI_FILE.read_text() == api.openapi_json()


def test_openapi_document_describes_every_route_and_the_400_answer():
    document = json.loads(api.openapi_json())
    assert set(document["paths"]) == {
        "/health",
        "/migration/status",
        "/migration/trigger",
        "/migration/history",
        "/fleet",
        "/fleet/{instanceId}",
    }
    trigger = document["paths"]["/migration/trigger"]["post"]
    assert {"200", "202", "400"} <= set(trigger["responses"])
    assert "422" not in json.dumps(document["paths"])
    request_schema = document["components"]["schemas"]["TriggerRequest"]
    assert set(request_schema["properties"]) == {"dryRun", "maxMigrations"}
    assert "404" in document["paths"]["/fleet/{instanceId}"]["get"]["responses"]
