"""The requeuer against moto: chunks of ten, gone messages, retried entries, the poison counter."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from botocore.exceptions import ClientError
from spotguard_core import aws
from spotguard_core.contracts import EndReason, FleetRecord, InstanceState, Lease, Metric, genuine_failures
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore
from spotguard_core.ports import RecordingMetrics
from spotguard_core.requeue import RequeueIncompleteError, Requeuer
from spotguard_tools.cli import main

from tests.support.sample_events import EVENTS_DIR, SAMPLE_INSTANCE

pytestmark = pytest.mark.integration


class FlakySqs:
    """The real (moto) SQS client, except that the first ``failures`` visibility batches
    answer every entry as throttled without doing anything (what SQS does under load)."""

    def __init__(self, real: Any, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.calls = 0

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            failed = [
                {
                    "Id": e["Id"],
                    "SenderFault": False,
                    "Code": "ThrottlingException",
                    "Message": "Rate exceeded",
                }
                for e in kwargs["Entries"]
            ]
            return {"Successful": [], "Failed": failed}
        return dict(self.real.change_message_visibility_batch(**kwargs))


def test_chunks_of_ten_and_deleted_messages_are_done(cp):
    leases = cp.lease_messages("i-0aaaaaaaaaaaaaaaa", 23)
    for lease in leases[:3]:
        cp.sqs.delete_message(QueueUrl=cp.work_queue_url, ReceiptHandle=lease.receipt_handle)
    sqs = FlakySqs(aws.client("sqs"), failures=0)
    metrics = RecordingMetrics()
    result = Requeuer(lease_store=LeaseStore(), sqs=sqs, metrics=metrics).requeue_instance(
        leases[0].instance_id
    )
    assert sqs.calls == math.ceil(23 / 10)
    assert result.requeued == 20 and result.already_gone == 3 and result.failed == []
    assert metrics.total(Metric.MESSAGES_REQUEUED) == 20
    assert len(cp.receive_all()) == 20
    assert LeaseStore().for_instance(leases[0].instance_id) == []


def test_throttled_entries_are_retried_with_backoff(cp):
    leases = cp.lease_messages("i-0bbbbbbbbbbbbbbbb", 5)
    sqs = FlakySqs(aws.client("sqs"), failures=2)
    requeuer = Requeuer(lease_store=LeaseStore(), sqs=sqs, metrics=RecordingMetrics(), sleep=lambda _: None)
    result = requeuer.requeue_instance(leases[0].instance_id)
    assert sqs.calls == 3 and result.requeued == 5
    assert len(cp.receive_all()) == 5


def test_entries_failing_after_all_retries_keep_their_leases_and_raise(cp):
    leases = cp.lease_messages("i-0cccccccccccccccc", 4)
    sqs = FlakySqs(aws.client("sqs"), failures=100)
    metrics = RecordingMetrics()
    requeuer = Requeuer(lease_store=LeaseStore(), sqs=sqs, metrics=metrics, sleep=lambda _: None)
    with pytest.raises(RequeueIncompleteError):
        requeuer.requeue_instance(leases[0].instance_id)
    assert len(LeaseStore().for_instance(leases[0].instance_id)) == 4  # kept for the retry
    assert metrics.total(Metric.REQUEUE_FAILURES) == 4


def test_interruption_requeues_do_not_count_as_failures(cp):
    """A message requeued twice by interruptions, then received: zero genuine failures."""
    store = LeaseStore()
    requeuer = Requeuer(lease_store=store, sqs=aws.client("sqs"), metrics=RecordingMetrics())
    [first] = cp.lease_messages("i-0dddddddddddddddd", 1)
    requeuer.requeue_instance(first.instance_id)
    # Received again by another instance, which is also interrupted.
    message = cp.sqs.receive_message(
        QueueUrl=cp.work_queue_url, AttributeNames=["ApproximateReceiveCount"], VisibilityTimeout=600
    )["Messages"][0]
    store.put(
        Lease(
            instance_id="i-0eeeeeeeeeeeeeeee",
            message_id=message["MessageId"],
            receipt_handle=message["ReceiptHandle"],
            queue_url=cp.work_queue_url,
            leased_at=0.0,
            heartbeat_at=0.0,
        )
    )
    requeuer.requeue_instance("i-0eeeeeeeeeeeeeeee")
    third = cp.sqs.receive_message(QueueUrl=cp.work_queue_url, AttributeNames=["ApproximateReceiveCount"])[
        "Messages"
    ][0]
    receive_count = int(third["Attributes"]["ApproximateReceiveCount"])
    assert receive_count == 3
    assert genuine_failures(receive_count, store.requeue_count(third["MessageId"])) == 0


def test_explain_reads_the_fleet_record_when_aws_is_configured(cp, capsys, tmp_path):
    [instance] = cp.launch_in_asg(1)
    FleetStore().put(
        FleetRecord(
            instance_id=instance, fleet=cp.fleet, state=InstanceState.ENDED, end_reason=EndReason.TERMINATED
        )
    )
    event_file = EVENTS_DIR / "spot_interruption_warning.json"
    text = event_file.read_text().replace(SAMPLE_INSTANCE, instance)
    path = tmp_path / "event.json"
    path.write_text(text)
    code = main(["explain", str(path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["signals"][0]["fleet_record"]["state"] == "ended"
    assert [a["action"] for a in out["actions"]] == ["CorrectEndReason"]
    assert out["notes"] == []
    # Explaining takes no action: the record is unchanged.
    assert FleetStore().get(instance).end_reason is EndReason.TERMINATED  # type: ignore[union-attr]


def _known_count_leases(cp, instance_id: str, count: int, requeues: int) -> list[Lease]:
    leases = [
        Lease(
            instance_id=lease.instance_id,
            message_id=lease.message_id,
            receipt_handle=lease.receipt_handle,
            queue_url=lease.queue_url,
            leased_at=lease.leased_at,
            heartbeat_at=lease.heartbeat_at,
            interruption_requeues=requeues,
        )
        for lease in cp.lease_messages(instance_id, count)
    ]
    LeaseStore().put_many(leases)
    return leases


def test_leases_that_know_their_count_are_counted_in_batches_and_only_once(cp):
    """The worker records the message's count in the lease; the requeue then writes count + 1
    for 25 messages a call, and the agent and the control plane requeueing the same lease
    (a drain release racing the dispatcher) count it once, not twice."""
    leases = _known_count_leases(cp, "i-0ffffffffffffffff", 23, requeues=2)
    store = LeaseStore()
    calls: list[str] = []
    store.table.meta.client.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    requeuer = Requeuer(lease_store=store, sqs=aws.client("sqs"), metrics=RecordingMetrics())
    result = requeuer.requeue_leases(leases[0].instance_id, leases)
    assert result.requeued == 23
    # 1 counter batch (25 a call), then 1 lease-delete batch; no UpdateItem, no read-back.
    assert calls == ["BatchWriteItem", "BatchWriteItem"]
    assert store.requeue_counts([lease.message_id for lease in leases]) == {
        lease.message_id: 3 for lease in leases
    }
    requeuer.requeue_leases(leases[0].instance_id, leases)  # the other side, same leases
    assert {store.requeue_count(lease.message_id) for lease in leases} == {3}
    assert len(cp.receive_all()) == 23


def test_a_failure_release_counts_nothing_and_keeps_the_backoff(cp):
    [lease] = _known_count_leases(cp, "i-0aaaaaaaaaaaaaaa1", 1, requeues=0)
    store = LeaseStore()
    Requeuer(lease_store=store, sqs=aws.client("sqs")).release(
        lease.instance_id, [lease], visibility_timeout=30, interruption=False
    )
    assert store.requeue_count(lease.message_id) == 0, "a genuine failure is not an interruption"
    assert store.for_instance(lease.instance_id) == []
    assert cp.receive_all() == [], "invisible for the backoff"


class CountCheckingSqs:
    """The real (moto) SQS client, recording for every visibility change the messages whose
    interruption counter was not written yet (the poison rule says: none, ever)."""

    def __init__(self, real: Any, store: LeaseStore) -> None:
        self.real = real
        self.store = store
        self.uncounted: list[str] = []
        self.calls = 0
        self.message_ids: dict[str, str] = {}  # receipt handle -> message id

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        ids = [self.message_ids[entry["ReceiptHandle"]] for entry in kwargs["Entries"]]
        counts = self.store.requeue_counts(ids)
        self.uncounted.extend(message_id for message_id in ids if counts[message_id] == 0)
        self.calls += 1
        return dict(self.real.change_message_visibility_batch(**kwargs))


class SmallPages(LeaseStore):
    """Query pages of ten leases: a requeue of 27 reads three pages."""

    def release_pages(self, instance_id: str, *, page_size: int = 10) -> Iterator[list[Lease]]:
        return super().release_pages(instance_id, page_size=page_size)


def _leases_on_two_queues(cp, instance_id: str) -> tuple[list[Lease], str]:
    """13 leases on the work queue and 14 on a second queue, written interleaved."""
    second_url = cp.sqs.create_queue(QueueName=f"{cp.fleet}-second-{instance_id[-4:]}")["QueueUrl"]
    first = cp.lease_messages(instance_id, 13)
    for start in range(0, 14, 10):
        entries = [{"Id": str(i), "MessageBody": f"second-{i}"} for i in range(start, min(14, start + 10))]
        cp.sqs.send_message_batch(QueueUrl=second_url, Entries=entries)
    received: list[dict[str, Any]] = []
    while len(received) < 14:
        received += cp.sqs.receive_message(
            QueueUrl=second_url, MaxNumberOfMessages=10, VisibilityTimeout=600
        ).get("Messages", [])
    # Leased like the first queue's messages, on the second queue.
    second = [
        replace(first[0], message_id=m["MessageId"], receipt_handle=m["ReceiptHandle"], queue_url=second_url)
        for m in received
    ]
    leases = [lease for pair in zip(first, second, strict=False) for lease in pair] + second[13:]
    LeaseStore().put_many(leases)
    return leases, second_url


def _slow(**_: Any) -> None:
    time.sleep(0.2)


def test_every_message_is_counted_before_it_becomes_visible_across_queues_and_pages(cp):
    """Counters and visibility changes overlap (each chunk waits only for its own counter
    calls), so the poison rule's order is checked per message: on two queues, over three
    Query pages, no message becomes visible before its counter is written."""
    instance_id = "i-0abcabcabcabcabc1"
    leases, second_url = _leases_on_two_queues(cp, instance_id)
    store = SmallPages()
    sqs = CountCheckingSqs(aws.client("sqs"), LeaseStore())
    sqs.message_ids = {lease.receipt_handle: lease.message_id for lease in leases}
    # Slow counter writes: a visibility change that did not wait for its counters would
    # certainly come first.
    events = store.table.meta.client.meta.events
    events.register("before-call.dynamodb.BatchWriteItem", _slow, unique_id="slow-counters")
    try:
        result = Requeuer(lease_store=store, sqs=sqs, metrics=RecordingMetrics()).requeue_instance(
            instance_id
        )
    finally:
        events.unregister("before-call.dynamodb.BatchWriteItem", unique_id="slow-counters")
    assert result.leases == 27 and result.requeued == 27 and result.failed == []
    assert sqs.uncounted == []
    # Three pages of at most ten, each split by queue into chunks of at most ten.
    assert 3 <= sqs.calls <= 6
    assert store.for_instance(instance_id) == []
    assert len(cp.receive_all()) == 13
    second = cp.sqs.receive_message(QueueUrl=second_url, MaxNumberOfMessages=10)["Messages"]
    second += cp.sqs.receive_message(QueueUrl=second_url, MaxNumberOfMessages=10)["Messages"]
    assert len(second) == 14


class FailingAfterFirstPage(SmallPages):
    """The Query fails (after botocore's retries) once the first page was read."""

    def release_pages(self, instance_id: str, *, page_size: int = 10) -> Iterator[list[Lease]]:
        pages = super().release_pages(instance_id, page_size=page_size)
        yield next(pages)
        raise ClientError({"Error": {"Code": "InternalServerError", "Message": "boom"}}, "Query")


def test_a_query_failing_midway_releases_the_pages_read_then_raises(cp):
    leases = _known_count_leases(cp, "i-0abcabcabcabcabc2", 23, requeues=0)
    store = FailingAfterFirstPage()
    requeuer = Requeuer(lease_store=store, sqs=aws.client("sqs"), metrics=RecordingMetrics())
    with pytest.raises(ClientError):
        requeuer.requeue_instance(leases[0].instance_id)
    # The first page is back on the queue, its leases gone; the retry finds the other 13.
    assert len(cp.receive_all()) == 10
    assert len(store.for_instance(leases[0].instance_id)) == 13
    result = Requeuer(lease_store=SmallPages(), sqs=aws.client("sqs")).requeue_instance(leases[0].instance_id)
    assert result.requeued == 13
    assert store.for_instance(leases[0].instance_id) == []
