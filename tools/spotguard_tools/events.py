"""Builders of AWS-shaped EventBridge events, for tests, the drill and ``send-test-event``.

Each builder returns the full EventBridge envelope (``version``, ``id``, ``detail-type``,
``source``, ``account``, ``time``, ``region``, ``resources``, ``detail``) exactly as the
AWS documentation's published examples show it, including the quirks of real events:

- the spot interruption warning's resource ARN carries the *availability zone* and no
  account (``arn:aws:ec2:us-east-1b:instance/i-...``) and its ``detail`` has no time: the
  instance goes away two minutes after the event ``time``;
- AWS Health events name affected instances by bare id *or* by instance ARN in
  ``detail.affectedEntities[].entityValue``, may have no top-level ``resources``, and use
  RFC 1123 dates (``Fri, 27 Jan 2023 06:02:51 GMT``) for ``startTime``/``endTime``.

Every builder takes ``source=`` so staging test events (``spotguard.test``) have the same
shape as the real ones, ``time=`` and ``event_id=`` for fixed samples, and
``include_version=False`` drops ``version`` (AWS's own state-change example has none).
These builders are the one way tests, the drill and ``send-test-event`` make events.
Only the standard library (and ``spotguard_core.contracts``) is used.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

from spotguard_core.contracts import SPOT_WARNING_LEAD, DetailType

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc1123(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _envelope(
    *,
    detail_type: str,
    source: str,
    account: str,
    region: str,
    resources: Sequence[str] | None,
    detail: Mapping[str, Any],
    time: datetime | None,
    event_id: str | None,
    include_version: bool = True,
) -> dict[str, Any]:
    event: dict[str, Any] = {"version": "0"} if include_version else {}
    event |= {
        "id": event_id or str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": account,
        "time": _iso(time or datetime.now(UTC)),
        "region": region,
    }
    if resources is not None:
        event["resources"] = list(resources)
    event["detail"] = dict(detail)
    return event


def instance_arn(instance_id: str, *, account: str, region: str) -> str:
    return f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"


def spot_interruption_warning(
    instance_id: str,
    *,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    availability_zone: str | None = None,
    action: Literal["terminate", "stop", "hibernate"] | str = "terminate",
    action_time: datetime | None = None,
    time: datetime | None = None,
    source: str = "aws.ec2",
    event_id: str | None = None,
) -> dict[str, Any]:
    """EC2 Spot Instance Interruption Warning.

    The event carries no action time: the action happens two minutes after ``time``
    (``hibernate``: at ``time``). ``action_time`` (when given and ``time`` is not) sets
    ``time`` to two minutes before it.
    """
    if time is None and action_time is not None:
        time = action_time if action == "hibernate" else action_time - SPOT_WARNING_LEAD
    zone = availability_zone or f"{region}a"
    return _envelope(
        detail_type=DetailType.SPOT_INTERRUPTION.value,
        source=source,
        account=account,
        region=region,
        # Real quirk: the AZ instead of the region, and no account.
        resources=[f"arn:aws:ec2:{zone}:instance/{instance_id}"],
        detail={"instance-id": instance_id, "instance-action": action},
        time=time,
        event_id=event_id,
    )


def capacity_reservation_interruption_warning(
    instance_id: str,
    *,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    availability_zone_id: str = "use1-az1",
    termination_time: datetime | None = None,
    time: datetime | None = None,
    source: str = "aws.ec2",
    event_id: str | None = None,
) -> dict[str, Any]:
    """EC2 Capacity Reservation Instance Interruption Warning (interruptible reservations).

    As documented: ``resources`` is the instance ARN as one string (not a list), and the
    detail carries ``instance-termination-time`` (two minutes after ``time`` by default).
    """
    moment = time or datetime.now(UTC)
    event = _envelope(
        detail_type=DetailType.CAPACITY_RESERVATION_INTERRUPTION.value,
        source=source,
        account=account,
        region=region,
        resources=None,
        detail={
            "instance-id": instance_id,
            "instance-action": "terminate",
            "instance-termination-time": _iso(termination_time or moment + SPOT_WARNING_LEAD),
            "azId": availability_zone_id,
        },
        time=moment,
        event_id=event_id,
    )
    event["resources"] = instance_arn(instance_id, account=account, region=region)
    return event


def autoscaling_test_notification(
    *, asg_name: str, account: str = DEFAULT_ACCOUNT, region: str = DEFAULT_REGION
) -> dict[str, Any]:
    """The message Auto Scaling sends to a lifecycle hook's notification target when the
    hook is set up (not an EventBridge envelope)."""
    return {
        "AccountId": account,
        "RequestId": str(uuid.uuid4()),
        "AutoScalingGroupARN": (
            f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:{uuid.uuid4()}"
            f":autoScalingGroupName/{asg_name}"
        ),
        "AutoScalingGroupName": asg_name,
        "Service": "AWS Auto Scaling",
        "Event": "autoscaling:TEST_NOTIFICATION",
        "Time": _iso(datetime.now(UTC)),
    }


def rebalance_recommendation(
    instance_id: str,
    *,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    time: datetime | None = None,
    source: str = "aws.ec2",
    event_id: str | None = None,
) -> dict[str, Any]:
    """EC2 Instance Rebalance Recommendation."""
    return _envelope(
        detail_type=DetailType.REBALANCE.value,
        source=source,
        account=account,
        region=region,
        resources=[instance_arn(instance_id, account=account, region=region)],
        detail={"instance-id": instance_id},
        time=time,
        event_id=event_id,
    )


def state_change(
    instance_id: str,
    state: str,
    *,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    time: datetime | None = None,
    source: str = "aws.ec2",
    event_id: str | None = None,
    include_version: bool = True,
) -> dict[str, Any]:
    """EC2 Instance State-change Notification (``state``: pending, running, stopping, …)."""
    return _envelope(
        detail_type=DetailType.STATE_CHANGE.value,
        source=source,
        account=account,
        region=region,
        resources=[instance_arn(instance_id, account=account, region=region)],
        detail={"instance-id": instance_id, "state": state},
        time=time,
        event_id=event_id,
        include_version=include_version,
    )


def lifecycle_action(
    instance_id: str,
    *,
    transition: Literal["launch", "terminate"],
    asg_name: str,
    hook_name: str,
    token: str | None = None,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    notification_metadata: str | None = None,
    time: datetime | None = None,
    source: str = "aws.autoscaling",
    event_id: str | None = None,
) -> dict[str, Any]:
    """EC2 Instance-launch / Instance-terminate Lifecycle Action (ASG lifecycle hook)."""
    if transition not in ("launch", "terminate"):
        raise ValueError(f"transition must be 'launch' or 'terminate', not {transition!r}")
    launching = transition == "launch"
    detail: dict[str, Any] = {
        "LifecycleActionToken": token or str(uuid.uuid4()),
        "AutoScalingGroupName": asg_name,
        "LifecycleHookName": hook_name,
        "EC2InstanceId": instance_id,
        "LifecycleTransition": (
            "autoscaling:EC2_INSTANCE_LAUNCHING" if launching else "autoscaling:EC2_INSTANCE_TERMINATING"
        ),
        "Origin": "EC2" if launching else "AutoScalingGroup",
        "Destination": "AutoScalingGroup" if launching else "EC2",
    }
    if notification_metadata is not None:
        detail["NotificationMetadata"] = notification_metadata
    group_arn = (
        f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:{uuid.uuid4()}"
        f":autoScalingGroupName/{asg_name}"
    )
    return _envelope(
        detail_type=(DetailType.LIFECYCLE_LAUNCH if launching else DetailType.LIFECYCLE_TERMINATE).value,
        source=source,
        account=account,
        region=region,
        resources=[group_arn],
        detail=detail,
        time=time,
        event_id=event_id,
    )


def health_scheduled_change(
    instance_ids: Sequence[str],
    *,
    use_arns: bool = False,
    include_resources: bool = True,
    event_type_code: str = "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    account: str = DEFAULT_ACCOUNT,
    region: str = DEFAULT_REGION,
    time: datetime | None = None,
    source: str = "aws.health",
    event_id: str | None = None,
) -> dict[str, Any]:
    """AWS Health Event, EC2 ``scheduledChange`` affecting ``instance_ids``.

    ``use_arns`` names the instances by ARN in ``affectedEntities`` (seen in real events);
    ``include_resources=False`` omits the top-level ``resources`` (also seen).
    """
    now = time or datetime.now(UTC)
    start = start_time or now + timedelta(days=3)
    end = end_time or start + timedelta(hours=3)
    names = [instance_arn(i, account=account, region=region) if use_arns else i for i in instance_ids]
    detail = {
        "eventArn": (
            f"arn:aws:health:{region}::event/EC2/{event_type_code}/{event_type_code}_{uuid.uuid4().hex[:12]}"
        ),
        "service": "EC2",
        "eventTypeCode": event_type_code,
        "eventTypeCategory": "scheduledChange",
        "eventScopeCode": "ACCOUNT_SPECIFIC",
        "communicationId": uuid.uuid4().hex,
        "startTime": _rfc1123(start),
        "endTime": _rfc1123(end),
        "lastUpdatedTime": _rfc1123(now),
        "statusCode": "upcoming",
        "eventRegion": region,
        "eventDescription": [
            {
                "language": "en_US",
                "latestDescription": "EC2 has detected degradation of the underlying hardware hosting "
                "your Amazon EC2 instance. Your instance will be retired after the start time.",
            }
        ],
        "affectedEntities": [
            {"entityValue": name, "lastUpdatedTime": _rfc1123(now), "statusCode": "IMPAIRED"}
            for name in names
        ],
        "affectedAccount": account,
        "page": "1",
        "totalPages": "1",
    }
    return _envelope(
        detail_type=DetailType.HEALTH.value,
        source=source,
        account=account,
        region=region,
        resources=list(instance_ids) if include_resources else None,
        detail=detail,
        time=now,
        event_id=event_id,
    )


def to_put_events_entry(event: Mapping[str, Any], bus_name: str | None = None) -> dict[str, Any]:
    """The ``PutEvents`` entry that makes EventBridge deliver ``event``'s source, type and detail.

    EventBridge assigns its own ``id``, ``account``, ``region`` and ``version``; ``time`` and
    ``resources`` are kept.
    """
    entry: dict[str, Any] = {
        "Source": event["source"],
        "DetailType": event["detail-type"],
        "Detail": json.dumps(event.get("detail", {}), sort_keys=True),
        "Resources": [resources]
        if isinstance(resources := event.get("resources", []), str)
        else list(resources),
    }
    if event.get("time"):
        entry["Time"] = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
    if bus_name:
        entry["EventBusName"] = bus_name
    return entry


def to_sqs_record(event: Mapping[str, Any], *, queue_arn: str | None = None) -> dict[str, Any]:
    """One Lambda SQS-event record whose body is ``event`` (what EventBridge → SQS delivers)."""
    body = json.dumps(event)
    message_id = str(uuid.uuid4())
    return {
        "messageId": message_id,
        "receiptHandle": f"handle-{message_id}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": str(int(datetime.now(UTC).timestamp() * 1000)),
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": str(int(datetime.now(UTC).timestamp() * 1000)),
        },
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn or f"arn:aws:sqs:{DEFAULT_REGION}:{DEFAULT_ACCOUNT}:spotguard-signals",
        "awsRegion": DEFAULT_REGION,
    }


def to_sqs_event(*bodies: Mapping[str, Any] | str) -> dict[str, Any]:
    """A Lambda SQS event (``{"Records": [...]}``); a ``str`` body is used verbatim (garbage tests)."""
    records = []
    for body in bodies:
        if isinstance(body, str):
            record = to_sqs_record({})
            record["body"] = body
        else:
            record = to_sqs_record(body)
        records.append(record)
    return {"Records": records}
