"""notifier λ: signed webhooks to a receiver on 127.0.0.1, retries, and the DLQ (moto SQS)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import boto3
import pytest
from spotguard_core import contracts, notifications, webhooks
from spotguard_core.contracts import Env, NotificationType
from spotguard_functions import notifier
from spotguard_tools import events as event_builders

from tests.integration.ops_fixtures import FakeLambdaContext
from tests.support.http_stub import QuietHandler, serving

pytestmark = pytest.mark.integration
SECRET = "whsec_integration"


@dataclass
class Receiver:
    """A webhook receiver that verifies every request with ``webhooks.verify``."""

    answer: Callable[[int], int]  # call number (1-based) -> HTTP status
    calls: int = 0
    accepted: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    rejected_signatures: int = 0
    url: str = ""


@contextmanager
def receiver(answer: Callable[[int], int]) -> Iterator[Receiver]:
    state = Receiver(answer=answer)
    lock = threading.Lock()

    class Handler(QuietHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                webhooks.verify(SECRET, self.headers.get(contracts.WEBHOOK_SIGNATURE_HEADER), body)
            except webhooks.SignatureError:
                with lock:
                    state.rejected_signatures += 1
                self.send_response(401)
                self.end_headers()
                return
            with lock:
                state.calls += 1
                status = state.answer(state.calls)
                if 200 <= status < 300:
                    state.accepted.append(json.loads(body))
                    state.headers.append(dict(self.headers))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(Handler) as url:
        state.url = f"{url}/hooks/spotguard"
        yield state


@pytest.fixture
def webhook_env(moto_server, monkeypatch):
    arn = boto3.client("secretsmanager").create_secret(Name="spotguard/webhook", SecretString=SECRET)["ARN"]
    monkeypatch.setenv(Env.WEBHOOK_SECRET_ARN.value, arn)
    return arn


def bus_event(kind: NotificationType = NotificationType.INSTANCE_MIGRATED, **detail) -> dict:
    return {
        "version": "0",
        "id": "5b3c9b4e-1111-2222-3333-444455556666",
        "detail-type": kind.value,
        "source": contracts.NOTIFICATION_EVENT_SOURCE,
        "account": "123456789012",
        "time": "2026-01-15T10:45:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {
            "instanceId": "inst-new123",
            "originalInstanceId": "inst-old456",
            "status": "running",
            **detail,
        },
    }


def test_receiver_that_fails_twice_gets_the_event_exactly_once(webhook_env, monkeypatch):
    with receiver(lambda call: 503 if call <= 2 else 204) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        result = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert result == {"batchItemFailures": []}
    assert hook.calls == 3 and len(hook.accepted) == 1
    assert hook.rejected_signatures == 0
    delivered = hook.accepted[0]
    assert delivered["event"] == "instance.migrated"
    assert delivered["timestamp"] == "2026-01-15T10:45:00Z"
    assert delivered["instanceId"] == "inst-new123"
    headers = {k.lower(): v for k, v in hook.headers[0].items()}
    assert headers[contracts.WEBHOOK_EVENT_HEADER.lower()] == "instance.migrated"
    assert headers[contracts.WEBHOOK_ID_HEADER.lower()] == "5b3c9b4e-1111-2222-3333-444455556666"


def test_only_failed_records_are_reported(webhook_env, monkeypatch):
    def answer(call: int) -> int:
        return 204

    good = event_builders.to_sqs_event(bus_event())["Records"][0]
    garbage = event_builders.to_sqs_event("not json")["Records"][0]
    with receiver(answer) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        result = notifier.handler({"Records": [good, garbage]}, FakeLambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": garbage["messageId"]}]}
    assert len(hook.accepted) == 1


def test_without_a_webhook_url_records_succeed(webhook_env, monkeypatch):
    monkeypatch.delenv(Env.WEBHOOK_URL.value, raising=False)
    result = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert result == {"batchItemFailures": []}


def test_receiver_that_never_succeeds_leaves_the_event_in_the_dlq(webhook_env, monkeypatch):
    sqs = boto3.client("sqs")
    dlq_url = sqs.create_queue(QueueName="spotguard-notifications-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName="spotguard-notifications",
        Attributes={
            "VisibilityTimeout": "0",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(bus_event()))

    with receiver(lambda call: 500) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        for _ in range(5):  # what the event source mapping does: receive, invoke, delete successes
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                break
            records = [
                {
                    **event_builders.to_sqs_record(json.loads(m["Body"])),
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                }
                for m in messages
            ]
            result = notifier.handler({"Records": records}, FakeLambdaContext())
            failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
            assert failed == {m["MessageId"] for m in messages}  # never acknowledged
            for m in messages:
                if m["MessageId"] not in failed:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
    assert hook.accepted == []
    assert hook.calls == 2 * webhooks.DELIVERY_ATTEMPTS  # bounded retries per invocation
    dead = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10).get("Messages", [])
    assert len(dead) == 1 and json.loads(dead[0]["Body"])["detail-type"] == "instance.migrated"
    assert sqs.receive_message(QueueUrl=queue_url).get("Messages", []) == []


def test_client_errors_are_not_retried_within_the_invocation(webhook_env, monkeypatch):
    with receiver(lambda call: 410) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        result = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert len(result["batchItemFailures"]) == 1
    assert hook.calls == 1


def test_published_notification_reaches_the_webhook_through_the_bus(webhook_env, monkeypatch):
    """notifications.publish → spotguard bus → rule → SQS → notifier → signed webhook."""
    events = boto3.client("events")
    sqs = boto3.client("sqs")
    events.create_event_bus(Name="spotguard-workers")
    queue_url = sqs.create_queue(QueueName="notifications")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    events.put_rule(
        Name="to-notifier",
        EventBusName="spotguard-workers",
        EventPattern=json.dumps({"source": [contracts.NOTIFICATION_EVENT_SOURCE]}),
    )
    events.put_targets(
        Rule="to-notifier", EventBusName="spotguard-workers", Targets=[{"Id": "queue", "Arn": queue_arn}]
    )
    monkeypatch.setenv(Env.NOTIFICATION_BUS.value, "spotguard-workers")
    assert notifications.publish(
        NotificationType.BOOTSTRAP_FAILED,
        {"instanceId": "i-0123456789abcdef0", "reason": "health port 9880 not listening"},
    )

    messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages", [])
    assert len(messages) == 1
    with receiver(lambda call: 200) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        record = {
            **event_builders.to_sqs_record(json.loads(messages[0]["Body"])),
            "messageId": messages[0]["MessageId"],
        }
        assert notifier.handler({"Records": [record]}, FakeLambdaContext()) == {"batchItemFailures": []}
    payload = hook.accepted[0]
    assert payload["event"] == "bootstrap.failed"
    assert payload["instanceId"] == "i-0123456789abcdef0"
    assert payload["reason"] == "health port 9880 not listening"
    assert payload["timestamp"]


def test_record_that_no_longer_fits_in_the_invocation_is_left_for_redelivery(webhook_env, monkeypatch):
    with receiver(lambda call: 204) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        event = event_builders.to_sqs_event(bus_event())
        result = notifier.handler(event, FakeLambdaContext(remaining_ms=notifier.DELIVERY_BUDGET_MS - 1))
    assert result == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert hook.calls == 0


# ------------------------------------------------------------------ outbound safety (issue 13)
@contextmanager
def recording_server(status: int, location: str | None = None) -> Iterator[dict]:
    """Answers every request (any method) with ``status`` (and a Location) and records it."""
    seen: dict = {"requests": []}

    class Handler(QuietHandler):
        def _answer(self):
            seen["requests"].append((self.command, dict(self.headers)))
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = _answer

    with serving(Handler) as url:
        seen["url"] = f"{url}/hook"
        yield seen


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed(webhook_env, monkeypatch, status):
    """urllib follows a 302 by default, forwarding the signature header to the new host."""
    with recording_server(204) as elsewhere, recording_server(status, elsewhere["url"]) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook["url"])
        result = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert len(result["batchItemFailures"]) == 1  # failed, left for the DLQ, not retried in place
    assert len(hook["requests"]) == 1
    assert elsewhere["requests"] == []  # nothing (no signature) reached the redirect target


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.8/hook",
        "https://user:pw@hooks.example.com/hook",
        "http://hooks.example.com/hook",
    ],
)
def test_an_unsafe_webhook_url_is_refused_without_a_request(webhook_env, monkeypatch, url):
    monkeypatch.setenv(Env.WEBHOOK_URL.value, url)
    result = webhooks.deliver(url, SECRET, event_name="instance.migrated", delivery_id="d-1", body=b"{}")
    assert result.delivered is False and result.attempts == 0 and "webhook URL must" in str(result.error)
    answer = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert len(answer["batchItemFailures"]) == 1


def test_loopback_needs_the_local_switch(webhook_env, monkeypatch):
    monkeypatch.delenv(Env.ALLOW_LOOPBACK_URLS.value, raising=False)
    with receiver(lambda call: 204) as hook:
        monkeypatch.setenv(Env.WEBHOOK_URL.value, hook.url)
        result = notifier.handler(event_builders.to_sqs_event(bus_event()), FakeLambdaContext())
    assert len(result["batchItemFailures"]) == 1 and hook.calls == 0
