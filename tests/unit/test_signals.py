"""Parsing EventBridge events into signals: every kind, the real-event quirks, and garbage."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spotguard_core.contracts import Signal, SignalKind, SignalSource
from spotguard_core.signals import Rejection, instance_id_from_entity, parse_event
from spotguard_tools import events

EVENTS = Path(__file__).resolve().parents[1] / "events"
INSTANCE = "i-1234567890abcdef0"


def load(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


def signals_of(event: object, **kwargs: str) -> list[Signal]:
    parsed = parse_event(event if isinstance(event, str) else json.dumps(event), **kwargs)
    assert not isinstance(parsed, Rejection), parsed
    return parsed


def test_spot_warning_takes_ids_from_detail_not_the_az_arn():
    event = load("spot_interruption_warning")
    assert event["resources"][0] == f"arn:aws:ec2:us-east-1a:instance/{INSTANCE}"  # the real quirk
    [signal] = signals_of(event)
    assert signal.kind is SignalKind.SPOT_INTERRUPTION
    assert signal.instance_id == INSTANCE
    assert signal.account == "123456789012" and signal.region == "us-east-1"
    assert signal.event_time == datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    assert signal.deadline == signal.event_time + timedelta(minutes=2)
    assert signal.state == "terminate"
    assert signal.source is SignalSource.EVENTBRIDGE


@pytest.mark.parametrize(
    ("name", "kind", "state"),
    [
        ("rebalance_recommendation", SignalKind.REBALANCE, None),
        ("state_change_terminated", SignalKind.STATE_CHANGE, "terminated"),
        ("lifecycle_launch", SignalKind.LIFECYCLE_LAUNCH, "launch"),
        ("lifecycle_terminate", SignalKind.LIFECYCLE_TERMINATE, "terminate"),
    ],
)
def test_each_sample_event_parses(name, kind, state):
    [signal] = signals_of(load(name))
    assert signal.kind is kind and signal.state == state and signal.instance_id == INSTANCE


def test_lifecycle_attributes_are_kept():
    [signal] = signals_of(load("lifecycle_launch"))
    assert signal.attributes["asg_name"] == "spotguard-render"
    assert signal.attributes["hook_name"] == "spotguard-launch"
    assert signal.attributes["token"] == "87654321-4321-4321-4321-210987654321"


def test_health_event_without_resources_names_instances_by_arn_and_id():
    event = load("health_scheduled_change")
    assert "resources" not in event
    found = signals_of(event)
    assert [s.instance_id for s in found] == [INSTANCE, "i-0fedcba0987654321"]
    assert all(s.kind is SignalKind.HEALTH_SCHEDULED for s in found)
    assert found[0].deadline == datetime(2026, 11, 27, 6, 2, 51, tzinfo=UTC)  # RFC 1123 date
    assert len({s.idempotency_key() for s in found}) == 2


def test_non_ec2_or_non_scheduled_health_events_are_rejected():
    event = load("health_scheduled_change")
    event["detail"]["eventTypeCategory"] = "issue"
    parsed = parse_event(json.dumps(event))
    assert isinstance(parsed, Rejection) and parsed.category == "not_applicable"


def test_builders_produce_what_the_parser_takes():
    built = [
        events.spot_interruption_warning(INSTANCE),
        events.rebalance_recommendation(INSTANCE),
        events.state_change(INSTANCE, "stopping"),
        events.lifecycle_action(INSTANCE, transition="launch", asg_name="g", hook_name="h"),
        events.lifecycle_action(INSTANCE, transition="terminate", asg_name="g", hook_name="h"),
        events.health_scheduled_change([INSTANCE], use_arns=True, include_resources=False),
    ]
    kinds = [signals_of(e)[0].kind for e in built]
    assert kinds == [
        SignalKind.SPOT_INTERRUPTION,
        SignalKind.REBALANCE,
        SignalKind.STATE_CHANGE,
        SignalKind.LIFECYCLE_LAUNCH,
        SignalKind.LIFECYCLE_TERMINATE,
        SignalKind.HEALTH_SCHEDULED,
    ]


def test_spot_warning_builder_action_time_sets_event_time():
    action_time = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    [signal] = signals_of(events.spot_interruption_warning(INSTANCE, action_time=action_time))
    assert signal.deadline == action_time


def test_test_source_parses_the_same_way():
    [real] = signals_of(events.spot_interruption_warning(INSTANCE, event_id="e1"))
    [test] = signals_of(events.spot_interruption_warning(INSTANCE, event_id="e1", source="spotguard.test"))
    assert test.source is SignalSource.TEST
    assert (test.kind, test.instance_id, test.deadline is not None) == (real.kind, real.instance_id, True)


def test_put_events_entry_round_trips_detail():
    event = events.state_change(INSTANCE, "stopped", source="spotguard.test")
    entry = events.to_put_events_entry(event, bus_name="default")
    assert entry["Source"] == "spotguard.test" and entry["EventBusName"] == "default"
    assert json.loads(entry["Detail"]) == event["detail"]


@pytest.mark.parametrize(
    ("body", "category", "needle"),
    [
        ("{not json", "malformed", "not JSON"),
        ("[1, 2]", "malformed", "not an object"),
        (b"\xff\xfe", "malformed", "UTF-8"),
        (json.dumps({"id": "x"}), "malformed", "envelope"),
    ],
)
def test_garbage_is_rejected(body, category, needle):
    parsed = parse_event(body)
    assert isinstance(parsed, Rejection) and parsed.category == category and needle in parsed.reason


def test_unknown_kind_source_and_wrong_account_region():
    event = events.spot_interruption_warning(INSTANCE, account="111122223333", region="eu-west-1")
    parsed = parse_event(json.dumps(event), expected_account="123456789012", expected_region="eu-west-1")
    assert isinstance(parsed, Rejection) and parsed.category == "wrong_account_region"
    assert "wrong account/region" in parsed.reason
    parsed = parse_event(json.dumps(event), expected_region="us-east-1")
    assert isinstance(parsed, Rejection) and parsed.category == "wrong_account_region"
    assert not isinstance(parse_event(json.dumps(event), expected_region="eu-west-1"), Rejection)
    other = dict(event, source="my.app")
    assert isinstance(parse_event(json.dumps(other)), Rejection)
    unknown = dict(event, **{"detail-type": "EC2 Fast Launch State-change Notification"})
    parsed = parse_event(json.dumps(unknown))
    assert isinstance(parsed, Rejection) and parsed.category == "unknown_kind"


def test_bad_instance_ids_are_rejected():
    event = events.spot_interruption_warning(INSTANCE)
    event["detail"]["instance-id"] = "i-XYZ; DROP TABLE"
    parsed = parse_event(json.dumps(event))
    assert isinstance(parsed, Rejection) and "detail.instance-id" in parsed.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (INSTANCE, INSTANCE),
        ("i-0123abcd", "i-0123abcd"),
        (f"arn:aws:ec2:us-east-1:123456789012:instance/{INSTANCE}", INSTANCE),
        ("arn:aws:ec2:us-east-1:123456789012:volume/vol-1", None),
        ("AWS_EC2", None),
    ],
)
def test_instance_id_from_entity(value, expected):
    assert instance_id_from_entity(value) == expected


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON))
def test_parser_never_raises_on_anything(raw):
    body = raw if isinstance(raw, str | bytes) else json.dumps(raw)
    result = parse_event(body)
    assert isinstance(result, Rejection) or all(isinstance(s, Signal) for s in result)


SAMPLES = [
    "spot_interruption_warning",
    "rebalance_recommendation",
    "state_change_terminated",
    "lifecycle_launch",
    "lifecycle_terminate",
    "health_scheduled_change",
]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(SAMPLES),
    path=st.lists(
        st.sampled_from(
            [
                "detail",
                "id",
                "time",
                "source",
                "detail-type",
                "account",
                "region",
                "instance-id",
                "state",
                "EC2InstanceId",
                "affectedEntities",
                "LifecycleTransition",
                "startTime",
                "resources",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=JSON,
)
def test_mutated_samples_parse_or_reject_never_raise(name, path, value):
    event = load(name)
    for key in path:
        target = event["detail"] if key not in event and isinstance(event.get("detail"), dict) else event
        target[key] = copy.deepcopy(value)
    result = parse_event(json.dumps(event), expected_account="123456789012", expected_region="us-east-1")
    if not isinstance(result, Rejection):
        for signal in result:
            assert signal.instance_id.startswith("i-")
            assert signal.account == "123456789012" and signal.region == "us-east-1"
