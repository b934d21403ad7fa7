"""Fuzz ``signals.parse_event``: any JSON-shaped event and mutations of the real sample
events never raise, and never reach the parser's own catch-all ("unexpected …", a bug
turned into a rejection)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from spotguard_core import contracts
from spotguard_core.contracts import Signal
from spotguard_core.signals import Rejection, parse_event
from spotguard_tools import events

from tests.fuzz.profiles import share
from tests.fuzz.strategies import json_values, mutated

INSTANCE = "i-0123456789abcdef0"
SAMPLES: list[dict[str, Any]] = [
    events.spot_interruption_warning(INSTANCE),
    events.rebalance_recommendation(INSTANCE),
    events.state_change(INSTANCE, "stopping"),
    events.state_change(INSTANCE, "terminated"),
    events.lifecycle_action(INSTANCE, transition="launch", asg_name="workers", hook_name="launch"),
    events.lifecycle_action(INSTANCE, transition="terminate", asg_name="workers", hook_name="drain"),
    events.health_scheduled_change([INSTANCE, "i-0fedcba9876543210"]),
    events.health_scheduled_change([INSTANCE], use_arns=True),
]
_INSTANCE_ID = re.compile(rf"^{contracts.INSTANCE_ID_PATTERN}$")
RECEIVED = datetime(2026, 1, 15, 10, 45, tzinfo=UTC)


def check(raw: Any) -> None:
    result = parse_event(
        raw, expected_account="123456789012", expected_region="us-east-1", received_at=RECEIVED
    )
    if isinstance(result, Rejection):
        # parse_event's own catch-all writes "malformed: unexpected <Exception>": a bug it caught
        assert not result.reason.startswith("malformed: unexpected "), result.reason
        assert result.category in {"malformed", "unknown_kind", "wrong_account_region", "not_applicable"}
        return
    assert isinstance(result, list) and result
    for signal in result:
        assert isinstance(signal, Signal)
        assert _INSTANCE_ID.match(signal.instance_id), signal.instance_id


def as_wire(value: Any, form: str) -> Any:
    """The event as the dispatcher may get it: a dict, or its JSON text or bytes."""
    if form == "dict":
        return value
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return value
    return text if form == "text" else text.encode()


def test_samples_parse_to_signals():
    for sample in SAMPLES:
        result = parse_event(sample, received_at=RECEIVED)
        assert isinstance(result, list) and result, result


@share(0.4)
@given(event=json_values, form=st.sampled_from(["dict", "text", "bytes"]))
def test_any_json_event(event, form, count_inputs):
    count_inputs["signals.parse_event"] += 1
    check(as_wire(event, form))


@share(0.5)
@given(
    event=st.sampled_from(SAMPLES).flatmap(mutated),
    form=st.sampled_from(["dict", "text", "bytes"]),
)
def test_mutated_sample_events(event, form, count_inputs):
    count_inputs["signals.parse_event"] += 1
    check(as_wire(event, form))


@share(0.1)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_garbage_bytes_and_text(raw, count_inputs):
    count_inputs["signals.parse_event"] += 1
    check(raw)
