"""Queues: the work queue (the user's, or one the fleet creates) and the control plane's queues.

Every queue spotguard creates is encrypted (SQS-managed SSE: EventBridge can deliver to it
without a key policy) and refuses requests that are not over TLS (``enforce_ssl``).

The work queue's redrive threshold is only a backstop (``REDRIVE_BACKSTOP_RECEIVE_COUNT``):
interruptions make messages visible again, which raises their receive count without being
failures. The worker applies the real poison rule (``queue.max_failures`` genuine failures,
see ``contracts.genuine_failures``) and moves poison messages to the DLQ itself, so the
poison rule needs a DLQ whatever queue the fleet consumes.
"""

from __future__ import annotations

from aws_cdk import Annotations, Duration, RemovalPolicy, Token
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.settings import Settings

#: Deliveries before a signal or notification message goes to its DLQ.
CONTROL_PLANE_MAX_RECEIVES = 5
DLQ_RETENTION = Duration.days(14)


def secure_queue(scope: Construct, construct_id: str, **kwargs: object) -> sqs.Queue:
    """An SQS queue with SQS-managed encryption that refuses non-TLS requests."""
    return sqs.Queue(
        scope,
        construct_id,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        **kwargs,  # type: ignore[arg-type]
    )


def consumer_queue(
    scope: Construct, name: str, *, consumer_timeout_seconds: int
) -> tuple[sqs.Queue, sqs.Queue]:
    """A queue a Lambda function consumes, and its DLQ. Visibility timeout = 6 x the function
    timeout (AWS guidance for SQS event sources: retries of a throttled batch do not redeliver
    while it still runs)."""
    dlq = secure_queue(scope, f"{name}DeadLetterQueue", retention_period=DLQ_RETENTION)
    queue = secure_queue(
        scope,
        f"{name}Queue",
        retention_period=Duration.days(4),
        visibility_timeout=Duration.seconds(6 * consumer_timeout_seconds),
        dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=CONTROL_PLANE_MAX_RECEIVES),
    )
    return queue, dlq


def _seconds_of(queue: sqs.IQueue, attribute: str) -> int | None:
    """A plain number set on a queue defined in this app (None for imported queues or tokens)."""
    cfn = queue.node.default_child if isinstance(queue, sqs.Queue) else None
    value = getattr(cfn, attribute, None) if isinstance(cfn, sqs.CfnQueue) else None
    return int(value) if isinstance(value, int | float) and not Token.is_unresolved(value) else None


class WorkQueues(Construct):
    """The queue the workers consume and the DLQ the poison rule moves messages to.

    - No ``queue`` given (the ready app): both are created here, the work queue with the
      ``queue.*`` settings and a redrive backstop to the DLQ.
    - The user's ``queue``: used as given (its visibility timeout, retention, encryption).
      Its DLQ is, in this order, ``dead_letter_queue`` if passed, the queue's own redrive
      target if it was defined in this app, or else one created here that only the poison
      rule uses (a warning says so: the queue then has no redrive backstop, so a message
      whose processing kills its host is stopped by the poison rule alone).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        queue: sqs.IQueue | None = None,
        dead_letter_queue: sqs.IQueue | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.owned = queue is None
        removal = RemovalPolicy.RETAIN if settings.queue.retain_on_delete else RemovalPolicy.DESTROY
        if queue is None:
            self.work_dlq: sqs.IQueue = secure_queue(
                self, "WorkDeadLetterQueue", retention_period=DLQ_RETENTION, removal_policy=removal
            )
            self.work_queue: sqs.IQueue = secure_queue(
                self,
                "WorkQueue",
                retention_period=Duration.days(settings.queue.retention_days),
                visibility_timeout=Duration.seconds(settings.queue.visibility_timeout_seconds),
                receive_message_wait_time=Duration.seconds(20),
                dead_letter_queue=sqs.DeadLetterQueue(
                    queue=self.work_dlq, max_receive_count=contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT
                ),
                removal_policy=removal,
            )
            self.visibility_timeout_seconds = settings.queue.visibility_timeout_seconds
            self.retention_days = settings.queue.retention_days
            return

        self.work_queue = queue
        own_redrive = queue.dead_letter_queue if isinstance(queue, sqs.Queue) else None
        if dead_letter_queue is not None:
            self.work_dlq = dead_letter_queue
        elif own_redrive is not None:
            self.work_dlq = own_redrive.queue
            if own_redrive.max_receive_count < contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT:
                Annotations.of(scope).add_warning_v2(
                    "spotguard:redrive-below-backstop",
                    f"The work queue's redrive maxReceiveCount ({own_redrive.max_receive_count}) is "
                    "low: every interruption requeue is a receive, so SQS may move healthy tasks to "
                    "the DLQ. spotguard's poison rule counts genuine failures only; raise "
                    f"maxReceiveCount to {contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT} to leave it to that "
                    "rule.",
                )
        else:
            self.work_dlq = secure_queue(
                self, "PoisonDeadLetterQueue", retention_period=DLQ_RETENTION, removal_policy=removal
            )
            Annotations.of(scope).add_warning_v2(
                "spotguard:queue-without-dlq",
                "The work queue has no dead-letter queue spotguard can see: the fleet created "
                "one (PoisonDeadLetterQueue) that only its poison rule uses (a message that failed "
                f"queue.max_failures={settings.queue.max_failures} times is moved there by the "
                "agent). Without a redrive policy on your queue nothing else stops a message whose "
                "processing kills its host. Pass dead_letter_queue=, or give your queue a DLQ "
                f"with maxReceiveCount >= {contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT}.",
            )
        # Its own visibility timeout and retention when they can be read; else the settings.
        visibility = _seconds_of(queue, "visibility_timeout")
        self.visibility_timeout_seconds = int(visibility or settings.queue.visibility_timeout_seconds)
        retention = _seconds_of(queue, "message_retention_period")
        self.retention_days = (
            max(1, -(-int(retention) // 86_400)) if retention else settings.queue.retention_days
        )
