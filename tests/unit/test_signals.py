"""Parsing EventBridge events into signals: every kind, the real-event quirks, and garbage."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spotguard_core.contracts import (
    INSTANCE_ID_PATTERN,
    SPOT_WARNING_LEAD,
    DetailType,
    Signal,
    SignalKind,
    SignalSource,
    event_patterns,
)
from spotguard_core.signals import Rejection, instance_id_from_entity, parse_event
from spotguard_tools import events

from tests.support.sample_events import SAMPLE_INSTANCE as INSTANCE
from tests.support.sample_events import load_event as load


def signals_of(event: object, **kwargs: Any) -> list[Signal]:
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


def test_test_source_parses_the_same_way_when_test_events_are_allowed():
    [real] = signals_of(events.spot_interruption_warning(INSTANCE, event_id="e1"))
    test_event = events.spot_interruption_warning(INSTANCE, event_id="e1", source="spotguard.test")
    [test] = signals_of(test_event, allow_test_events=True)
    assert test.source is SignalSource.TEST
    assert (test.kind, test.instance_id, test.deadline is not None) == (real.kind, real.instance_id, True)


def test_test_events_are_rejected_unless_allowed():
    parsed = parse_event(json.dumps(events.rebalance_recommendation(INSTANCE, source="spotguard.test")))
    assert isinstance(parsed, Rejection) and parsed.category == "test_events_disabled"
    assert "SPOTGUARD_ALLOW_TEST_EVENTS" in parsed.reason


def test_event_without_version_is_accepted():
    """AWS's documented EC2 state-change example has no ``version``: nothing reads it."""
    event = events.state_change(INSTANCE, "terminated", include_version=False)
    assert "version" not in event
    [signal] = signals_of(event)
    assert signal.kind is SignalKind.STATE_CHANGE and signal.state == "terminated"


def test_capacity_reservation_interruption_is_an_interruption_with_its_deadline():
    moment = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    event = events.capacity_reservation_interruption_warning(
        INSTANCE, time=moment, termination_time=moment + timedelta(seconds=110)
    )
    assert isinstance(event["resources"], str)  # as documented: one ARN, not a list
    [signal] = signals_of(event)
    assert signal.kind is SignalKind.CAPACITY_RESERVATION_INTERRUPTION
    assert signal.deadline == moment + timedelta(seconds=110)
    assert signal.attributes["availability_zone_id"] == "use1-az1"
    without_time = events.capacity_reservation_interruption_warning(INSTANCE, time=moment)
    del without_time["detail"]["instance-termination-time"]
    [fallback] = signals_of(without_time)
    assert fallback.deadline == moment + SPOT_WARNING_LEAD


def test_capacity_reservation_rule_is_in_the_event_patterns():
    patterns = event_patterns(allow_test_events=False)
    assert patterns["capacity-reservation-interruption"]["detail-type"] == [
        DetailType.CAPACITY_RESERVATION_INTERRUPTION.value
    ]


def test_autoscaling_test_notification_is_not_applicable_not_malformed():
    parsed = parse_event(json.dumps(events.autoscaling_test_notification(asg_name="spotguard-render")))
    assert isinstance(parsed, Rejection) and parsed.category == "not_applicable"
    assert "TEST_NOTIFICATION" in parsed.reason


def test_hibernate_warning_deadline_is_the_event_time():
    moment = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    [hibernate] = signals_of(events.spot_interruption_warning(INSTANCE, action="hibernate", time=moment))
    assert hibernate.deadline == moment
    [stop] = signals_of(events.spot_interruption_warning(INSTANCE, action="stop", time=moment))
    assert stop.deadline == moment + SPOT_WARNING_LEAD


def test_spot_warning_zone_comes_from_its_resource_arn():
    [signal] = signals_of(events.spot_interruption_warning(INSTANCE, availability_zone="us-east-1c"))
    assert signal.attributes["availability_zone"] == "us-east-1c"


def test_one_instance_id_pattern_everywhere():
    assert re.fullmatch(INSTANCE_ID_PATTERN, "i-0123abcd")
    assert re.fullmatch(INSTANCE_ID_PATTERN, INSTANCE)
    assert not re.fullmatch(INSTANCE_ID_PATTERN, "i-0123456789abc")  # 13 digits: neither 8 nor 17
    event = events.spot_interruption_warning("i-0123456789abc")
    assert isinstance(parse_event(json.dumps(event)), Rejection)


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
