"""The real dispatcher handler, driven through the SQS-record format against moto."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from spotguard_core import aws
from spotguard_core.contracts import (
    EndReason,
    Env,
    InstanceState,
    Metric,
)
from spotguard_core.lease_store import LeaseStore
from spotguard_core.local_context import LocalLambdaContext
from spotguard_tools import events

from tests.integration.control_plane_helpers import (
    Output,
    busy_instance,
    dispatch,
    fleet_record,
    sample_event,
    seed_record,
)

pytestmark = pytest.mark.integration


def test_spot_warning_drains_detaches_and_keeps_leases(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    leases = cp.lease_messages(instance, 3)
    event = sample_event("spot_interruption_warning", instance)

    response = dispatch(event)

    assert response == {"batchItemFailures": []}
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.DRAINING
    assert record.drain_deadline_at is not None and record.interrupted_at is not None
    assert record.drain_deadline_at - record.interrupted_at == pytest.approx(120)
    assert record.replacement_requested_at is not None
    # Detached without decrementing: moto launches a replacement into the group.
    members = cp.asg_instance_ids()
    assert instance not in members and len(members) == 1
    # The warning does not steal running tasks: leases stay, messages stay invisible.
    assert len(LeaseStore().for_instance(instance)) == len(leases)
    assert cp.receive_all() == []
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.INTERRUPTION_WARNINGS) == 1
    assert out.metric(Metric.REPLACEMENTS_REQUESTED) == 1


def test_state_change_requeues_all_25_leases_at_once(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("spot_interruption_warning", instance))
    leases = cp.lease_messages(instance, 25)
    # The worker finished one task already and deleted its message (the lease is stale).
    cp.sqs.delete_message(QueueUrl=cp.work_queue_url, ReceiptHandle=leases[0].receipt_handle)
    capfd.readouterr()

    response = dispatch(sample_event("state_change_terminated", instance))

    assert response == {"batchItemFailures": []}
    received = cp.receive_all()
    assert {m["MessageId"] for m in received} == {lease.message_id for lease in leases[1:]}
    assert LeaseStore().for_instance(instance) == []
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.SPOT_RECLAIM and record.ec2_state == "terminated"
    store = LeaseStore()
    assert all(store.requeue_count(lease.message_id) == 1 for lease in leases)
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.MESSAGES_REQUEUED) == 24
    assert out.metric(Metric.REQUEUE_LATENCY) >= 0
    assert out.metric(Metric.INSTANCES_ENDED) == 1


def test_duplicate_delivery_changes_nothing_more(cp, capfd):
    [instance] = cp.launch_in_asg(1)
    # Warned first, so the requeue counts as an interruption (poison rule): exactly once.
    seed_record(instance, InstanceState.DRAINING, interrupted_at=time.time() - 100)
    cp.lease_messages(instance, 5)
    event = sample_event("state_change_terminated", instance)
    dispatch(event)
    first = fleet_record(instance)
    received = cp.receive_all()
    assert len(received) == 5
    capfd.readouterr()

    # The same event again (EventBridge delivers at least once), in one batch and in another.
    response = dispatch(event, event)

    assert response == {"batchItemFailures": []}
    assert fleet_record(instance) == first
    assert cp.receive_all() == []  # still held by the other consumer: nothing requeued again
    assert LeaseStore().requeue_count(received[0]["MessageId"]) == 1
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.SIGNALS_DUPLICATE) == 2
    assert out.metric(Metric.MESSAGES_REQUEUED) == 0


def test_out_of_order_warning_after_termination_keeps_it_ended(cp):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("state_change_terminated", instance))
    dispatch(sample_event("spot_interruption_warning", instance))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    # The late warning tells why it ended, but never moves the record back to draining.
    assert record.end_reason is EndReason.SPOT_RECLAIM
    assert instance in cp.asg_instance_ids()  # no replacement for an instance already gone


def test_lifecycle_launch_records_bootstrap_deadline(cp):
    [instance] = cp.launch_in_asg(1)
    event = sample_event("lifecycle_launch", instance)
    dispatch(event)
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.LAUNCHING
    assert record.launched_at is not None and record.bootstrap_deadline_at is not None
    assert record.bootstrap_deadline_at - record.launched_at == 1200


def test_lifecycle_terminate_marks_draining_and_scale_in(cp):
    instance = busy_instance(cp, leases=2)
    dispatch(sample_event("lifecycle_terminate", instance))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.DRAINING
    assert len(LeaseStore().for_instance(instance)) == 2  # the agent drains; nothing stolen
    dispatch(sample_event("state_change_terminated", instance))
    record = fleet_record(instance)
    assert record is not None and record.end_reason is EndReason.SCALE_IN
    assert len(cp.receive_all()) == 2


@pytest.mark.parametrize("policy", ["ignore", "replace", "drain"])
def test_rebalance_follows_policy(cp, monkeypatch, policy):
    monkeypatch.setenv(Env.REBALANCE_POLICY.value, policy)
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("rebalance_recommendation", instance))
    record = fleet_record(instance)
    assert record is not None
    detached = instance not in cp.asg_instance_ids()
    assert detached is (policy != "ignore")
    expected = InstanceState.DRAINING if policy == "drain" else InstanceState.READY
    assert record.state is expected


def test_health_event_by_arn_without_resources_affects_every_named_instance(cp, monkeypatch):
    monkeypatch.setenv(Env.REBALANCE_POLICY.value, "drain")
    first, second = cp.launch_in_asg(2)
    seed_record(first)
    seed_record(second)
    event = sample_event("health_scheduled_change", first, second_instance_id=second)
    assert "resources" not in event
    dispatch(event)
    for instance in (first, second):
        record = fleet_record(instance)
        assert record is not None and record.state is InstanceState.DRAINING
        assert record.drain_deadline_at is not None
    assert first not in cp.asg_instance_ids() and second not in cp.asg_instance_ids()


def test_requeue_disabled_is_the_baseline(cp, monkeypatch):
    monkeypatch.setenv(Env.REQUEUE_ENABLED.value, "false")
    instance = busy_instance(cp, leases=3)
    dispatch(sample_event("state_change_terminated", instance))
    assert cp.receive_all() == []
    assert len(LeaseStore().for_instance(instance)) == 3
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED


def test_test_source_events_parse_the_same_in_staging(cp, monkeypatch):
    monkeypatch.setenv(Env.ALLOW_TEST_EVENTS.value, "true")
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("spot_interruption_warning", instance, source="spotguard.test"))
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.DRAINING
    assert record.last_signal is not None and record.last_signal["source"] == "test"


def test_test_events_are_rejected_when_staging_is_off(cp, capfd, caplog):
    """Issue 13: the rule gates test events, and the dispatcher too (defence in depth)."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    capfd.readouterr()
    response = dispatch(sample_event("spot_interruption_warning", instance, source="spotguard.test"))
    assert response == {"batchItemFailures": []}
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.READY
    assert instance in cp.asg_instance_ids()
    assert Output(capfd.readouterr().out).metric(Metric.SIGNALS_REJECTED) == 1
    assert any("test events are disabled" in m for m in caplog.messages)


