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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from spotguard_agent.config import AgentConfig
from spotguard_agent.worker import Worker
from spotguard_core.contracts import (
    FLEET_TABLE_PK,
    REQUEUE_COUNTER_ATTRIBUTE,
    Env,
    Lease,
    Metric,
    Signal,
    SignalKind,
    SignalSource,
    lease_pk,
    requeue_counter_key,
)
from spotguard_tools.imds_emulator import running_imds
from spotguard_tools.local_tables import TableKind, create_table

pytestmark = pytest.mark.integration
INSTANCE = "i-0worker0000000001"


@dataclass
class Aws:
    queue_url: str
    dlq_url: str
    lease_table: str
    fleet_table: str

    @property
    def sqs(self) -> Any:
        return boto3.client("sqs")

    @property
    def dynamodb(self) -> Any:
        return boto3.resource("dynamodb")

    def send(self, **body: Any) -> str:
        return str(self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(body))["MessageId"])

    def leases(self, instance_id: str = INSTANCE) -> list[dict[str, Any]]:
        table = self.dynamodb.Table(self.lease_table)
        items = table.query(
            KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": lease_pk(instance_id)}
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
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="work-dlq")["QueueUrl"]
    queue = sqs.create_queue(QueueName="work", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    dynamodb = boto3.client("dynamodb")
    create_table(dynamodb, TableKind.LEASES, "leases")
    create_table(dynamodb, TableKind.FLEET, "fleet")
    return Aws(queue, dlq, "leases", "fleet")


def config_for(aws: Aws, **overrides: Any) -> AgentConfig:
    base = AgentConfig(
        fleet="test",
        region="us-east-1",
        work_queue_url=aws.queue_url,
        work_dlq_url=aws.dlq_url,
        lease_table=aws.lease_table,
        fleet_table=aws.fleet_table,
        concurrency=2,
        visibility_timeout_seconds=30,
        receive_wait_seconds=1,
        drain_margin_seconds=1.0,
        failure_backoff_seconds=1.0,
        fleet_heartbeat_seconds=0.5,
        health_port=0,
    )
    return base.with_overrides(**overrides)


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


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def spot_signal(seconds_from_now: float) -> Signal:
    received = datetime.now(UTC)
    return Signal(
        instance_id=INSTANCE,
        kind=SignalKind.SPOT_INTERRUPTION,
        source=SignalSource.IMDS,
        event_id="test",
        received_at=received,
        deadline=received + timedelta(seconds=seconds_from_now),
    )


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
    fleet = aws.dynamodb.Table(aws.fleet_table).get_item(Key={FLEET_TABLE_PK: INSTANCE})["Item"]
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
    drained_at = time.monotonic()
    worker.drain(spot_signal(4.0))  # deadline - margin = 3 s: the 1 s task fits, the 60 s one does not
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
    worker.drain(spot_signal(1.0))
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


def test_sigkill_mid_task_leaves_a_lease_the_control_plane_can_requeue(aws: Aws, moto_server):
    message_id = aws.send(task_id="doomed", seconds=120)
    with running_imds("i-0killed000000001") as imds:
        process = subprocess.Popen(
            [sys.executable, "-m", "spotguard_agent.cli", "run"],
            env=agent_env(aws, moto_server, imds.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            (item,) = wait_for(lambda: aws.leases("i-0killed000000001"), timeout=40)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        finally:
            process.kill()
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
        process = subprocess.Popen(
            [sys.executable, "-m", "spotguard_agent.cli", "run"],
            env=agent_env(aws, moto_server, imds.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: aws.leases("i-0spot00000000001"), timeout=40)
            noticed = time.monotonic()
            imds.set_spot_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
            released = wait_for(aws.receive, timeout=5)
            latency = time.monotonic() - noticed
            code = process.wait(timeout=30)
        finally:
            process.kill()
        stderr = process.stderr.read() if process.stderr else ""
    assert [m["MessageId"] for m in released] == [message_id]
    # One 0.2 s poll plus the release calls; generous for busy CI machines.
    assert latency < 3.0, f"notice to release took {latency:.2f} s"
    assert code == 0, stderr
    assert aws.leases("i-0spot00000000001") == []
    record = aws.dynamodb.Table(aws.fleet_table).get_item(Key={FLEET_TABLE_PK: "i-0spot00000000001"})["Item"]
    assert record["state"] == "draining"


def test_sigterm_drains_like_a_notice(aws: Aws, moto_server):
    message_id = aws.send(task_id="long", seconds=300)
    with running_imds("i-0term00000000001") as imds:
        process = subprocess.Popen(
            [sys.executable, "-m", "spotguard_agent.cli", "run"],
            env=agent_env(aws, moto_server, imds.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: aws.leases("i-0term00000000001"), timeout=40)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        finally:
            process.kill()
    assert code == 0
    assert [m["MessageId"] for m in aws.receive()] == [message_id]
    assert aws.leases("i-0term00000000001") == []


def test_scale_in_lets_running_tasks_finish_then_answers_the_hook(aws: Aws, run_worker, caplog):
    aws.send(task_id="t", seconds=1.5)
    worker, thread, result = run_worker(
        config_for(aws, asg_name="spotguard-test", terminate_hook_name="spotguard-terminate")
    )
    wait_for(aws.leases)
    received = datetime.now(UTC)
    worker.drain(
        Signal(
            instance_id=INSTANCE,
            kind=SignalKind.LIFECYCLE_TERMINATE,
            source=SignalSource.IMDS,
            event_id="scale-in",
            received_at=received,
            state="Terminated",
        )
    )
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
    record = aws.dynamodb.Table(aws.fleet_table).get_item(Key={FLEET_TABLE_PK: instance_id})["Item"]
    assert (record["bootstrap_status"], record["bootstrap_reason"]) == ("failed", "disk full")
    described = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in described}["spotguard:bootstrap"] == "failed"
