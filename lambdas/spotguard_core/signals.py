"""EventBridge events → ``contracts.Signal`` (or a ``Rejection`` with a reason).

Every event kind has a typed model (pydantic, on Powertools Parser's ``EventBridgeModel``
envelope: the parser models are plain pydantic, no Lambda runtime is involved). Parsing
never raises: garbage, unknown kinds, missing fields and events from another account or
region become a ``Rejection`` the dispatcher acknowledges with a log line and a metric,
so one bad record cannot poison a batch.

Real events differ from templates, and the models take what real events send:

- the spot warning's resource ARN carries the AZ and no account, so ids come from
  ``detail`` and account/region from the envelope, never from ARNs;
- AWS's own example of an EC2 state-change event has no ``version``, and nothing here reads
  it: it is optional; the capacity-reservation example writes ``resources`` as one string;
- ``autoscaling:TEST_NOTIFICATION`` (sent when a lifecycle hook's notification target is
  set up) is harmless: rejected as ``not_applicable``, not as malformed;
- a ``hibernate`` spot warning has no two-minute lead (hibernation starts at once): its
  deadline is the event time;
- AWS Health names instances by bare id or by instance ARN in
  ``affectedEntities[].entityValue``, may omit the top-level ``resources``, and writes
  dates as RFC 1123 (``Fri, 27 Jan 2023 06:02:51 GMT``); one event may affect several
  instances and yields one signal per instance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spotguard_core.contracts import (
    INSTANCE_ID_PATTERN,
    SPOT_WARNING_LEAD,
    TEST_EVENT_SOURCE,
    DetailType,
    Env,
    Signal,
    SignalKind,
    SignalSource,
)

#: Pydantic field pattern: the whole value is one instance id.
_INSTANCE_ID_FIELD = f"^{INSTANCE_ID_PATTERN}$"
_INSTANCE_ID = re.compile(_INSTANCE_ID_FIELD)
_INSTANCE_ARN = re.compile(rf"^arn:aws[a-z-]*:ec2:[^:]*:[^:]*:instance/({INSTANCE_ID_PATTERN})$")
#: The spot warning's resource ARN carries the availability zone: ``arn:aws:ec2:us-east-1a:instance/i-…``.
_ZONE_ARN = re.compile(r"^arn:aws[a-z-]*:ec2:([a-z]{2}(?:-[a-z]+)+-\d+[a-z]):[^:]*:?instance/")
#: Sent to a lifecycle hook's notification target when the hook is set up; nothing to do.
AUTOSCALING_TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
#: A hibernating spot instance starts hibernating at the warning: no lead time.
HIBERNATE_ACTION = "hibernate"

AWS_SOURCES: Mapping[DetailType, str] = {
    DetailType.SPOT_INTERRUPTION: "aws.ec2",
    DetailType.CAPACITY_RESERVATION_INTERRUPTION: "aws.ec2",
    DetailType.REBALANCE: "aws.ec2",
    DetailType.STATE_CHANGE: "aws.ec2",
    DetailType.LIFECYCLE_LAUNCH: "aws.autoscaling",
    DetailType.LIFECYCLE_TERMINATE: "aws.autoscaling",
    DetailType.HEALTH: "aws.health",
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event produced no signal. ``category`` is a stable word for logs and tests."""

    reason: str
    #: "malformed" | "unknown_kind" | "wrong_account_region" | "not_applicable" | "test_events_disabled"
    category: str
    event_id: str | None = None
    detail_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rejected": True,
            "reason": self.reason,
            "category": self.category,
            "event_id": self.event_id,
            "detail_type": self.detail_type,
        }


ParseResult = list[Signal] | Rejection


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
class _Detail(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, str_strip_whitespace=True)


