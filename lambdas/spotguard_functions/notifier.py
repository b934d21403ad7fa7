"""notifier λ: spotguard bus events (via an SQS queue) → signed webhooks.

Each SQS record's body is an EventBridge event from the spotguard bus. When
``SPOTGUARD_WEBHOOK_URL`` is set the event is POSTed, HMAC-signed with the secret from
Secrets Manager (cached), retried with back-off a bounded number of times inside this
invocation; a record that still fails is reported as a batch item failure, so SQS
redelivers it later and finally moves it to the queue's dead-letter queue.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from spotguard_core import webhooks
from spotguard_core.contracts import Env, Metric

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("notifier")
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

#: Secrets Manager is read at most every 5 minutes per warm container (rotation-friendly).
SECRET_MAX_AGE_SECONDS = 300
#: Longest one delivery can take (every attempt timing out, plus back-off), and a margin.
#: A record that no longer fits in the invocation is failed at once (SQS redelivers it)
#: instead of letting the function time out, which would redeliver the whole batch.
DELIVERY_BUDGET_MS = (
    int(
        (webhooks.DELIVERY_ATTEMPTS * webhooks.DELIVERY_TIMEOUT_SECONDS + webhooks.DELIVERY_ATTEMPTS * 1)
        * 1000
    )
    + 2_000
)


class DeliveryFailedError(Exception):
    """The webhook could not be delivered this time; SQS will redeliver the record."""


def _secret() -> str:
    arn = os.environ.get(Env.WEBHOOK_SECRET_ARN)
    if not arn:
        raise DeliveryFailedError(
            f"{Env.WEBHOOK_SECRET_ARN.value} is not set: refusing to send unsigned webhooks"
        )
    value = parameters.get_secret(arn, max_age=SECRET_MAX_AGE_SECONDS)
    return value.decode() if isinstance(value, bytes) else str(value)


def record_handler(record: SQSRecord) -> dict[str, Any]:
    try:
        event = json.loads(record.body)
    except json.JSONDecodeError:
        # Not an event: retrying cannot help, but failing it sends it to the DLQ for a look.
        logger.error("Notification record is not JSON", extra={"messageId": record.message_id})
        raise DeliveryFailedError("record body is not JSON") from None
    if not isinstance(event, dict) or "detail-type" not in event:
        logger.error(
            "Notification record is not an EventBridge event", extra={"messageId": record.message_id}
        )
        raise DeliveryFailedError("record body is not an EventBridge event")
    url = os.environ.get(Env.WEBHOOK_URL)
    event_name = str(event["detail-type"])
    if not url:
        logger.debug("No webhook configured", extra={"event": event_name})
        return {"delivered": False, "reason": "no webhook configured"}
    delivery_id = str(event.get("id") or record.message_id)
    context = processor.lambda_context
    if context is not None and context.get_remaining_time_in_millis() < DELIVERY_BUDGET_MS:
        logger.warning(
            "Not enough time left for a delivery: left for redelivery", extra={"deliveryId": delivery_id}
        )
        raise DeliveryFailedError("not enough time left in this invocation")
    result = webhooks.deliver(
        url,
        _secret(),
        event_name=event_name,
        delivery_id=delivery_id,
        body=webhooks.encode_body(webhooks.webhook_payload(event)),
    )
    if not result.delivered:
        metrics.add_metric(name=Metric.WEBHOOK_FAILURES.value, unit="Count", value=1)
        logger.warning(
            "Webhook delivery failed",
            extra={
                "event": event_name,
                "deliveryId": delivery_id,
                "attempts": result.attempts,
                "status": result.status,
                "error": result.error,
            },
        )
        raise DeliveryFailedError(f"webhook delivery failed after {result.attempts} attempts: {result.error}")
    metrics.add_metric(name=Metric.WEBHOOK_DELIVERED.value, unit="Count", value=1)
    logger.info(
        "Webhook delivered",
        extra={"event": event_name, "deliveryId": delivery_id, "attempts": result.attempts},
    )
    return {"delivered": True, "attempts": result.attempts}


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return dict(
        process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    )
