"""Issue 12/13 promises of the dispatcher: one replacement per event, each action deduplicated
on its own fact, drain orders on the fleet record, the poison rule by notice, events as AWS
sends them, and bad items or writes that never stop the batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from spotguard_core import aws
from spotguard_core.contracts import (
    FLEET_TAG_KEY,
    BootstrapStatus,
    EndReason,
    Env,
    InstanceState,
    Metric,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore
from spotguard_tools import events

from tests.integration.control_plane_helpers import Output, dispatch, fleet_record, sample_event, seed_record
from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX, moto_fleet_key

pytestmark = pytest.mark.integration


@pytest.fixture
def notifications(cp) -> Iterator[Any]:
    """The notification bus routed to a queue: returns a function reading what was published."""
    queue = cp.bus_to_queue("notifications", '{"source": ["spotguard"]}')
    sqs = cp.sqs

    def read() -> list[dict[str, Any]]:
        found = []
        while batch := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
            for message in batch:
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        return found

    yield read


def test_a_failed_detach_loses_neither_the_replacement_nor_the_notice(cp, notifications):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    failures = {"left": 1}

    def scaling_in_progress(**_: Any) -> None:
        # What Auto Scaling answers while another scaling activity runs (a real, transient fault).
        if failures["left"]:
            failures["left"] -= 1
            raise ClientError(
                {"Error": {"Code": "ScalingActivityInProgress", "Message": "in progress"}}, "DetachInstances"
            )

    aws.client("autoscaling").meta.events.register(
        "before-call.autoscaling.DetachInstances", scaling_in_progress
    )
    event = sample_event("spot_interruption_warning", instance)

    first = dispatch(event)

    assert len(first["batchItemFailures"]) == 1  # transient: SQS delivers it again
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.DRAINING
    assert record.replacement_requested_at is None and record.interruption_notified_at is None
    assert notifications() == []

    second = dispatch(event)  # the redelivery redoes only what did not happen

    assert second == {"batchItemFailures": []}
    record = fleet_record(instance)
    assert record is not None and record.replacement_requested_at is not None
    assert record.interruption_notified_at is not None
    assert instance not in cp.asg_instance_ids()
    published = notifications()
    assert [n["detail-type"] for n in published] == ["instance.interrupted"]
    assert published[0]["detail"]["instanceId"] == instance  # camelCase payload

    dispatch(sample_event("spot_interruption_warning", instance))  # a second notice (new event id)
    assert notifications() == []  # the notice was sent once


def test_one_instance_gets_at_most_one_replacement(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    capfd.readouterr()
    dispatch(sample_event("rebalance_recommendation", instance))
    members = cp.asg_instance_ids()
    dispatch(
        sample_event("health_scheduled_change", instance), sample_event("spot_interruption_warning", instance)
    )
    assert cp.asg_instance_ids() == members  # no second replacement for later notices
    assert len(members) == 1 and instance not in members
    assert Output(capfd.readouterr().out).metric(Metric.REPLACEMENTS_REQUESTED) == 1


def test_health_change_under_replace_detaches_and_remembers_its_deadline(cp):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    event = sample_event("health_scheduled_change", instance)
    dispatch(event)
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.READY  # keeps working until replaced
    assert record.replacement_requested_at is not None
    assert record.drain_deadline_at is not None and record.drain_deadline_at > time.time() + 86_400


def test_health_change_after_a_rebalance_replacement_is_a_drain_order_by_its_start(cp):
    """Issue 12: a rebalance under ``replace`` detached the instance; a later Health change for
    it must still reach the agent as a drain order whose deadline is the change's start."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("rebalance_recommendation", instance))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.READY and record.replacement_requested_at
    assert record.drain_deadline_at is None

    dispatch(sample_event("health_scheduled_change", instance))
    item = (
        boto3.resource("dynamodb").Table(cp.tables[Env.FLEET_TABLE]).get_item(Key=moto_fleet_key(instance))
    )["Item"]
    assert item["state"] == "draining"
    assert float(item["drain_deadline_at"]) > time.time() + 86_400  # the sample's start time
    assert cp.instance_state(instance) == "running"  # the agent drains it; the watchdog ends it


def test_health_change_under_drain_is_a_drain_order_on_the_fleet_record(cp, monkeypatch):
    monkeypatch.setenv(Env.REBALANCE_POLICY.value, "drain")
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("health_scheduled_change", instance))
    # The agent reads exactly this on its next heartbeat: state draining, by the deadline.
    item = boto3.resource("dynamodb").Table(cp.tables[Env.FLEET_TABLE]).get_item(Key=moto_fleet_key(instance))
    assert item["Item"]["state"] == "draining" and float(item["Item"]["drain_deadline_at"]) > time.time()


def test_capacity_reservation_warning_drains_replaces_and_ends_as_its_reclaim(cp):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    cp.lease_messages(instance, 2)
    dispatch(sample_event("capacity_reservation_interruption", instance))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.DRAINING
    assert record.drain_deadline_at is not None and record.replacement_requested_at is not None
    assert len(LeaseStore().for_instance(instance)) == 2  # nothing taken at the warning
    dispatch(sample_event("state_change_terminated", instance))
    record = fleet_record(instance)
    assert record is not None and record.end_reason is EndReason.CAPACITY_RESERVATION_RECLAIM
    received = cp.receive_all()
    assert len(received) == 2
    assert all(LeaseStore().requeue_count(m["MessageId"]) == 1 for m in received)


