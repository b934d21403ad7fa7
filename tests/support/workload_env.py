"""What the workload tests share: queues, tables and a checkpoint bucket on the moto server,
workers run in threads, workload directories packed like the CDK asset (tar.gz)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from spotguard_agent.config import AgentConfig
from spotguard_agent.execution import WorkloadConfig
from spotguard_agent.worker import Worker
from spotguard_core.contracts import Signal, SignalKind, SignalSource, instance_key
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX, MotoClients

FLEET = "test"
BUCKET = "spotguard-checkpoints-test"


@dataclass
class World(MotoClients):
    queue_url: str
    dlq_url: str
    lease_table: str = "leases"
    fleet_table: str = "fleet"
    bucket: str = BUCKET

    def send(self, body: Any) -> str:
        text = body if isinstance(body, str) else json.dumps(body)
        return str(self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=text)["MessageId"])

    def receive(self, visibility: int = 30) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            WaitTimeSeconds=0,
            VisibilityTimeout=visibility,
            AttributeNames=["ApproximateReceiveCount"],
            MaxNumberOfMessages=10,
        )
        return list(response.get("Messages", []))

    def leases(self, instance_id: str) -> list[dict[str, Any]]:
        table = boto3.resource("dynamodb").Table(self.lease_table)
        return list(
            table.query(
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": instance_key(instance_id, MOTO_INSTANCE_ARN_PREFIX)},
            )["Items"]
        )

    def object_keys(self) -> list[str]:
        return [item["Key"] for item in self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])]


def make_world() -> World:
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="work-dlq")["QueueUrl"]
    queue = sqs.create_queue(QueueName="work", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    dynamodb = boto3.client("dynamodb")
    create_table(dynamodb, TableKind.LEASES, "leases")
    create_table(dynamodb, TableKind.FLEET, "fleet")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return World(queue, dlq)


#: What a test agent changes from the defaults: one task at a time, fast heartbeats and
#: polls, a short drain margin, and no health port (tests run many agents side by side).
MOTO_AGENT_TIMINGS: dict[str, Any] = {
    "concurrency": 1,
    "visibility_timeout_seconds": 30,
    "receive_wait_seconds": 1,
    "drain_margin_seconds": 1.0,
    "failure_backoff_seconds": 5.0,
    "fleet_heartbeat_seconds": 0.5,
    "health_port": 0,
}


def moto_agent_config(
    *, fleet: str, queue_url: str, dlq_url: str, lease_table: str, fleet_table: str, **overrides: Any
) -> AgentConfig:
    """An agent configuration for tests against the moto server, with ``MOTO_AGENT_TIMINGS``;
    ``overrides`` change any field."""
    base = AgentConfig(
        fleet=fleet,
        region="us-east-1",
        instance_arn_prefix=MOTO_INSTANCE_ARN_PREFIX,
        work_queue_url=queue_url,
        work_dlq_url=dlq_url,
        lease_table=lease_table,
        fleet_table=fleet_table,
        **MOTO_AGENT_TIMINGS,
    )
    return base.with_overrides(**overrides)


def agent_config(world: World, **overrides: Any) -> AgentConfig:
    return moto_agent_config(
        fleet=FLEET,
        queue_url=world.queue_url,
        dlq_url=world.dlq_url,
        lease_table=world.lease_table,
        fleet_table=world.fleet_table,
        **overrides,
    )


@dataclass
class RunningWorker:
    worker: Worker
    thread: threading.Thread
    result: list[int] = field(default_factory=list)

    def join(self, timeout: float = 30) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"
        return self.result[0]


class Workers:
    """Start workers in threads; every one is stopped at the end of the test."""

    def __init__(self) -> None:
        self.started: list[RunningWorker] = []

    def start(self, config: AgentConfig, workload: WorkloadConfig, instance_id: str) -> RunningWorker:
        worker = Worker(config, instance_id=instance_id, workload=workload)
        running = RunningWorker(worker, threading.Thread(target=lambda: None))
        running.thread = threading.Thread(target=lambda: running.result.append(worker.run()), daemon=True)
        running.thread.start()
        self.started.append(running)
        return running

    def stop_all(self) -> None:
        for running in self.started:
            running.worker.request_stop()
            for task in running.worker.running_tasks():
                task.context.released.set()
        for running in self.started:
            running.thread.join(timeout=30)


def workers_fixture() -> Iterator[Workers]:
    workers = Workers()
    yield workers
    workers.stop_all()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def imds_signal(
    instance_id: str, kind: SignalKind, event_id: str, seconds_from_now: float | None = None, **fields: Any
) -> Signal:
    """A notice as the agent's watcher hands it to the worker: received now, with a deadline
    ``seconds_from_now`` later (none if not given); ``fields`` are the other ``Signal`` fields."""
    received = datetime.now(UTC)
    deadline = None if seconds_from_now is None else received + timedelta(seconds=seconds_from_now)
    # Positional in the dataclass's field order: the names above are those of the fields.
    return Signal(instance_id, kind, SignalSource.IMDS, event_id, received, deadline, **fields)


def spot_signal(instance_id: str, seconds_from_now: float) -> Signal:
    return imds_signal(instance_id, SignalKind.SPOT_INTERRUPTION, f"test-{instance_id}", seconds_from_now)


def write_tree(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
    return directory


def pack(directory: Path) -> tuple[bytes, str]:
    """The directory as a tar.gz (like the workload asset) and its sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for path in sorted(directory.rglob("*")):
            archive.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def process_alive(pid: int) -> bool:
    """Running and not a zombie (a killed orphan may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