class Envelope(EventBridgeModel):
    """EventBridge envelope. Health events may have no ``resources``: default to none;
    ``version`` is not read and may be absent (AWS's own state-change example has none)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    version: str | None = None  # type: ignore[assignment]
    resources: list[str] = Field(default_factory=list)
    detail: dict[str, Any]

    @field_validator("resources", mode="before")
    @classmethod
    def _one_resource(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class SpotWarningDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=_INSTANCE_ID_FIELD)
    instance_action: str = Field(alias="instance-action", min_length=1)


class CapacityReservationWarningDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=_INSTANCE_ID_FIELD)
    instance_action: str = Field(default="terminate", alias="instance-action", min_length=1)
    termination_time: datetime | None = Field(default=None, alias="instance-termination-time")
    zone_id: str | None = Field(default=None, alias="azId")

    @field_validator("termination_time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


class RebalanceDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=_INSTANCE_ID_FIELD)


class StateChangeDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=_INSTANCE_ID_FIELD)
    state: str = Field(min_length=1)


class LifecycleDetail(_Detail):
    instance_id: str = Field(alias="EC2InstanceId", pattern=_INSTANCE_ID_FIELD)
    asg_name: str = Field(alias="AutoScalingGroupName", min_length=1)
    hook_name: str = Field(alias="LifecycleHookName", min_length=1)
    transition: str = Field(alias="LifecycleTransition", min_length=1)
    token: str | None = Field(default=None, alias="LifecycleActionToken")
    metadata: str | None = Field(default=None, alias="NotificationMetadata")


class AffectedEntity(_Detail):
    entity_value: str = Field(alias="entityValue")


def _health_time(value: Any) -> datetime | None:
    """AWS Health dates are RFC 1123 strings; accept ISO 8601 too."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class HealthDetail(_Detail):
    service: str
    event_type_category: str = Field(alias="eventTypeCategory")
    event_type_code: str = Field(alias="eventTypeCode", min_length=1)
    event_arn: str | None = Field(default=None, alias="eventArn")
    start_time: datetime | None = Field(default=None, alias="startTime")
    end_time: datetime | None = Field(default=None, alias="endTime")
    affected_entities: list[AffectedEntity] = Field(default_factory=list, alias="affectedEntities")

    @field_validator("start_time", "end_time", mode="before")
    @classmethod
    def _parse_time(cls, value: Any) -> datetime | None:
        return _health_time(value)


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------
def _short(error: ValidationError, prefix: str = "") -> str:
    parts = []
    for item in error.errors()[:3]:
        where = prefix + (".".join(str(p) for p in item.get("loc", ())) or "event")
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def instance_id_from_entity(value: str) -> str | None:
    """A bare instance id or an instance ARN → the id; anything else → None."""
    value = value.strip()
    if _INSTANCE_ID.match(value):
        return value
    match = _INSTANCE_ARN.match(value)
    return match.group(1) if match else None


def parse_event(
    raw: str | bytes | Mapping[str, Any] | Any,
    *,
    expected_account: str | None = None,
    expected_region: str | None = None,
    received_at: datetime | None = None,
    allow_test_events: bool = False,
) -> ParseResult:
    """One EventBridge event → its signals (one per affected instance), or a ``Rejection``.

    Events with source ``spotguard.test`` are rejected unless ``allow_test_events`` (staging:
    the dispatcher passes ``ControlSettings.allow_test_events``). Never raises for any input.
    """
    received = received_at or datetime.now(UTC)
    try:
        result = _parse(raw, expected_account, expected_region, received)
        if (
            not allow_test_events
            and not isinstance(result, Rejection)
            and any(signal.source is SignalSource.TEST for signal in result)
        ):
            return Rejection(
                f"test event (source {TEST_EVENT_SOURCE}) while test events are disabled "
                f"({Env.ALLOW_TEST_EVENTS.value} is not true)",
                "test_events_disabled",
                result[0].event_id,
            )
        return result
    except Exception as error:  # noqa: BLE001 - the contract is "never raises": a bug rejects, never poisons
        return Rejection(f"malformed: unexpected {type(error).__name__}: {error}"[:300], "malformed")


def _parse(  # noqa: PLR0911 - one early return per rejection reason
    raw: Any, expected_account: str | None, expected_region: str | None, received: datetime
) -> ParseResult:
    if isinstance(raw, bytes | bytearray):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Rejection("malformed: body is not UTF-8", "malformed")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            return Rejection("malformed: body is not JSON", "malformed")
    if not isinstance(raw, Mapping):
        return Rejection(f"malformed: event is a JSON {type(raw).__name__}, not an object", "malformed")

    if raw.get("Event") == AUTOSCALING_TEST_NOTIFICATION or (
        isinstance(raw.get("detail"), Mapping)
        and AUTOSCALING_TEST_NOTIFICATION
        in (raw["detail"].get("Event"), raw["detail"].get("LifecycleTransition"))
    ):
        return Rejection(
            f"{AUTOSCALING_TEST_NOTIFICATION}: a lifecycle hook's setup message, nothing to do",
            "not_applicable",
            raw.get("RequestId") if isinstance(raw.get("RequestId"), str) else None,
        )
    raw_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    raw_type = raw.get("detail-type") if isinstance(raw.get("detail-type"), str) else None
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as error:
        return Rejection(f"malformed envelope: {_short(error)}", "malformed", raw_id, raw_type)

    try:
        detail_type = DetailType(envelope.detail_type)
    except ValueError:
        return Rejection(
            f"unknown detail-type {envelope.detail_type!r}", "unknown_kind", envelope.id, envelope.detail_type
        )
    if envelope.source not in (AWS_SOURCES[detail_type], TEST_EVENT_SOURCE):
        return Rejection(
            f"unexpected source {envelope.source!r} for {detail_type.value!r}",
            "unknown_kind",
            envelope.id,
            envelope.detail_type,
        )
    if (expected_account and envelope.account != expected_account) or (
        expected_region and envelope.region != expected_region
    ):
        return Rejection(
            f"wrong account/region: event from {envelope.account}/{envelope.region}, "
            f"expected {expected_account or '*'}/{expected_region or '*'}",
            "wrong_account_region",
            envelope.id,
            envelope.detail_type,
        )
    try:
        return _BUILDERS[detail_type](envelope, received)
    except ValidationError as error:
        return Rejection(
            f"malformed detail: {_short(error, 'detail.')}", "malformed", envelope.id, envelope.detail_type
        )