def test_notification_is_published_on_the_bus(cp):
    # Route the bus to a queue so the published instance.interrupted event can be read.
    queue = cp.bus_to_queue("notifications", '{"source": ["spotguard"]}')
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    dispatch(sample_event("spot_interruption_warning", instance))
    messages = cp.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
    assert len(messages) == 1
    assert "instance.interrupted" in messages[0]["Body"] and instance in messages[0]["Body"]


class InFlight:
    """The most calls of one operation in flight at once (botocore hooks), each held a
    moment, so that records handled at the same time are seen at the same time."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.lock = threading.Lock()

    def before(self, **_: Any) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.1)

    def after(self, **_: Any) -> None:
        with self.lock:
            self.now -= 1


def _failing_visibility(receipt_handles: set[str]) -> Any:
    """A before-call hook answering visibility changes of these messages with a 500."""

    def hook(params: dict[str, Any], **_: Any) -> Any:
        entries = json.loads(params["body"])["Entries"]  # the request as sent (SQS's JSON protocol)
        if any(entry["ReceiptHandle"] in receipt_handles for entry in entries):
            error = {"Error": {"Code": "InternalError", "Message": "injected"}, "ResponseMetadata": {}}
            return AWSResponse("http://127.0.0.1", 500, {}, None), error
        return None

    return hook


def test_a_mass_interruption_batch_runs_its_records_at_once_and_fails_only_its_failed_record(cp, capfd):
    """Six warned instances terminated in one batch: their records overlap, each is
    requeued and recorded once (idempotency per record), and the one whose visibility
    changes keep failing is the only batch item failure (its leases kept for the retry)."""
    from spotguard_functions import dispatcher  # noqa: PLC0415 - imported once the env is set

    instances = cp.launch_in_asg(6)
    leases = {}
    for instance in instances:
        seed_record(instance, InstanceState.DRAINING, interrupted_at=time.time() - 100)
        leases[instance] = cp.lease_messages(instance, 2)
    failing = instances[0]
    in_flight = InFlight()
    ddb_events = aws.resource("dynamodb").meta.client.meta.events
    ddb_events.register("before-call.dynamodb.GetItem", in_flight.before)
    ddb_events.register("after-call.dynamodb.GetItem", in_flight.after)
    hook = _failing_visibility({lease.receipt_handle for lease in leases[failing]})
    aws.client("sqs").meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", hook)
    event = events.to_sqs_event(*(sample_event("state_change_terminated", i) for i in instances))

    response = dispatcher.handler(event, LocalLambdaContext())

    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert in_flight.most >= 2, "the records were handled one after another"
    assert len(cp.receive_all()) == 2 * 5
    for instance in instances[1:]:
        record = fleet_record(instance)
        assert record is not None and record.state is InstanceState.ENDED
        assert LeaseStore().for_instance(instance) == []
        assert {LeaseStore().requeue_count(lease.message_id) for lease in leases[instance]} == {1}
    assert len(LeaseStore().for_instance(failing)) == 2
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.SIGNALS_RECEIVED) == 6
    assert out.metric(Metric.MESSAGES_REQUEUED) == 10
    assert out.metric(Metric.INSTANCES_ENDED) == 5


def test_signals_of_one_instance_in_one_batch_run_in_batch_order(cp):
    """A warning and the termination in one batch: the termination is decided on what the
    warning wrote (the instance was warned), so its requeue counts as an interruption."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    leases = cp.lease_messages(instance, 3)

    response = dispatch(
        sample_event("spot_interruption_warning", instance), sample_event("state_change_terminated", instance)
    )

    assert response == {"batchItemFailures": []}
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.SPOT_RECLAIM and record.interrupted_at is not None
    assert {LeaseStore().requeue_count(lease.message_id) for lease in leases} == {1}
    assert len(cp.receive_all()) == 3