def test_state_change_without_version_and_test_notification(cp, capfd, caplog):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    capfd.readouterr()
    response = dispatch(
        events.state_change(instance, "terminated", include_version=False),
        events.autoscaling_test_notification(asg_name=cp.asg_name),
    )
    assert response == {"batchItemFailures": []}
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    rejected = [m for m in caplog.messages if m.startswith("signal rejected")]
    assert len(rejected) == 1 and "TEST_NOTIFICATION" in rejected[0]
    assert "malformed" not in rejected[0]


def test_termination_without_notice_is_not_counted_as_an_interruption(cp):
    """A message that kills its host must reach the DLQ: no notice, no interruption credit."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    leases = cp.lease_messages(instance, 3)
    dispatch(sample_event("state_change_terminated", instance))
    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    assert all(LeaseStore().requeue_count(lease.message_id) == 0 for lease in leases)
    assert fleet_record(instance).end_reason is EndReason.TERMINATED  # type: ignore[union-attr]


def test_a_failed_bootstrap_that_shut_itself_down_is_recorded_and_counted(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    seed_record(
        instance,
        InstanceState.LAUNCHING,
        bootstrap_status=BootstrapStatus.FAILED,
        bootstrap_reason="sha256 mismatch",
    )
    capfd.readouterr()
    dispatch(sample_event("state_change_terminated", instance))
    record = fleet_record(instance)
    assert record is not None and record.end_reason is EndReason.BOOTSTRAP_FAILED
    assert Output(capfd.readouterr().out).metric(Metric.BOOTSTRAP_FAILURES) == 1


def test_a_failure_report_written_before_any_launch_event_is_still_recorded_and_counted(cp, capfd):
    """The user data writes only ``bootstrap_status``/``reason``/``fleet`` (no state yet) when the
    bootstrap fails; the termination that follows must still end it as ``bootstrap_failed``."""
    [instance] = cp.launch_in_asg(1)
    boto3.client("dynamodb").update_item(
        TableName=cp.tables[Env.FLEET_TABLE],
        Key={"pk": {"S": f"{MOTO_INSTANCE_ARN_PREFIX}{instance}"}},
        UpdateExpression="SET bootstrap_status=:s,bootstrap_reason=:r,fleet=:f",
        ExpressionAttributeValues={
            ":s": {"S": "failed"},
            ":r": {"S": "install: unit not active"},
            ":f": {"S": cp.fleet},
        },
    )
    capfd.readouterr()
    dispatch(sample_event("state_change_terminated", instance))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.BOOTSTRAP_FAILED
    assert Output(capfd.readouterr().out).metric(Metric.BOOTSTRAP_FAILURES) == 1


def test_a_tag_alone_does_not_enrol_an_instance(cp, capfd):
    """Issue 13: anyone with ec2:CreateTags can tag an instance; it is managed only in the
    fleet's ASG or with a fleet record."""
    tagged = cp.run_instance(tags={FLEET_TAG_KEY: cp.fleet})
    cp.lease_messages(tagged, 1)
    capfd.readouterr()
    dispatch(
        sample_event("spot_interruption_warning", tagged), sample_event("state_change_terminated", tagged)
    )
    assert FleetStore().get(tagged) is None
    assert len(LeaseStore().for_instance(tagged)) == 1 and cp.receive_all() == []
    assert Output(capfd.readouterr().out).metric(Metric.SIGNALS_UNMANAGED) == 2
    [member] = cp.launch_in_asg(1)  # tagged and in the ASG, no record yet: managed
    dispatch(sample_event("spot_interruption_warning", member))
    assert fleet_record(member).state is InstanceState.DRAINING  # type: ignore[union-attr]


def test_an_unreadable_fleet_record_is_counted_and_the_work_still_requeued(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    boto3.resource("dynamodb").Table(cp.tables[Env.FLEET_TABLE]).put_item(
        Item={**moto_fleet_key(instance), "fleet": cp.fleet, "state": "exploded", "heartbeat_at": "soon"}
    )
    leases = cp.lease_messages(instance, 2)
    capfd.readouterr()
    response = dispatch(sample_event("state_change_terminated", instance))
    assert response == {"batchItemFailures": []}
    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    assert Output(capfd.readouterr().out).metric(Metric.UNREADABLE_TABLE_ITEMS) == 1


def test_a_batch_write_left_unprocessed_is_retried_not_acknowledged(cp):
    """Issue 13: the RuntimeError of lease deletes left unprocessed is transient."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance, InstanceState.DRAINING, interrupted_at=time.time() - 100)
    cp.lease_messages(instance, 2)
    client = aws.resource("dynamodb").meta.client

    def unprocessed(params: dict[str, Any], **_: Any) -> tuple[Any, dict[str, Any]]:
        # DynamoDB under throttling: every item comes back unprocessed.
        return SimpleNamespace(status_code=200, headers={}), {
            "UnprocessedItems": {"t": [{"DeleteRequest": {}}]}
        }

    client.meta.events.register("before-call.dynamodb.BatchWriteItem", unprocessed)
    event = sample_event("state_change_terminated", instance)
    try:
        first = dispatch(event)
    finally:
        client.meta.events.unregister("before-call.dynamodb.BatchWriteItem", unprocessed)
    assert len(first["batchItemFailures"]) == 1
    assert dispatch(event) == {"batchItemFailures": []}
    assert LeaseStore().for_instance(instance) == []