def _base(envelope: Envelope, received: datetime) -> dict[str, Any]:
    return {
        "source": SignalSource.TEST if envelope.source == TEST_EVENT_SOURCE else SignalSource.EVENTBRIDGE,
        "event_id": envelope.id,
        "received_at": received,
        "account": envelope.account,
        "region": envelope.region,
        "event_time": envelope.time,
    }


def _zone_of(envelope: Envelope) -> str | None:
    for resource in envelope.resources:
        match = _ZONE_ARN.match(resource)
        if match:
            return match.group(1)
    return None


def _spot_warning(envelope: Envelope, received: datetime) -> ParseResult:
    detail = SpotWarningDetail.model_validate(envelope.detail)
    hibernating = detail.instance_action.lower() == HIBERNATE_ACTION
    attributes = {"instance_action": detail.instance_action}
    zone = _zone_of(envelope)
    if zone:
        attributes["availability_zone"] = zone
    return [
        Signal(
            instance_id=detail.instance_id,
            kind=SignalKind.SPOT_INTERRUPTION,
            deadline=envelope.time if hibernating else envelope.time + SPOT_WARNING_LEAD,
            state=detail.instance_action,
            attributes=attributes,
            **_base(envelope, received),
        )
    ]


def _capacity_reservation_warning(envelope: Envelope, received: datetime) -> ParseResult:
    detail = CapacityReservationWarningDetail.model_validate(envelope.detail)
    attributes = {"instance_action": detail.instance_action}
    if detail.zone_id:
        attributes["availability_zone_id"] = detail.zone_id
    return [
        Signal(
            instance_id=detail.instance_id,
            kind=SignalKind.CAPACITY_RESERVATION_INTERRUPTION,
            deadline=detail.termination_time or envelope.time + SPOT_WARNING_LEAD,
            state=detail.instance_action,
            attributes=attributes,
            **_base(envelope, received),
        )
    ]


def _rebalance(envelope: Envelope, received: datetime) -> ParseResult:
    detail = RebalanceDetail.model_validate(envelope.detail)
    return [Signal(instance_id=detail.instance_id, kind=SignalKind.REBALANCE, **_base(envelope, received))]


def _state_change(envelope: Envelope, received: datetime) -> ParseResult:
    detail = StateChangeDetail.model_validate(envelope.detail)
    return [
        Signal(
            instance_id=detail.instance_id,
            kind=SignalKind.STATE_CHANGE,
            state=detail.state,
            **_base(envelope, received),
        )
    ]


def _lifecycle(envelope: Envelope, received: datetime) -> ParseResult:
    detail = LifecycleDetail.model_validate(envelope.detail)
    launching = DetailType(envelope.detail_type) is DetailType.LIFECYCLE_LAUNCH
    if launching != detail.transition.endswith("LAUNCHING"):
        return Rejection(
            f"lifecycle transition {detail.transition!r} does not match {envelope.detail_type!r}",
            "malformed",
            envelope.id,
            envelope.detail_type,
        )
    attributes = {"asg_name": detail.asg_name, "hook_name": detail.hook_name, "transition": detail.transition}
    if detail.token:
        attributes["token"] = detail.token
    return [
        Signal(
            instance_id=detail.instance_id,
            kind=SignalKind.LIFECYCLE_LAUNCH if launching else SignalKind.LIFECYCLE_TERMINATE,
            state="launch" if launching else "terminate",
            attributes=attributes,
            **_base(envelope, received),
        )
    ]


def _health(envelope: Envelope, received: datetime) -> ParseResult:
    detail = HealthDetail.model_validate(envelope.detail)
    if detail.service.upper() != "EC2" or detail.event_type_category != "scheduledChange":
        return Rejection(
            f"health event {detail.service}/{detail.event_type_category} is not an EC2 scheduled change",
            "not_applicable",
            envelope.id,
            envelope.detail_type,
        )
    names = [entity.entity_value for entity in detail.affected_entities] + list(envelope.resources)
    instance_ids = list(dict.fromkeys(i for i in (instance_id_from_entity(n) for n in names) if i))
    if not instance_ids:
        return Rejection("health event names no EC2 instance", "malformed", envelope.id, envelope.detail_type)
    attributes = {"event_type_code": detail.event_type_code}
    if detail.event_arn:
        attributes["event_arn"] = detail.event_arn
    return [
        Signal(
            instance_id=instance_id,
            kind=SignalKind.HEALTH_SCHEDULED,
            deadline=detail.start_time,
            attributes=attributes,
            **_base(envelope, received),
        )
        for instance_id in instance_ids
    ]


_BUILDERS: Mapping[DetailType, Callable[[Envelope, datetime], ParseResult]] = {
    DetailType.SPOT_INTERRUPTION: _spot_warning,
    DetailType.CAPACITY_RESERVATION_INTERRUPTION: _capacity_reservation_warning,
    DetailType.REBALANCE: _rebalance,
    DetailType.STATE_CHANGE: _state_change,
    DetailType.LIFECYCLE_LAUNCH: _lifecycle,
    DetailType.LIFECYCLE_TERMINATE: _lifecycle,
    DetailType.HEALTH: _health,
}
