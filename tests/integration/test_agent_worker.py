"""The draining worker against the moto server (real HTTP, real SQS visibility semantics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import boto3
import pytest
from spotguard_agent.config import AgentConfig
from spotguard_agent.worker import PREFETCH_MAX_TASK_SECONDS, PROCESS_STOP_ORIGIN, Worker
from spotguard_core.contracts import (
    REQUEUE_COUNTER_ATTRIBUTE,
    Env,
    Lease,
    Metric,
    SignalKind,
    instance_key,
    requeue_counter_key,
)
from spotguard_tools.imds_emulator import ImdsEmulator, running_imds

from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX, MotoClients, moto_fleet_key
from tests.support.workload_env import imds_signal, make_world, moto_agent_config, spot_signal, wait_for

pytestmark = pytest.mark.integration
INSTANCE = "i-0worker0000000001"


@dataclass
class Aws(MotoClients):
    queue_url: str
    dlq_url: str
    lease_table: str
    fleet_table: str

    def send(self, **body: Any) -> str:
        return str(self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(body))["MessageId"])

    def leases(self, instance_id: str = INSTANCE) -> list[dict[str, Any]]:
        table = self.dynamodb.Table(self.lease_table)
        items = table.query(
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": instance_key(instance_id, MOTO_INSTANCE_ARN_PREFIX)},
        )["Items"]
        return list(items)

    def receive(self, wait: int = 0, visibility: int = 30) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            WaitTimeSeconds=wait,
            VisibilityTimeout=visibility,
            AttributeNames=["ApproximateReceiveCount"],
            MaxNumberOfMessages=10,
        )
        return list(response.get("Messages", []))

    def counts(self, url: str | None = None) -> tuple[int, int]:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]), int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )


@pytest.fixture
def aws(moto_server) -> Aws:
    world = make_world()
    return Aws(world.queue_url, world.dlq_url, world.lease_table, world.fleet_table)


def config_for(aws: Aws, **overrides: Any) -> AgentConfig:
    return moto_agent_config(
        fleet="test",
        queue_url=aws.queue_url,
        dlq_url=aws.dlq_url,
        lease_table=aws.lease_table,
        fleet_table=aws.fleet_table,
        **{"concurrency": 2, "failure_backoff_seconds": 1.0, **overrides},
    )


@pytest.fixture
def run_worker() -> Iterator[Any]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(config: AgentConfig, instance_id: str = INSTANCE) -> tuple[Worker, threading.Thread, list[int]]:
        worker = Worker(config, instance_id=instance_id)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker, thread, result

    yield start
    for worker, thread in started:
        worker.request_stop()
        for task in worker.running_tasks():
            task.context.released.set()
        thread.join(timeout=30)


def test_lease_written_before_work_and_removed_after_delete(aws: Aws, run_worker):
    message_id = aws.send(task_id="t1", seconds=1.5)
    worker, _, _ = run_worker(config_for(aws))
    lease_item = wait_for(aws.leases)[0]
    lease = Lease.from_item(lease_item)
    assert lease.message_id == message_id
    assert lease.instance_id == INSTANCE
    assert lease.queue_url == aws.queue_url
    assert lease.receipt_handle
    assert worker.running_tasks(), "the lease exists while the task runs"
    wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=20)
    assert aws.leases() == []
    assert aws.counts() == (0, 0), "deleted on success"
    fleet = aws.dynamodb.Table(aws.fleet_table).get_item(Key=moto_fleet_key(INSTANCE))["Item"]
    assert float(fleet["heartbeat_at"]) > time.time() - 10


def test_visibility_is_extended_while_a_long_task_runs(aws: Aws, run_worker):
    aws.send(task_id="long", seconds=5)
    worker, _, _ = run_worker(config_for(aws, visibility_timeout_seconds=3, concurrency=1))
    first = wait_for(aws.leases)[0]
    # Without the heartbeat (every 1 s) the message would be visible again after 3 s.
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        assert aws.receive() == [], "another consumer must not see a message still being worked on"
        time.sleep(0.25)
    refreshed = aws.leases()[0]
    assert float(refreshed["heartbeat_at"]) > float(first["heartbeat_at"])
    wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 1)
    assert aws.counts() == (0, 0)


def test_drain_finishes_short_tasks_and_releases_long_ones_at_once(aws: Aws, run_worker):
    short_id = aws.send(task_id="short", seconds=1.0)
    long_id = aws.send(task_id="long", seconds=60)
    worker, thread, result = run_worker(config_for(aws))
    wait_for(lambda: len(aws.leases()) == 2)
    # Both handlers have said how long they take (the handler process reports it as the task
    # starts; until then a drain treats the duration as unknown and releases the task).
    wait_for(
        lambda: (
            len(worker.running_tasks()) == 2
            and all(task.expected_seconds is not None for task in worker.running_tasks())
        )
    )
    drained_at = time.monotonic()
    # deadline - margin = 3 s: the 1 s task fits, the 60 s one does not
    worker.drain(spot_signal(INSTANCE, 4.0))
    # Receivable by another consumer right away, not after the 30 s visibility timeout.
    released = wait_for(lambda: aws.receive(visibility=30), timeout=5)
    assert time.monotonic() - drained_at < 3.0  # generous: CI machines are busy
    assert [m["MessageId"] for m in released] == [long_id]
    thread.join(timeout=30)
    assert result == [0], "exits 0 after the drain"
    assert worker.counters[Metric.TASKS_COMPLETED] == 1
    assert worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 1
    assert aws.leases() == []
    assert short_id not in {m["MessageId"] for m in aws.receive()}, "the short task finished and was deleted"
    # The drain release is an interruption, not a failure: it is counted, so the next
    # receive of the long task does not move it toward the DLQ.
    counter = aws.dynamodb.Table(aws.lease_table).get_item(Key=requeue_counter_key(long_id))["Item"]
    assert int(counter[REQUEUE_COUNTER_ATTRIBUTE]) == 1


def test_drain_without_requeue_lets_running_tasks_go_on(aws: Aws, run_worker):
    aws.send(task_id="t", seconds=2.0)
    worker, thread, result = run_worker(config_for(aws, requeue_enabled=False, concurrency=1))
    wait_for(aws.leases)
    worker.drain(spot_signal(INSTANCE, 1.0))
    assert aws.receive() == [], "baseline mode releases nothing early"
    aws.send(task_id="new", seconds=0)
    thread.join(timeout=30)
    assert result == [0]
    assert worker.counters[Metric.TASKS_COMPLETED] == 1, "no new work after the drain"
    assert len(aws.receive()) == 1


def test_failures_back_off_and_only_genuine_failures_reach_the_dlq(aws: Aws, run_worker):
    # A healthy message that three interruptions already made visible again.
    healthy_id = aws.send(task_id="healthy", seconds=0.1)
    for _ in range(3):
        (message,) = aws.receive()
        aws.sqs.change_message_visibility(
            QueueUrl=aws.queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    aws.dynamodb.Table(aws.lease_table).put_item(
        Item={**requeue_counter_key(healthy_id), REQUEUE_COUNTER_ATTRIBUTE: 3}
    )
    failing_id = aws.send(task_id="broken", seconds=0, fail=True)
    worker, _, _ = run_worker(config_for(aws, max_failures=2, concurrency=1))

    wait_for(lambda: worker.counters[Metric.TASKS_FAILED] == 1)
    failed_at = time.monotonic()
    assert aws.leases() == [], "a released message has no lease"
    wait_for(lambda: worker.counters[Metric.TASKS_FAILED] == 2, timeout=30)
    # Backoff: 1 s after the first failure (first_backoff * 2**0).
    assert time.monotonic() - failed_at >= 0.9
    wait_for(lambda: worker.counters[Metric.POISON_MESSAGES] == 1, timeout=30)
    assert worker.counters[Metric.TASKS_COMPLETED] == 1, "receive count 4, 3 interruptions: not poison"
    dead = aws.sqs.receive_message(QueueUrl=aws.dlq_url, MaxNumberOfMessages=10)["Messages"]
    assert [json.loads(m["Body"])["task_id"] for m in dead] == ["broken"]
    assert aws.counts() == (0, 0)
    assert failing_id != healthy_id


def agent_env(aws: Aws, moto_server: Any, imds_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **moto_server.environment(),
        Env.FLEET_NAME.value: "test",
        Env.WORK_QUEUE_URL.value: aws.queue_url,
        Env.WORK_DLQ_URL.value: aws.dlq_url,
        Env.LEASE_TABLE.value: aws.lease_table,
        Env.FLEET_TABLE.value: aws.fleet_table,
        Env.IMDS_URL.value: imds_url,
        Env.IMDS_POLL_SECONDS.value: "0.2",
        Env.HEALTH_PORT.value: "0",
        Env.DRAIN_MARGIN_SECONDS.value: "5",
        Env.CONCURRENCY.value: "1",
        **extra,
    }


@contextmanager
def agent_process(aws: Aws, moto_server: Any, imds: ImdsEmulator, **popen: Any) -> Iterator[subprocess.Popen]:
    """``spotguard_agent.cli run`` as a child process, killed on the way out whatever the test did."""
    process = subprocess.Popen(
        [sys.executable, "-m", "spotguard_agent.cli", "run"],
        env=agent_env(aws, moto_server, imds.url),
        stdout=subprocess.DEVNULL,
        **popen,
    )
    try:
        yield process
    finally:
        process.kill()


def test_sigkill_mid_task_leaves_a_lease_the_control_plane_can_requeue(aws: Aws, moto_server):
    message_id = aws.send(task_id="doomed", seconds=120)
    with (
        running_imds("i-0killed000000001") as imds,
        agent_process(aws, moto_server, imds, stderr=subprocess.PIPE) as process,
    ):
        (item,) = wait_for(lambda: aws.leases("i-0killed000000001"), timeout=40)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    lease = Lease.from_item(item)
    assert lease.message_id == message_id
    assert [Lease.from_item(i) for i in aws.leases("i-0killed000000001")] == [lease], "the lease survives"
    assert aws.receive() == [], "still invisible: nobody released it"
    # What the control plane does when it learns the instance is gone:
    aws.sqs.change_message_visibility(
        QueueUrl=lease.queue_url, ReceiptHandle=lease.receipt_handle, VisibilityTimeout=0
    )
    assert [m["MessageId"] for m in aws.receive()] == [message_id]


def test_agent_process_releases_work_on_a_spot_notice_and_exits_zero(aws: Aws, moto_server):
    message_id = aws.send(task_id="too-long", seconds=300)
    with running_imds("i-0spot00000000001") as imds:
        with agent_process(aws, moto_server, imds, stderr=subprocess.PIPE, text=True) as process:
            wait_for(lambda: aws.leases("i-0spot00000000001"), timeout=40)
            noticed = time.monotonic()
            imds.set_spot_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
            released = wait_for(aws.receive, timeout=5)
            latency = time.monotonic() - noticed
            code = process.wait(timeout=30)
        stderr = process.stderr.read() if process.stderr else ""
    assert [m["MessageId"] for m in released] == [message_id]
    # One 0.2 s poll plus the release calls; generous for busy CI machines.
    assert latency < 3.0, f"notice to release took {latency:.2f} s"
    assert code == 0, stderr
    assert aws.leases("i-0spot00000000001") == []
    record = aws.dynamodb.Table(aws.fleet_table).get_item(Key=moto_fleet_key("i-0spot00000000001"))["Item"]
    assert record["state"] == "draining"


def test_sigterm_drains_like_a_notice(aws: Aws, moto_server):
    message_id = aws.send(task_id="long", seconds=300)
    with (
        running_imds("i-0term00000000001") as imds,
        agent_process(aws, moto_server, imds, stderr=subprocess.DEVNULL) as process,
    ):
        wait_for(lambda: aws.leases("i-0term00000000001"), timeout=40)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    assert [m["MessageId"] for m in aws.receive()] == [message_id]
    assert aws.leases("i-0term00000000001") == []


def test_scale_in_lets_running_tasks_finish_then_answers_the_hook(aws: Aws, run_worker, caplog):
    aws.send(task_id="t", seconds=1.5)
    worker, thread, result = run_worker(
        config_for(aws, asg_name="spotguard-test", terminate_hook_name="spotguard-terminate")
    )
    wait_for(aws.leases)
    worker.drain(imds_signal(INSTANCE, SignalKind.LIFECYCLE_TERMINATE, "scale-in", state="Terminated"))
    thread.join(timeout=60)  # moto's 500s to the lifecycle calls are retried by botocore first
    assert result == [0]
    assert worker.counters[Metric.TASKS_COMPLETED] == 1, "no deadline: the running task finished"
    assert worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 0
    # moto answers 500 to CompleteLifecycleAction: the worker logs it and still exits 0.
    assert "CompleteLifecycleAction spotguard-terminate CONTINUE" in caplog.text


def test_report_command_records_the_outcome(aws: Aws, moto_server):
    ec2 = boto3.client("ec2")
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    with running_imds(instance_id) as imds:
        env = agent_env(aws, moto_server, imds.url, AWS_MAX_ATTEMPTS="1")
        failed = subprocess.run(
            [sys.executable, "-m", "spotguard_agent.cli", "report", "failed", "--reason", "disk full"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert failed.returncode == 0, failed.stderr
    outcome = json.loads(failed.stdout)
    assert outcome == {
        "instance_id": instance_id,
        "outcome": "failed",
        "fleet_record": True,
        "tag": True,
        "lifecycle": False,  # moto answers 500 to lifecycle actions
    }
    record = aws.dynamodb.Table(aws.fleet_table).get_item(Key=moto_fleet_key(instance_id))["Item"]
    assert (record["bootstrap_status"], record["bootstrap_reason"]) == ("failed", "disk full")
    described = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in described}["spotguard:bootstrap"] == "failed"


# ---------------------------------------------------------------------- issue 12: lifecycle
def fleet_item(aws: Aws, instance_id: str = INSTANCE) -> dict[str, Any]:
    return dict(
        aws.dynamodb.Table(aws.fleet_table).get_item(Key=moto_fleet_key(instance_id)).get("Item") or {}
    )


def counter(aws: Aws, message_id: str) -> int:
    item = aws.dynamodb.Table(aws.lease_table).get_item(Key=requeue_counter_key(message_id)).get("Item")
    return int(item[REQUEUE_COUNTER_ATTRIBUTE]) if item else 0


def assert_receives_were_interruptions(aws: Aws, received: list[dict[str, Any]]) -> None:
    """Each message, received again by the test, was released by the worker and every one of
    the worker's receives counted as an interruption, none as a failed attempt.

    Not a fixed count of 1: the worker's long poll, in flight when the drain began, may take a
    just-released message once more (real SQS does; the emulator wakes long polls at a
    release as SQS does) and hands it straight back, counted again. What must hold is the
    poison count, receives - 1 - interruptions, staying 0.
    """
    assert received
    for message in received:
        receives = int(message["Attributes"]["ApproximateReceiveCount"])
        assert receives >= 2, "received by the worker before the test"
        assert counter(aws, message["MessageId"]) == receives - 1, "a drain release is an interruption"


class CallLog:
    """Counts ``service.Operation`` calls a client makes (botocore ``before-call``)."""

    def __init__(self, *clients: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for client in clients:
            client.meta.events.register("before-call.*.*", self)

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append((model.name, params))

    def count(self, operation: str) -> int:
        return sum(1 for name, _ in self.calls if name == operation)


def test_the_fleet_record_orders_a_drain_within_one_heartbeat(aws: Aws, run_worker):
    """The control plane's drain decision (a Health event, an early replacement …) reaches the
    agent through its own fleet record, read by the heartbeat itself: no extra call."""
    long_id = aws.send(task_id="long", seconds=60)
    worker, thread, result = run_worker(config_for(aws, fleet_heartbeat_seconds=0.5))
    calls = CallLog(worker.clients.resource("dynamodb").meta.client)
    wait_for(aws.leases)
    deadline = time.time() + 3
    aws.dynamodb.Table(aws.fleet_table).update_item(
        Key=moto_fleet_key(INSTANCE),
        UpdateExpression="SET #s = :s, state_rank = :r, drain_deadline_at = :d, last_signal = :l",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={
            ":s": "draining",
            ":r": 2,
            ":d": Decimal(str(round(deadline, 3))),
            ":l": {"kind": "health_scheduled", "source": "eventbridge", "event_id": "health-1", "at": "0"},
        },
    )
    ordered = time.monotonic()
    released = wait_for(lambda: aws.receive(visibility=30), timeout=10)
    assert time.monotonic() - ordered < 0.5 + 1.5, "within one heartbeat (0.5 s) plus the release"
    assert [m["MessageId"] for m in released] == [long_id]
    thread.join(timeout=30)
    assert result == [0]
    assert worker.drain_signal is not None and worker.drain_signal.kind is SignalKind.HEALTH_SCHEDULED
    assert worker.drain_signal.deadline is not None
    assert abs(worker.drain_signal.deadline.timestamp() - deadline) < 0.01
    assert_receives_were_interruptions(aws, released)
    record = fleet_item(aws)
    assert float(record["drained_at"]) >= float(record["drain_deadline_at"]) - 3
    assert record["last_signal"]["event_id"] == "health-1", "the control plane's order is kept"
    assert calls.count("GetItem") == 0, "the heartbeat's UpdateItem returned the record"


def test_leases_left_by_a_crashed_run_are_released_at_start_as_interruptions(aws: Aws, run_worker):
    orphan_id = aws.send(task_id="orphan", seconds=0.1)
    (message,) = aws.receive(visibility=600)  # the crashed agent's receive
    aws.dynamodb.Table(aws.lease_table).put_item(
        Item=Lease(
            instance_id=INSTANCE,
            message_id=orphan_id,
            receipt_handle=message["ReceiptHandle"],
            queue_url=aws.queue_url,
            leased_at=time.time() - 30,
            heartbeat_at=time.time() - 30,
            interruption_requeues=0,
        ).to_item(MOTO_INSTANCE_ARN_PREFIX)
    )
    worker, _, _ = run_worker(config_for(aws))
    # Released at start (not after the 600 s visibility timeout), then taken and finished.
    wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=15)
    assert counter(aws, orphan_id) == 1, "counted as an interruption, not a failure"
    assert aws.leases() == []
    assert aws.counts() == (0, 0)


def test_messages_received_but_not_started_go_back_at_drain_start_as_interruptions(aws: Aws, run_worker):
    worker, thread, result = run_worker(config_for(aws, concurrency=1, prefetch=9))
    # Short tasks until the worker receives ahead of its one slot (the first task also starts
    # the handler process, so its duration is not short).
    for index in range(40):
        aws.send(task_id=f"warm-{index}", seconds=0.01)
        wait_for(lambda index=index: worker.counters[Metric.TASKS_COMPLETED] == index + 1)
        mean = worker._mean_task_seconds
        if mean is not None and mean <= PREFETCH_MAX_TASK_SECONDS:
            break
    assert worker._mean_task_seconds is not None and worker._mean_task_seconds <= PREFETCH_MAX_TASK_SECONDS
    long_id = aws.send(task_id="long", seconds=60)
    others = [aws.send(task_id=f"waiting-{index}", seconds=0.01) for index in range(2)]
    # The long one runs; what was received behind it is leased, not started.
    wait_for(lambda: len(worker.running_tasks()) == 1 and len(worker.held_tasks()) >= 2, timeout=15)
    assert worker.running_tasks()[0].message_id == long_id
    # Every held message is leased and nothing else is (a receive taken by the intake thread
    # is leased first and held a moment later: compare once both have settled).
    wait_for(
        lambda: (
            {lease["message_id"] for lease in aws.leases()} == {t.message_id for t in worker.held_tasks()}
        ),
        timeout=5,
    )
    waiting = [task.message_id for task in worker.held_tasks() if task.message_id != long_id]
    assert waiting
    worker.drain(spot_signal(INSTANCE, 4.0))
    thread.join(timeout=30)
    assert result == [0]
    received = aws.receive()
    assert sorted(m["MessageId"] for m in received) == sorted([long_id, *others])
    assert_receives_were_interruptions(aws, [m for m in received if m["MessageId"] in {long_id, *waiting}])
    assert aws.leases() == []


def test_a_failed_lease_write_hands_the_message_back_as_an_interruption(aws: Aws, run_worker):
    message_id = aws.send(task_id="t", seconds=0.1)
    config = config_for(aws, concurrency=1)
    worker = Worker(config, instance_id=INSTANCE)
    refused: list[int] = []

    def refuse_lease_writes(model: Any, params: dict[str, Any], **_: Any) -> Any:
        # ``params`` is the serialized request by now.
        request = json.loads(params["body"])
        puts = [
            r
            for requests in request["RequestItems"].values()
            for r in requests
            if "PutRequest" in r and r["PutRequest"]["Item"]["sk"]["S"].startswith("lease#")
        ]
        if not puts or len(refused) >= 1:
            return None
        refused.append(len(puts))
        http = type("Http", (), {"status_code": 400, "headers": {}})()
        return http, {
            "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    worker.clients.resource("dynamodb").meta.client.meta.events.register(
        "before-call.dynamodb.BatchWriteItem", refuse_lease_writes
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: refused)
        wait_for(lambda: counter(aws, message_id) == 1, timeout=5)
        assert worker.counters[Metric.TASKS_COMPLETED] == 0, "never started without a lease"
        # Back after the short lease-failure visibility, then leased and done normally.
        wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=20)
        assert counter(aws, message_id) == 1
        assert worker.counters[Metric.TASKS_FAILED] == 0
    finally:
        worker.request_stop()
        thread.join(timeout=30)


def test_a_drain_while_a_receive_is_being_leased_gives_it_back_before_the_worker_exits(aws: Aws, run_worker):
    """The receive loop hands each receive to the intake thread: a drain that begins while
    the lease write is in flight must still see that message as held (the worker may not
    exit), and hand it back at once, counted as an interruption."""
    worker = Worker(config_for(aws, concurrency=2), instance_id=INSTANCE)
    lease_write_started = threading.Event()
    finish_lease_write = threading.Event()

    def slow_lease_write(model: Any, params: dict[str, Any], **_: Any) -> None:
        body = params["body"]  # the serialized request by now
        if b'"PutRequest"' in (body if isinstance(body, bytes) else body.encode()):
            lease_write_started.set()
            finish_lease_write.wait(10)

    worker.clients.resource("dynamodb").meta.client.meta.events.register(
        "before-call.dynamodb.BatchWriteItem", slow_lease_write
    )
    message_id = aws.send(task_id="in-transit", seconds=30)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    try:
        assert lease_write_started.wait(10)
        assert worker.holds_leases(), "a receive in the intake is held"
        assert worker.running_tasks() == []
        worker.drain(spot_signal(INSTANCE, 30.0))
        thread.join(timeout=1)
        assert thread.is_alive(), "the worker waits for its intake"
        finish_lease_write.set()
        thread.join(timeout=30)
        assert result == [0]
        assert worker.counters[Metric.TASKS_COMPLETED] == 0, "never started after the drain"
        received = aws.receive()
        assert [m["MessageId"] for m in received] == [message_id], "visible again at once"
        assert_receives_were_interruptions(aws, received)
        assert aws.leases() == []
    finally:
        finish_lease_write.set()
        worker.request_stop()
        thread.join(timeout=30)


def test_scale_in_protection_while_holding_leases_and_cleared_when_idle(aws: Aws, run_worker):
    autoscaling = boto3.client("autoscaling")
    autoscaling.create_launch_configuration(
        LaunchConfigurationName="lc", ImageId="ami-12c6146b", InstanceType="t3.micro"
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="spotguard-test",
        LaunchConfigurationName="lc",
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1a"],
    )
    (instance_id,) = [
        i["InstanceId"]
        for i in autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["spotguard-test"])[
            "AutoScalingGroups"
        ][0]["Instances"]
    ]

    def protected() -> bool:
        (instance,) = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])[
            "AutoScalingInstances"
        ]
        return bool(instance["ProtectedFromScaleIn"])

    assert not protected()
    aws.send(task_id="busy", seconds=3)
    worker, _, _ = run_worker(
        config_for(aws, asg_name="spotguard-test", protection_idle_seconds=0.5), instance_id
    )
    wait_for(lambda: aws.leases(instance_id))
    wait_for(protected, timeout=5)
    wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=20)
    wait_for(lambda: not protected(), timeout=5)


def test_one_receive_is_one_lease_batch_and_first_receives_read_no_counter(aws: Aws, run_worker):
    sent = {aws.send(task_id=f"t{index}", seconds=0.5) for index in range(5)}
    worker = Worker(config_for(aws, concurrency=5), instance_id=INSTANCE)
    calls = CallLog(worker.sqs, worker.clients.resource("dynamodb").meta.client)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 5, timeout=30)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    bodies = [json.loads(params["body"]) for name, params in calls.calls if name == "BatchWriteItem"]
    lease_puts = [
        [r for requests in body["RequestItems"].values() for r in requests if "PutRequest" in r]
        for body in bodies
    ]
    lease_puts = [puts for puts in lease_puts if puts]
    put_ids = {str(r["PutRequest"]["Item"]["message_id"]["S"]) for puts in lease_puts for r in puts}
    assert put_ids == sent
    assert len(lease_puts) <= calls.count("ReceiveMessage") and len(lease_puts) < 5, "batched per receive"
    assert calls.count("PutItem") == 0
    assert calls.count("GetItem") == 0 and calls.count("BatchGetItem") == 0, (
        "receive count 1: no counter read"
    )
    assert calls.count("DeleteMessage") == 0 and calls.count("DeleteMessageBatch") >= 1


def test_a_lone_task_is_deleted_at_once_and_a_partial_batch_waits_for_the_one_in_flight(aws: Aws, run_worker):
    """Deletes are batched without a linger: nothing in flight, a finished task goes at
    once; beside a batch in flight only a full batch starts, so what finishes meanwhile
    goes together in the next one (two calls, not one pair per task)."""
    worker = Worker(config_for(aws, concurrency=4), instance_id=INSTANCE)
    delete_sizes: list[int] = []
    first_delete_sent = threading.Event()
    finish_first_delete = threading.Event()

    def hold_the_first_delete(model: Any, params: dict[str, Any], **_: Any) -> None:
        delete_sizes.append(len(json.loads(params["body"])["Entries"]))  # the serialized request
        if len(delete_sizes) == 1:
            first_delete_sent.set()
            finish_first_delete.wait(10)

    worker.sqs.meta.events.register("before-call.sqs.DeleteMessageBatch", hold_the_first_delete)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        aws.send(task_id="lone", seconds=0.01)
        assert first_delete_sent.wait(15), "the lone task's delete went at once"
        for index in range(3):
            aws.send(task_id=f"meanwhile-{index}", seconds=0.01)
        wait_for(lambda: worker._deletes.pending_count() == 3, timeout=15)
        time.sleep(0.3)  # a partial batch would have started by now
        assert delete_sizes == [1]
        finish_first_delete.set()
        wait_for(lambda: worker.counters[Metric.TASKS_COMPLETED] == 4, timeout=15)
        assert delete_sizes == [1, 3]
        assert aws.counts() == (0, 0) and aws.leases() == []
    finally:
        finish_first_delete.set()
        worker.request_stop()
        thread.join(timeout=30)


def test_a_process_stop_drains_but_leaves_the_fleet_record_for_the_restarted_agent(aws: Aws, run_worker):
    """SIGTERM (``systemctl restart``, an upgrade) says nothing about the instance: the record
    must not turn draining (it cannot go back, and the restarted agent would obey it)."""
    worker, thread, result = run_worker(config_for(aws))
    wait_for(lambda: fleet_item(aws).get("heartbeat_at"))
    process_stop = {"origin": PROCESS_STOP_ORIGIN, "signal": "SIGTERM"}
    worker.drain(imds_signal(INSTANCE, SignalKind.STATE_CHANGE, "sigterm", 60, attributes=process_stop))
    thread.join(timeout=30)
    assert result == [0]
    record = fleet_item(aws)
    assert record.get("state") != "draining" and "drained_at" not in record
    restarted, _, _ = run_worker(config_for(aws))
    aws.send(task_id="after-restart", seconds=0.1)
    wait_for(lambda: restarted.counters[Metric.TASKS_COMPLETED] == 1)
    assert restarted.drain_signal is None
