"""Dispatcher: signal queue (EventBridge events in SQS) → signals → decisions → actions.

Thin by design: parse each record into signals (``spotguard_core.signals``), acknowledge
rejections and unmanaged instances at once (log line + metric, never retried), and run
each managed signal once (Powertools Idempotency keyed by ``Signal.idempotency_key``)
through ``ControlPlane.process``. Only transient failures (AWS errors, an incomplete
requeue, a concurrent duplicate in progress) are reported back as batch item failures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
from spotguard_core.control_plane import ControlPlane
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
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceLayerError,
)


class _Runtime:
    """What a warm container keeps: the control plane (with its managed-instance cache)
    and the idempotent runner. Rebuilt when the configuration changes (tests, the drill)."""

    def __init__(self) -> None:
        self.fingerprint: tuple[str | None, ...] | None = None
        self.control_plane: ControlPlane | None = None
        self.run_once: Callable[..., Any] | None = None
        self.idempotency_config: IdempotencyConfig | None = None
        #: Set by the idempotent function's body: False after a call means Powertools
        #: answered from the stored result (a duplicate delivery).
        self.ran = False

    def get(self) -> tuple[ControlPlane, Callable[..., Any]]:
        fingerprint = tuple(os.environ.get(k) for k in [*(e.value for e in Env), "AWS_ENDPOINT_URL"])
        if fingerprint != self.fingerprint or self.control_plane is None or self.run_once is None:
            self.control_plane = ControlPlane.from_env(metrics, logger=logger)
            self.run_once, self.idempotency_config = _idempotent_runner(self.control_plane, self)
            self.fingerprint = fingerprint
        return self.control_plane, self.run_once


_runtime = _Runtime()


def _idempotent_runner(
    control_plane: ControlPlane, runtime: _Runtime
) -> tuple[Callable[..., Any], IdempotencyConfig]:
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
    )

    @idempotent_function(data_keyword_argument="request", persistence_store=persistence, config=config)
    def process_signal(
        *, request: dict[str, Any], signal: Signal, record: FleetRecord | None
    ) -> dict[str, Any]:
        runtime.ran = True
        outcome = control_plane.process(signal, record)
        logger.info("signal processed", extra={"outcome": outcome.to_json()})
        return {"key": request["key"], "actions": [action.name for action in outcome.actions]}

    return process_signal, config


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
    control_plane, run_once = _runtime.get()
    settings = control_plane.settings
    metrics.add_metric(name=Metric.SIGNALS_RECEIVED, unit="Count", value=1)
    parsed = parse_event(record.body, expected_account=settings.account_id, expected_region=settings.region)
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
            _runtime.ran = False
            run_once(request={"key": signal.idempotency_key()}, signal=signal, record=fleet_record)
            if not _runtime.ran:
                # Powertools returned the stored result: this signal was handled before.
                logger.info(f"duplicate {signal.kind.value} for {signal.instance_id}: already handled")
                metrics.add_metric(name=Metric.SIGNALS_DUPLICATE, unit="Count", value=1)
            handled.append({"instance_id": signal.instance_id, "managed": True})
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
    _, _ = _runtime.get()
    if _runtime.idempotency_config is not None:
        _runtime.idempotency_config.register_lambda_context(context)
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    return dict(response)
