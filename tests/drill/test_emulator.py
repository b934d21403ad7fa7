"""The drill's emulator must not lose messages itself: it counts lost tasks.

moto's threaded server could drop a message sent while another was being deleted; the
drill's launcher (``spotguard_tools.drill.moto_main``) fixes that. Senders and consumers
race here; every message sent must be received exactly once or more, never zero times.
"""

from __future__ import annotations

import threading

import boto3
import pytest
from spotguard_tools.drill.moto import MotoServer

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
