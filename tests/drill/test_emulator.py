"""The drill's emulator must not lose messages itself: it counts lost tasks.

moto's threaded server could drop a message sent while another was being deleted; the
drill's launcher (``spotguard_tools.drill.moto_main``) fixes that. Senders and consumers
race here; every message sent must be received exactly once or more, never zero times.
Its fixes of moto's per-request cost must not change an answer: the same reads against
plain moto and against the launcher answer the same.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import TypeSerializer
from spotguard_core.contracts import Lease
from spotguard_tools.drill import ledger
from spotguard_tools.drill.ledger import Ledger
from spotguard_tools.drill.moto import MotoServer, free_port
from spotguard_tools.drill.moto_main import install_emulator_fixes, plain_attribute_value
from spotguard_tools.drill.resources import lease_table_name, work_queue_name
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX

pytestmark = pytest.mark.integration

SENDERS = 2
BATCHES = 8  # per sender, ten messages each


def test_concurrent_send_and_delete_lose_nothing() -> None:
    with MotoServer() as server:
        env = server.environment()
        session = boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

        def sqs() -> object:
            return session.client("sqs", endpoint_url=server.endpoint)

        url = sqs().create_queue(QueueName="race")["QueueUrl"]  # type: ignore[attr-defined]
        sent: set[str] = set()
        received: set[str] = set()
        lock = threading.Lock()
        senders_done = threading.Event()

        def send(sender: int) -> None:
            client = sqs()
            for batch in range(BATCHES):
                bodies = [f"{sender}-{batch}-{i}" for i in range(10)]
                client.send_message_batch(  # type: ignore[attr-defined]
                    QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
                )
                with lock:
                    sent.update(bodies)

        def consume() -> None:
            client = sqs()
            idle = 0
            while idle < 3:
                messages = client.receive_message(  # type: ignore[attr-defined]
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                ).get("Messages", [])
                if not messages:
                    idle = idle + 1 if senders_done.is_set() else 0
                    continue
                for message in messages:
                    client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])  # type: ignore[attr-defined]
                    with lock:
                        received.add(message["Body"])

        senders = [threading.Thread(target=send, args=(n,)) for n in range(SENDERS)]
        consumers = [threading.Thread(target=consume) for _ in range(3)]
        for thread in senders + consumers:
            thread.start()
        for thread in senders:
            thread.join(timeout=60)
        senders_done.set()
        for thread in consumers:
            thread.join(timeout=60)
        assert len(sent) == SENDERS * BATCHES * 10
        assert sent - received == set()


def test_agent_ledger_counts_what_the_agents_did(tmp_path: Path) -> None:
    """Lease written = start, message deleted = done, lease gone without a delete =
    released; the instance comes from the lease key, the task from the message body."""
    path = tmp_path / "agent-ledger.jsonl"
    environment = {
        ledger.AGENT_LEDGER_ENV: str(path),
        ledger.WORK_QUEUE_ENV: work_queue_name("hook"),
        ledger.LEASE_TABLE_ENV: lease_table_name("hook"),
    }
    with MotoServer(environment=environment) as server:
        sqs = _client("sqs", server.endpoint)
        dynamodb = _client("dynamodb", server.endpoint)
        create_table(dynamodb, TableKind.LEASES, lease_table_name("hook"))
        url = sqs.create_queue(QueueName=work_queue_name("hook"))["QueueUrl"]
        other = sqs.create_queue(QueueName="not-the-work-queue")["QueueUrl"]
        for task in ("a", "b"):
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"task_id": task, "seconds": 1}))
        sqs.send_message(QueueUrl=other, MessageBody=json.dumps({"task_id": "x", "seconds": 1}))
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert len(messages) == 2
        by_task = {json.loads(m["Body"])["task_id"]: m for m in messages}
        leases = {
            task: Lease(
                instance_id=f"i-{task}",
                message_id=message["MessageId"],
                receipt_handle=message["ReceiptHandle"],
                queue_url=url,
                leased_at=1.0,
                heartbeat_at=1.0,
            )
            for task, message in by_task.items()
        }
        for lease in leases.values():
            dynamodb.put_item(
                TableName=lease_table_name("hook"), Item=_attributes(lease.to_item(MOTO_INSTANCE_ARN_PREFIX))
            )
        # a: done (deleted, then its lease removed); a repeated delete is the same completion
        sqs.delete_message(QueueUrl=url, ReceiptHandle=by_task["a"]["ReceiptHandle"])
        sqs.delete_message(QueueUrl=url, ReceiptHandle=by_task["a"]["ReceiptHandle"])
        dynamodb.delete_item(
            TableName=lease_table_name("hook"), Key=_attributes(leases["a"].key(MOTO_INSTANCE_ARN_PREFIX))
        )
        # b: released (visible again, lease removed, never deleted)
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=by_task["b"]["ReceiptHandle"], VisibilityTimeout=0
        )
        dynamodb.delete_item(
            TableName=lease_table_name("hook"), Key=_attributes(leases["b"].key(MOTO_INSTANCE_ARN_PREFIX))
        )
        [unrelated] = sqs.receive_message(QueueUrl=other)["Messages"]
        sqs.delete_message(QueueUrl=other, ReceiptHandle=unrelated["ReceiptHandle"])
    record = Ledger.read(path)
    assert record.done == {"a"}
    assert record.duplicated == 0
    attempts = {(a.task_id, a.instance_id): a for a in record.attempts}
    assert set(attempts) == {("a", "i-a"), ("b", "i-b")}
    assert attempts[("a", "i-a")].finished_at is not None
    assert attempts[("b", "i-b")].released_at is not None
    assert attempts[("b", "i-b")].receive_count == 1


def _client(service: str, endpoint: str) -> Any:
    """A client of ``endpoint`` with moto's test credentials (not this process's environment)."""
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return session.client(service, endpoint_url=endpoint)


def _attributes(item: dict[str, object]) -> dict[str, object]:
    return {key: TypeSerializer().serialize(value) for key, value in item.items()}


@contextlib.contextmanager
def _plain_moto() -> Iterator[str]:
    """moto's own server, without the launcher's fixes: the reference answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


