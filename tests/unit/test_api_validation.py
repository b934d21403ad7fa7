"""api λ: request validation (answered before any AWS call) and the committed OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spotguard_core import contracts, ops_models
from spotguard_functions import api
from spotguard_tools import openapi_doc

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
        # strict: a value is accepted only in its own JSON type (issue 13)
        ({"dryRun": "yes"}, "dryRun"),
        ({"dryRun": "true"}, "dryRun"),
        ({"dryRun": 1}, "dryRun"),
        ({"maxMigrations": True}, "maxMigrations"),
        ({"maxMigrations": "5"}, "maxMigrations"),
        ({"maxMigrations": 2.0}, "maxMigrations"),
        ({"maxMigrations": "1_000"}, "maxMigrations"),
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
        # strict: only canonical decimal digits (issue 13)
        ({"limit": " 5"}, "limit"),
        ({"limit": "5 "}, "limit"),
        ({"limit": "1_0"}, "limit"),
        ({"limit": "+5"}, "limit"),
        ({"limit": "05"}, "limit"),
        ({"limit": "5.0"}, "limit"),
        ({"limit": "\u0665"}, "limit"),  # ARABIC-INDIC DIGIT FIVE: int() would take it
        ({"offset": "1_000"}, "offset"),
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
    ``.venv/bin/python -m spotguard_tools.openapi_doc > docs/openapi.json``."""
    assert OPENAPI_FILE.read_text() == openapi_doc.openapi_json()


def test_openapi_document_describes_every_route_and_the_400_answer():
    document = json.loads(openapi_doc.openapi_json())
    assert set(document["paths"]) == {
        "/health",
        "/migration/status",
        "/migration/trigger",
        "/migration/history",
        "/fleet",
        "/fleet/{instanceId}",
    }
    trigger = document["paths"]["/migration/trigger"]["post"]
    # 202 only: the job always runs in the reconciler (no inline run any more); 503 without one
    assert {"202", "400", "413", "415", "500", "503"} <= set(trigger["responses"])
    assert "200" not in trigger["responses"]
    assert "422" not in json.dumps(document["paths"])
    request_schema = document["components"]["schemas"]["TriggerRequest"]
    assert set(request_schema["properties"]) == {"dryRun", "maxMigrations"}
    assert "404" in document["paths"]["/fleet/{instanceId}"]["get"]["responses"]


# ------------------------------------------------------------------ hostile input (issue 13)
def hostile(**changes):
    event = rest_event("POST", "/migration/trigger", body={"dryRun": True})
    event.update(changes)
    return event


@pytest.mark.parametrize(
    ("event", "status", "words"),
    [
        # multipart without boundary: Powertools' form parser raised ValueError (a 502)
        (
            hostile(headers={"Content-Type": "multipart/form-data"}, body="--x\r\n\r\n"),
            415,
            "application/json",
        ),
        (hostile(headers={"content-type": "text/plain"}, body="dryRun=true"), 415, "application/json"),
        # found by make fuzz: an empty body with such a type reached Powertools' parsers
        (hostile(headers={"Content-Type": "multipart/form-data"}, body=None), 415, "application/json"),
        (hostile(headers={"Content-Type": "text/plain"}, body=None), 415, "application/json"),
        # deep nesting: json.loads raised RecursionError (a 502)
        (hostile(body="[" * 5_000 + "]" * 5_000), 400, "nests"),
        (hostile(body='{"dryRun": ' + "[" * 40 + "]" * 40 + "}"), 400, "nests"),
        (hostile(body="\ud800"), 400, "JSON"),
        (hostile(isBase64Encoded=True, body="%%%not-base64"), 400, "base64"),
        (hostile(isBase64Encoded=True, body="//79"), 400, "JSON"),  # bytes that are not UTF-8
        (hostile(body='{"dryRun": true, "pad": "' + "x" * 20_000 + '"}'), 413, "larger"),
        (hostile(body="null"), 400, "invalid request"),
        (hostile(body="[]"), 400, "invalid request"),
        (hostile(body='"text"'), 400, "invalid request"),
    ],
)
def test_hostile_bodies_get_an_answer_with_a_message(event, status, words):
    got, payload = call(event)
    assert (got, words in payload["message"]) == (status, True), payload


def test_a_non_event_is_answered_not_raised():
    response = api.handler({"httpMethod": None, "path": None}, FakeLambdaContext())
    assert response["statusCode"] == 400 and "not an API Gateway" in json.loads(response["body"])["message"]


def test_instance_id_pattern_comes_from_the_contracts():
    assert contracts.INSTANCE_ID_PATTERN in ops_models.INSTANCE_ID_PATTERN
    assert (
        call(
            rest_event(
                "GET",
                "/fleet/i-0123456789abc",  # 13 hex digits: neither the 8- nor the 17-digit form
                resource="/fleet/{instanceId}",
                path_parameters={"instanceId": "i-0123456789abc"},
            )
        )[0]
        == 400
    )


def test_json_content_type_in_any_spelling_is_json():
    """Found by make fuzz: Powertools compares the media type case-sensitively and answered
    its own 415 shape (no message) for ``APPLICATION/JSON``."""
    event = hostile(headers={"Content-Type": "APPLICATION/JSON; charset=UTF-8"})
    status, payload = call(event)
    assert status == 503 and "reconciler" in payload["message"]  # the trigger itself ran


def test_conflicting_content_type_headers_are_415():
    event = hostile(headers={"Content-Type": "application/json", "content-type": "multipart/form-data"})
    assert call(event)[0] == 415
