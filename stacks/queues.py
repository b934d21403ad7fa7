"""Queues: work, signal and notify, each with its dead-letter queue.

Every queue is encrypted (SQS-managed SSE: EventBridge can deliver to it without a key
policy) and refuses requests that are not over TLS (``enforce_ssl``).

The work queue's redrive threshold is only a backstop (``REDRIVE_BACKSTOP_RECEIVE_COUNT``):
interruptions make messages visible again, which raises their receive count without being
failures. The worker applies the real poison rule (``queue.max_failures`` genuine failures,
see ``contracts.genuine_failures``) and moves poison messages to the DLQ itself.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts

from stacks.settings import Settings

#: Lambda consumers: visibility timeout = 6 x function timeout (AWS guidance for SQS event
#: sources, so retries of a throttled batch do not redeliver while it still runs).
SIGNAL_CONSUMER_TIMEOUT_SECONDS = 60
NOTIFY_CONSUMER_TIMEOUT_SECONDS = 90
#: Deliveries before a signal or notification message goes to its DLQ.
CONTROL_PLANE_MAX_RECEIVES = 5


def _queue(scope: Construct, construct_id: str, **kwargs: object) -> sqs.Queue:
    return sqs.Queue(
        scope,
        construct_id,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        **kwargs,  # type: ignore[arg-type]
    )


class Queues(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        retention = Duration.days(settings.queue.retention_days)
        dlq_retention = Duration.days(14)

        self.work_dlq = _queue(self, "WorkDeadLetterQueue", retention_period=dlq_retention)
        self.work_queue = _queue(
            self,
            "WorkQueue",
            retention_period=retention,
            visibility_timeout=Duration.seconds(settings.queue.visibility_timeout_seconds),
            receive_message_wait_time=Duration.seconds(20),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.work_dlq, max_receive_count=contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT
            ),
        )

        self.signal_dlq = _queue(self, "SignalDeadLetterQueue", retention_period=dlq_retention)
        self.signal_queue = _queue(
            self,
            "SignalQueue",
            retention_period=Duration.days(4),
            visibility_timeout=Duration.seconds(6 * SIGNAL_CONSUMER_TIMEOUT_SECONDS),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.signal_dlq, max_receive_count=CONTROL_PLANE_MAX_RECEIVES
            ),
        )

        self.notify_dlq = _queue(self, "NotifyDeadLetterQueue", retention_period=dlq_retention)
        self.notify_queue = _queue(
            self,
            "NotifyQueue",
            retention_period=Duration.days(4),
            visibility_timeout=Duration.seconds(6 * NOTIFY_CONSUMER_TIMEOUT_SECONDS),
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.notify_dlq, max_receive_count=CONTROL_PLANE_MAX_RECEIVES
            ),
        )

    @property
    def dead_letter_queues(self) -> dict[str, sqs.Queue]:
        return {"Work": self.work_dlq, "Signal": self.signal_dlq, "Notify": self.notify_dlq}
