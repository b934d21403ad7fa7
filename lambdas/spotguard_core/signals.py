"""EventBridge events → ``contracts.Signal`` (or a ``Rejection`` with a reason).

Every event kind has a typed model (pydantic, on Powertools Parser's ``EventBridgeModel``
envelope: the parser models are plain pydantic, no Lambda runtime is involved). Parsing
never raises: garbage, unknown kinds, missing fields and events from another account or
region become a ``Rejection`` the dispatcher acknowledges with a log line and a metric,
so one bad record cannot poison a batch.

Real events differ from templates, and the models take what real events send:

- the spot warning's resource ARN carries the AZ and no account, so ids come from
  ``detail`` and account/region from the envelope, never from ARNs;
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
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spotguard_core.contracts import TEST_EVENT_SOURCE, DetailType, Signal, SignalKind, SignalSource

#: EC2 instance ids: ``i-`` and 8 or 17 hex digits.
INSTANCE_ID_PATTERN = r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$"
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
_INSTANCE_ARN = re.compile(r"^arn:aws[a-z-]*:ec2:[^:]*:[^:]*:instance/(i-[0-9a-f]+)$")
#: The spot warning carries no action time: the instance goes two minutes after the event.
SPOT_WARNING_LEAD = timedelta(minutes=2)

AWS_SOURCES: Mapping[DetailType, str] = {
    DetailType.SPOT_INTERRUPTION: "aws.ec2",
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
    category: str  # "malformed" | "unknown_kind" | "wrong_account_region" | "not_applicable"
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
    """EventBridge envelope. Health events may have no ``resources``: default to none."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    resources: list[str] = Field(default_factory=list)
    detail: dict[str, Any]

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class SpotWarningDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)
    instance_action: str = Field(alias="instance-action", min_length=1)


class RebalanceDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)


class StateChangeDetail(_Detail):
    instance_id: str = Field(alias="instance-id", pattern=INSTANCE_ID_PATTERN)
    state: str = Field(min_length=1)


class LifecycleDetail(_Detail):
    instance_id: str = Field(alias="EC2InstanceId", pattern=INSTANCE_ID_PATTERN)
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
    if match and _INSTANCE_ID.match(match.group(1)):
        return match.group(1)
    return None


def parse_event(
    raw: str | bytes | Mapping[str, Any] | Any,
    *,
    expected_account: str | None = None,
    expected_region: str | None = None,
    received_at: datetime | None = None,
) -> ParseResult:
    """One EventBridge event → its signals (one per affected instance), or a ``Rejection``.

    Never raises for any input.
    """
    received = received_at or datetime.now(UTC)
    try:
        return _parse(raw, expected_account, expected_region, received)
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


def _spot_warning(envelope: Envelope, received: datetime) -> ParseResult:
    detail = SpotWarningDetail.model_validate(envelope.detail)
    return [
        Signal(
            instance_id=detail.instance_id,
            kind=SignalKind.SPOT_INTERRUPTION,
            deadline=envelope.time + SPOT_WARNING_LEAD,
            state=detail.instance_action,
            attributes={"instance_action": detail.instance_action},
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
    DetailType.REBALANCE: _rebalance,
    DetailType.STATE_CHANGE: _state_change,
    DetailType.LIFECYCLE_LAUNCH: _lifecycle,
    DetailType.LIFECYCLE_TERMINATE: _lifecycle,
    DetailType.HEALTH: _health,
}
