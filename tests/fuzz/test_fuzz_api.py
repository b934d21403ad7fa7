"""Fuzz the api handler through API-Gateway-shaped REST events (methods, paths, query
strings, headers, bodies: JSON, garbage, multipart, deep nesting, base64), against the
tables on the moto server. Every answer is a proxy response with a JSON error or result
body; none is a 500 (an internal error) and nothing escapes the handler."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spotguard_core.contracts import Env
from spotguard_functions import api

from tests.fuzz.profiles import share
from tests.fuzz.strategies import deep, json_values, odd_scalars
from tests.integration.ops_fixtures import FakeLambdaContext, create_tables, rest_event

pytestmark = pytest.mark.integration

ROUTES = [
    ("GET", "/health", None),
    ("GET", "/migration/status", None),
    ("POST", "/migration/trigger", None),
    ("GET", "/migration/history", None),
    ("GET", "/fleet", None),
    ("GET", "/fleet/{instanceId}", "instanceId"),
]
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get", ""]) | st.text(
    max_size=8
)
text = st.text(max_size=30)
path_values = st.one_of(
    st.sampled_from(
        ["i-0123456789abcdef0", "i-01234567", "i-XYZ", "", "..", "%2e%2e", "i-0123456789abcdef0/x"]
    ),
    text,
)
query_values = st.one_of(
    st.sampled_from(
        ["0", "1", "5", "20", "100", "101", "10000", "10001", " 5", "1_000", "-1", "+5", "05", "ended"]
    ),
    st.integers(-(10**20), 10**20).map(str),
    text,
)
queries = st.none() | st.dictionaries(
    st.sampled_from(["limit", "offset", "state", "x", ""]) | text, query_values, max_size=4
)
content_types = (
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=xyz",
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
            "APPLICATION/JSON",
        ]
    )
    | text
)
headers = st.none() | st.dictionaries(
    st.sampled_from(["Content-Type", "content-type", "Accept", "Host", "X-Forwarded-For"]) | text,
    content_types,
    max_size=4,
)
trigger_bodies = st.fixed_dictionaries(
    {},
    optional={
        "dryRun": st.one_of(st.booleans(), odd_scalars),
        "maxMigrations": st.one_of(st.integers(-5, 1005), odd_scalars),
        "dryrun": st.booleans(),
    },
)


def _multipart(payload: str) -> str:
    return f'--xyz\r\nContent-Disposition: form-data; name="dryRun"\r\n\r\n{payload}\r\n--xyz--\r\n'


bodies = st.one_of(
    st.none(),
    trigger_bodies.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
    st.sampled_from([5, 40, 2000]).map(lambda depth: json.dumps(deep(depth)) if depth < 900 else "[" * depth),
    st.text(max_size=50).map(_multipart),
)


@st.composite
def api_events(draw: st.DrawFn) -> dict[str, Any]:
    method, resource, parameter = draw(st.sampled_from(ROUTES))
    path_parameters = None
    path = resource
    if parameter:
        value = draw(path_values)
        path_parameters = {parameter: value}
        path = resource.replace("{instanceId}", value)
    if draw(st.booleans()):
        method = draw(METHODS)
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(["/", "", "/fleet/", "//health", "/health/", "/migration"]) | text)
        resource = path
    event = rest_event(
        method,
        path,
        query=draw(queries),
        raw_body=draw(bodies),
        resource=resource,
        path_parameters=path_parameters,
    )
    event["headers"] = draw(headers)
    event["multiValueHeaders"] = (
        {k: [v] for k, v in event["headers"].items()} if event["headers"] is not None else None
    )
    if event["body"] is not None and draw(st.integers(0, 4)) == 0:
        event["isBase64Encoded"] = True
        if draw(st.booleans()):
            event["body"] = base64.b64encode(event["body"].encode("utf-8", "surrogatepass")).decode()
    return event


@pytest.fixture
def api_tables(moto_server, monkeypatch):
    create_tables(monkeypatch)
    monkeypatch.setenv(Env.FLEET_NAME.value, "workers")
    monkeypatch.delenv(Env.RECONCILER_FUNCTION.value, raising=False)  # a valid trigger answers 503
    return moto_server


def check(event: dict[str, Any]) -> int:
    response = api.handler(event, FakeLambdaContext())
    status = response["statusCode"]
    assert isinstance(status, int) and 200 <= status < 600
    assert status != 500, response["body"]  # an internal error: a bug the input reached
    body = json.loads(response["body"])
    if status >= 400:
        assert isinstance(body.get("message"), str) and body["message"]
    return status


@share(1.0)
@given(event=api_events())
def test_api_gateway_shaped_events(api_tables, event, count_inputs):
    count_inputs["api.handler"] += 1
    check(event)


def test_the_generator_reaches_every_route(api_tables):
    """The strategy is not all noise: well-formed requests of each route are answered 2xx."""
    assert check(rest_event("GET", "/health")) == 200
    assert check(rest_event("GET", "/migration/status")) == 200
    assert check(rest_event("GET", "/migration/history", query={"limit": "5"})) == 200
    assert check(rest_event("GET", "/fleet")) == 200
    assert check(rest_event("POST", "/migration/trigger", body={"dryRun": True})) == 503
