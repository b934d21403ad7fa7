"""Dispatcher: signal queue (EventBridge events in SQS) → signals → decisions → actions.

Thin by design: parse each record into signals (``spotguard_core.signals``), acknowledge
rejections and unmanaged instances at once (log line + metric, never retried), and run
each managed signal once (Powertools Idempotency keyed by ``Signal.idempotency_key``)
through ``ControlPlane.process``. Only transient failures (AWS errors, an incomplete
requeue, a batch write left unprocessed, a concurrent duplicate in progress) are reported
back as batch item failures. Events with source ``spotguard.test`` are rejected unless
``SPOTGUARD_ALLOW_TEST_EVENTS`` is true (staging).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceLayerError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord
from botocore.exceptions import BotoCoreError, ClientError
from spotguard_core import aws
from spotguard_core.contracts import (
    IDEMPOTENCY_TABLE_PK,
    IDEMPOTENCY_TTL_ATTRIBUTE,
    Env,
    FleetRecord,
    Metric,
    Signal,
)
from spotguard_core.control_plane import ControlPlane, TransientActionError
from spotguard_core.requeue import RequeueIncompleteError
from spotguard_core.signals import Rejection, parse_event

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("dispatcher")
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

#: Idempotency records outlive any redelivery of the signal queue (retention is shorter).
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ClientError,
    BotoCoreError,
    RequeueIncompleteError,
    TransientActionError,
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceLayerError,
)


def _duplicate(response: Any, idempotent_data: DataRecord) -> Any:
    """Powertools answers a signal handled before from its stored result (a duplicate
    delivery, normal on EventBridge): say so, count it, and mark the answer."""
    metrics.add_metric(name=Metric.SIGNALS_DUPLICATE, unit="Count", value=1)
    logger.info(f"duplicate signal {idempotent_data.idempotency_key}: already handled")
    return {**response, "duplicate": True} if isinstance(response, dict) else response


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a warm container keeps: the control plane (with its managed-instance cache), the
    idempotent runner and its configuration (which needs each invocation's Lambda context)."""

    control_plane: ControlPlane
    run_once: Callable[..., dict[str, Any]]
    idempotency_config: IdempotencyConfig


@functools.cache
def runtime() -> Runtime:
    """Built once per container from the environment (tests and the drill that change the
    environment call ``reset_runtime``)."""
    control_plane = ControlPlane.from_env(metrics, logger=logger)
    table_name = os.environ.get(Env.IDEMPOTENCY_TABLE)
    if not table_name:
        raise RuntimeError(f"{Env.IDEMPOTENCY_TABLE.value} is not set")
    persistence = DynamoDBPersistenceLayer(
        table_name=table_name,
        key_attr=IDEMPOTENCY_TABLE_PK,
        expiry_attr=IDEMPOTENCY_TTL_ATTRIBUTE,
        boto3_client=aws.client("dynamodb"),
    )
    config = IdempotencyConfig(
        event_key_jmespath="key",
        raise_on_no_idempotency_key=True,
        expires_after_seconds=IDEMPOTENCY_TTL_SECONDS,
        response_hook=_duplicate,
    )

    @idempotent_function(data_keyword_argument="request", persistence_store=persistence, config=config)
    def process_signal(
        *, request: dict[str, Any], signal: Signal, record: FleetRecord | None
    ) -> dict[str, Any]:
        outcome = control_plane.process(signal, record)
        logger.info("signal processed", extra={"outcome": outcome.to_json()})
        return {"key": request["key"], "actions": [action.name for action in outcome.actions]}

    return Runtime(control_plane=control_plane, run_once=process_signal, idempotency_config=config)


def reset_runtime() -> None:
    """Forget the container's runtime (the next record builds it again from the environment)."""
    runtime.cache_clear()


def _reject(rejection: Rejection, record: SQSRecord) -> dict[str, Any]:
    if rejection.event_id:
        logger.set_correlation_id(rejection.event_id)
    logger.warning(
        f"signal rejected: {rejection.reason}",
        extra={"rejection": rejection.to_json(), "sqs_message_id": record.message_id},
    )
    metrics.add_metric(name=Metric.SIGNALS_REJECTED, unit="Count", value=1)
    return rejection.to_json()


def record_handler(record: SQSRecord) -> dict[str, Any]:
    """One SQS record. Raises only for transient failures (the record is retried)."""
    current = runtime()
    control_plane = current.control_plane
    settings = control_plane.settings
    metrics.add_metric(name=Metric.SIGNALS_RECEIVED, unit="Count", value=1)
    parsed = parse_event(
        record.body,
        expected_account=settings.account_id,
        expected_region=settings.region,
        allow_test_events=settings.allow_test_events,
    )
    if isinstance(parsed, Rejection):
        return _reject(parsed, record)
    handled: list[dict[str, Any]] = []
    for signal in parsed:
        logger.set_correlation_id(signal.event_id)
        try:
            fleet_record, managed = control_plane.lookup(signal)
            if not managed:
                logger.info(
                    f"ignoring {signal.kind.value} for unmanaged instance {signal.instance_id}",
                    extra={"instance_id": signal.instance_id, "kind": signal.kind.value},
                )
                metrics.add_metric(name=Metric.SIGNALS_UNMANAGED, unit="Count", value=1)
                handled.append({"instance_id": signal.instance_id, "managed": False})
                continue
            result = current.run_once(
                request={"key": signal.idempotency_key()}, signal=signal, record=fleet_record
            )
            handled.append(
                {
                    "instance_id": signal.instance_id,
                    "managed": True,
                    "duplicate": bool(result.get("duplicate")),
                }
            )
        except TRANSIENT_ERRORS:
            logger.exception(f"transient failure on {signal.kind.value} for {signal.instance_id}: will retry")
            raise
        except Exception:
            # A bug, not a passing fault: retrying cannot help. Acknowledge, say so loudly.
            logger.exception(f"failed to handle {signal.kind.value} for {signal.instance_id}: not retried")
            metrics.add_metric(name=Metric.SIGNALS_REJECTED, unit="Count", value=1)
    return {"signals": handled}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    runtime().idempotency_config.register_lambda_context(context)
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    return dict(response)