#: One item of every attribute type, nested ones included.
_EVERY_TYPE = {
    "pk": "p",
    "sk": "s#1",
    "text": "héllo",
    "empty_text": "",
    "number": Decimal("1.5"),
    "integer": 42,
    "flag": True,
    "off": False,
    "nothing": None,
    "blob": b"\x00\xffbinary",
    "strings": {"a", "b"},
    "numbers": {Decimal(1), Decimal("2.25")},
    "blobs": {b"x", b"y"},
    "list": ["a", Decimal(1), b"z", None, {"m": True}],
    "map": {"inner": {"deeper": [b"q", "r"]}, "n": Decimal(7)},
}


def _reads(endpoint: str) -> list[Any]:
    dynamodb = _client("dynamodb", endpoint)
    dynamodb.create_table(
        TableName="answers",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    items = [_EVERY_TYPE, {**_EVERY_TYPE, "sk": "s#2", "number": Decimal(-3)}, {"pk": "p", "sk": "s#3"}]
    for item in items:
        dynamodb.put_item(TableName="answers", Item=_attributes(item))
    key = {"pk": {"S": "p"}, "sk": {"S": "s#1"}}
    return [
        dynamodb.get_item(TableName="answers", Key=key, ConsistentRead=True)["Item"],
        dynamodb.query(
            TableName="answers",
            KeyConditionExpression="pk = :p AND begins_with(sk, :s)",
            ExpressionAttributeValues={":p": {"S": "p"}, ":s": {"S": "s#"}},
            Limit=2,
        ),
        dynamodb.query(
            TableName="answers",
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": {"S": "p"}},
            ProjectionExpression="sk, #b, #m.inner",
            ExpressionAttributeNames={"#b": "blob", "#m": "map"},
        )["Items"],
        dynamodb.scan(TableName="answers")["Items"],
        dynamodb.batch_get_item(RequestItems={"answers": {"Keys": [key]}})["Responses"],
        dynamodb.update_item(
            TableName="answers",
            Key=key,
            UpdateExpression="ADD #i :one",
            ExpressionAttributeNames={"#i": "integer"},
            ExpressionAttributeValues={":one": {"N": "1"}},
            ReturnValues="ALL_NEW",
        )["Attributes"],
    ]


#: Attributes that name the moment of the call, different on any two servers.
_QUEUE_TIMESTAMPS = ("CreatedTimestamp", "LastModifiedTimestamp")


def _queue_reads(endpoint: str) -> list[Any]:
    """Queue attributes (counters of visible, delayed and in-flight messages, settings, the
    redrive policy, a FIFO queue's deduplication) and what receives return."""
    sqs = _client("sqs", endpoint)
    dlq = sqs.create_queue(QueueName="answers-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    work = sqs.create_queue(
        QueueName="answers",
        Attributes={
            "VisibilityTimeout": "45",
            "MessageRetentionPeriod": "3600",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    fifo = sqs.create_queue(
        QueueName="answers.fifo", Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"}
    )["QueueUrl"]
    for index in range(5):
        sqs.send_message(QueueUrl=work, MessageBody=f"task-{index}", DelaySeconds=60 if index >= 3 else 0)
    for _ in range(2):
        sqs.send_message(QueueUrl=fifo, MessageBody="same", MessageGroupId="g")  # deduplicated
    taken = sqs.receive_message(QueueUrl=work, MaxNumberOfMessages=2, VisibilityTimeout=300)["Messages"]
    answers: list[Any] = [len(taken)]
    for url in (work, fifo, dlq):
        every = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        answers.append({k: v for k, v in every.items() if k not in _QUEUE_TIMESTAMPS})
        answers.append(
            sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        )
    rest = sqs.receive_message(QueueUrl=work, MaxNumberOfMessages=10)["Messages"]
    answers.append(sorted(m["Body"] for m in taken + rest))
    answers.append(len(sqs.receive_message(QueueUrl=fifo, MaxNumberOfMessages=10)["Messages"]))
    return answers


def test_the_launchers_fast_paths_answer_as_plain_moto_does() -> None:
    with _plain_moto() as reference, MotoServer() as launcher:
        expected = [*_reads(reference), *_queue_reads(reference)]
        answered = [*_reads(launcher.endpoint), *_queue_reads(launcher.endpoint)]
    for answers in (expected, answered):
        for answer in answers:
            if isinstance(answer, dict):
                answer.pop("ResponseMetadata", None)
    assert answered == expected
    assert expected[0]["blob"] == {"B": b"\x00\xffbinary"}  # binary still base64 on the wire


def test_only_one_plain_value_takes_the_fast_path() -> None:
    assert plain_attribute_value({"S": "x"}) and plain_attribute_value({"N": "1"})
    assert plain_attribute_value({"BOOL": False}) and plain_attribute_value({"NULL": True})
    for other in ({"B": "eA=="}, {"SS": ["a"]}, {"M": {}}, {"L": []}, {"N": 1}, {"S": "x", "N": "1"}, "x"):
        assert not plain_attribute_value(other)


def test_a_message_made_visible_again_wakes_a_waiting_long_poll() -> None:
    """A requeue (visibility 0) answers a waiting receive at once, as SQS does; plain moto
    looks again only when its wait times out (here 30 s)."""
    from moto import mock_aws  # noqa: PLC0415 - in-process moto: the backend's own wait
    from moto.sqs.models import sqs_backends  # noqa: PLC0415

    install_emulator_fixes()
    with mock_aws():
        sqs = boto3.client(
            "sqs", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        url = sqs.create_queue(QueueName="wake")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="task")
        [message] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=600)["Messages"]
        queue = sqs_backends["123456789012"]["us-east-1"].get_queue("wake")
        waited: list[float] = []

        def long_poll() -> None:
            started = time.monotonic()
            queue.wait_for_messages(30)
            waited.append(time.monotonic() - started)

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.3)  # the poll is waiting: nothing is visible
        assert not waited
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
        poller.join(timeout=40)
    assert waited and waited[0] < 10


def test_a_visibility_change_with_an_earlier_receives_handle_is_refused_as_sqs_does() -> None:
    """A requeue with a dead instance's handle must not make visible a message another
    agent has received since (moto applied it to the new receive)."""
    with MotoServer() as server:
        sqs = _client("sqs", server.endpoint)
        url = sqs.create_queue(QueueName="handles")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="task")
        [first] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=600)["Messages"]
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
        [second] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=600)["Messages"]
        with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
            sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0
            )
        batch = sqs.change_message_visibility_batch(
            QueueUrl=url,
            Entries=[{"Id": "stale", "ReceiptHandle": first["ReceiptHandle"], "VisibilityTimeout": 0}],
        )
        assert [(f["Id"], f["Code"]) for f in batch.get("Failed", [])] == [
            ("stale", "ReceiptHandleIsInvalid")
        ]
        assert not sqs.receive_message(QueueUrl=url).get("Messages"), "still held by the second receive"
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=second["ReceiptHandle"], VisibilityTimeout=0
        )
        [third] = sqs.receive_message(QueueUrl=url)["Messages"]
        assert third["MessageId"] == first["MessageId"]
