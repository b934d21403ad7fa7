"""EventBridge routing in the drill: the fleet's rules, built from ``contracts.event_patterns``
exactly as the stack builds them, decide what reaches the signal queue (moto matches the
patterns). What does not match reaches no handler; what matches reaches the dispatcher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from spotguard_core import aws
from spotguard_core.contracts import SignalKind
from spotguard_core.signals import Rejection, parse_event
from spotguard_tools import events
from spotguard_tools.drill.lambda_host import LambdaHost
from spotguard_tools.drill.resources import DrillResources, control_plane_environment, create_resources

pytestmark = pytest.mark.integration

FLEET = "routing"


@pytest.fixture
def fleet(moto_server: Any) -> DrillResources:
    return create_resources(
        fleet=FLEET,
        desired_capacity=0,
        max_capacity=4,
        visibility_timeout_seconds=30,
        sqs=boto3.client("sqs"),
        dynamodb=boto3.client("dynamodb"),
        ec2=boto3.client("ec2"),
        autoscaling=boto3.client("autoscaling"),
        events=boto3.client("events"),
    )


def publish(*batch: dict[str, Any]) -> None:
    reply = boto3.client("events").put_events(Entries=[events.to_put_events_entry(e) for e in batch])
    assert reply["FailedEntryCount"] == 0


def drain_signal_queue(resources: DrillResources) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    bodies: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(
            QueueUrl=resources.signal_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=resources.signal_queue_url, ReceiptHandle=message["ReceiptHandle"])


def test_events_that_do_not_match_reach_no_handler(fleet: DrillResources) -> None:
    publish(
        events.state_change("i-0aaaaaaaaaaaaaaa1", "pending"),
        events.state_change("i-0aaaaaaaaaaaaaaa1", "running"),
        # staging test events are not accepted by the drill's (production-like) rules
        events.spot_interruption_warning("i-0aaaaaaaaaaaaaaa1", source="spotguard.test"),
        # another group's lifecycle action
        events.lifecycle_action(
            "i-0aaaaaaaaaaaaaaa1", transition="launch", asg_name="someone-else", hook_name="their-hook"
        ),
        # an AWS Health event that is not an EC2 scheduled change
        {
            **events.health_scheduled_change(["i-0aaaaaaaaaaaaaaa1"]),
            "detail": {"service": "RDS", "eventTypeCategory": "scheduledChange"},
        },
    )
    assert drain_signal_queue(fleet) == []


def test_events_that_match_reach_the_dispatcher(
    fleet: DrillResources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = "i-0bbbbbbbbbbbbbbb2"
    published = [
        events.spot_interruption_warning(instance, availability_zone="us-east-1b"),
        events.rebalance_recommendation(instance),
        events.state_change(instance, "shutting-down"),
        events.state_change(instance, "terminated"),
        events.lifecycle_action(
            instance, transition="launch", asg_name=fleet.asg_name, hook_name="spotguard-launch"
        ),
        events.health_scheduled_change([instance], use_arns=True, include_resources=False),
    ]
    publish(*published)
    sqs = boto3.client("sqs")
    queued = sqs.get_queue_attributes(
        QueueUrl=fleet.signal_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    assert int(queued) == len(published)

    # Each matched event arrives whole (as AWS delivers it: account included) and parses.
    for env_key, value in control_plane_environment(
        fleet,
        requeue_enabled=True,
        rebalance_policy="replace",
        heartbeat_stale_seconds=60,
        bootstrap_deadline_seconds=60,
        account_id="123456789012",
        region="us-east-1",
    ).items():
        monkeypatch.setenv(env_key, value)
    aws.reset_clients()
    log = tmp_path / "control-plane.jsonl"
    host = LambdaHost(
        signal_queue_url=fleet.signal_queue_url,
        signal_queue_arn=fleet.signal_queue_arn,
        watchdog_interval=60,
        log=log,
    )
    bodies = []
    for message in sqs.receive_message(
        QueueUrl=fleet.signal_queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0
    ).get("Messages", []):
        bodies.append(json.loads(message["Body"]))
    kinds = set()
    for body in bodies:
        assert body["account"] == "123456789012"
        parsed = parse_event(body, expected_account="123456789012", expected_region="us-east-1")
        assert not isinstance(parsed, Rejection), parsed
        kinds.update(signal.kind for signal in parsed)
    assert kinds == {
        SignalKind.SPOT_INTERRUPTION,
        SignalKind.REBALANCE,
        SignalKind.STATE_CHANGE,
        SignalKind.LIFECYCLE_LAUNCH,
        SignalKind.HEALTH_SCHEDULED,
    }

    host.dispatch_once(wait_seconds=1)
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["fn"] == "dispatcher"
    assert record["records"] == len(published)
    # An instance spotguard does not manage: acknowledged at once, never retried.
    assert record["failed"] == []
    assert "error" not in record
    assert drain_signal_queue(fleet) == []
