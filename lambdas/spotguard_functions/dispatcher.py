"""Dispatcher: signal queue (EventBridge events in SQS) → signals → decisions → actions.

Thin by design: parse each record into signals (``spotguard_core.signals``), acknowledge
rejections and unmanaged instances at once (log line + metric, never retried), and run
each managed signal once (Powertools Idempotency keyed by ``Signal.idempotency_key``)
through ``ControlPlane.process``. Only transient failures (AWS errors, an incomplete
requeue, a batch write left unprocessed, a concurrent duplicate in progress) are reported
back as batch item failures. Events with source ``spotguard.test`` are rejected unless
``SPOTGUARD_ALLOW_TEST_EVENTS`` is true (staging).

The records of a batch are handled concurrently (a mass interruption is one batch of a
hundred instances' signals): Powertools' ``AsyncBatchProcessor`` collects the per-record
outcomes into the partial batch response exactly as ``BatchProcessor`` would, and each
record's blocking boto3 work runs on a bounded thread pool (``RECORD_CONCURRENCY``) in a copy
of the event loop's context (so the correlation id set for one record never labels another's
log lines). Why not an async AWS client: the control plane is the same synchronous code the
watchdog and the agent run. What is shared between those threads is thread-safe: boto3
clients, the managed-instance cache (locked), the metrics (locked: Powertools' metric set is
a plain dict), one requeue pool; what is not (boto3 resources: the stores' ``Table`` objects)
is per thread, one control plane each. Records about the same instance run one after another
in batch order (the decision for a termination reads what its warning wrote), other
instances' at the same time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
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
from spotguard_core import aws
from spotguard_core.contracts import (
    IDEMPOTENCY_TABLE_PK,
    IDEMPOTENCY_TTL_ATTRIBUTE,
    Env,
    FleetRecord,
    Metric,
    Signal,
)
from spotguard_core.control_plane import TRANSIENT_ERRORS as CONTROL_PLANE_TRANSIENT_ERRORS
from spotguard_core.control_plane import ControlPlane
from spotguard_core.control_settings import ControlSettings
from spotguard_core.managed import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_SECONDS, ManagedCheck, TtlLru
from spotguard_core.requeue import DEFAULT_CONCURRENCY
from spotguard_core.signals import ParseResult, Rejection, parse_event

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("dispatcher")
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

#: Idempotency records outlive any redelivery of the signal queue (retention is shorter).
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
#: Records handled at once. Each is a handful of sequential AWS calls, so threads wait on
#: the network, not the CPU: 16 keep a Lambda's one vCPU and its connection pool
#: (``aws.MAX_POOL_CONNECTIONS``, shared with the requeue pool) busy without queueing.
RECORD_CONCURRENCY = 16
#: The control plane's transient errors and Powertools' own (a concurrent duplicate in
#: progress, the idempotency table unreachable): the record is retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *CONTROL_PLANE_TRANSIENT_ERRORS,
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceLayerError,
)


class LockedMetrics:
    """Powertools' metrics for many threads: its metric set is a dict of lists, and two
    threads adding a metric it does not hold yet could each start a list (one value lost)."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._lock = threading.Lock()

    def add_metric(self, name: str, unit: str, value: float) -> None:
        with self._lock:
            self._target.add_metric(name=name, unit=unit, value=value)


class LockedTtlLru(TtlLru):
    """The managed-instance cache for many threads (an ``OrderedDict`` moved and trimmed)."""

    def __init__(self) -> None:
        super().__init__(maxsize=DEFAULT_CACHE_SIZE, ttl=DEFAULT_CACHE_TTL_SECONDS)
        self._lock = threading.Lock()

    def get(self, key: str) -> bool | None:
        with self._lock:
            return super().get(key)

    def put(self, key: str, value: bool) -> None:
        with self._lock:
            super().put(key, value)

    def clear(self) -> None:
        with self._lock:
            super().clear()


sink = LockedMetrics(metrics)


def _duplicate(response: Any, idempotent_data: DataRecord) -> Any:
    """Powertools answers a signal handled before from its stored result (a duplicate
    delivery, normal on EventBridge): say so, count it, and mark the answer."""
    sink.add_metric(Metric.SIGNALS_DUPLICATE, "Count", 1)
    logger.info(f"duplicate signal {idempotent_data.idempotency_key}: already handled")
    return {**response, "duplicate": True} if isinstance(response, dict) else response


class Runtime:
    """What a warm container keeps: the idempotent runner and its configuration (which needs
    each invocation's Lambda context), the settings, the thread pools, the managed-instance
    check, and one control plane per thread (built on first use)."""

    def __init__(
        self, run_once: Callable[..., dict[str, Any]], idempotency_config: IdempotencyConfig
    ) -> None:
        self.run_once = run_once
        self.idempotency_config = idempotency_config
        self.settings = ControlSettings.from_env()
        self.record_pool = ThreadPoolExecutor(max_workers=RECORD_CONCURRENCY, thread_name_prefix="record")
        self.requeue_pool = ThreadPoolExecutor(max_workers=DEFAULT_CONCURRENCY, thread_name_prefix="requeue")
        self.managed_check = ManagedCheck(
            self.settings.fleet,
            ec2=aws.client("ec2"),
            autoscaling=aws.client("autoscaling"),
            asg_name=self.settings.asg_name,
            cache=LockedTtlLru(),
        )
        self._local = threading.local()
        self._build_lock = threading.Lock()

    @property
    def control_plane(self) -> ControlPlane:
        """This thread's control plane: its stores' boto3 ``Table`` resources are not
        thread-safe; its clients, managed check and requeue pool are the shared ones."""
        control_plane: ControlPlane | None = getattr(self._local, "control_plane", None)
        if control_plane is None:
            with self._build_lock:  # resources are made from one boto3 session: one at a time
                control_plane = ControlPlane.from_env(
                    sink, logger=logger, managed_check=self.managed_check, requeue_executor=self.requeue_pool
                )
            self._local.control_plane = control_plane
        return control_plane

    def shutdown(self) -> None:
        self.record_pool.shutdown(wait=True)
        self.requeue_pool.shutdown(wait=True)


@functools.cache
def runtime() -> Runtime:
    """Built once per container from the environment (tests and the drill that change the
    environment call ``reset_runtime``)."""
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
        outcome = runtime().control_plane.process(signal, record)
        logger.info("signal processed", extra={"outcome": outcome.to_json()})
        return {"key": request["key"], "actions": [action.name for action in outcome.actions]}

    return Runtime(process_signal, config)


def reset_runtime() -> None:
    """Forget the container's runtime (the next record builds it again from the environment)."""
    if runtime.cache_info().currsize:
        runtime().shutdown()
    runtime.cache_clear()


def _reject(rejection: Rejection, record: SQSRecord) -> dict[str, Any]:
    if rejection.event_id:
        logger.thread_safe_append_keys(correlation_id=rejection.event_id)
    logger.warning(
        f"signal rejected: {rejection.reason}",
        extra={"rejection": rejection.to_json(), "sqs_message_id": record.message_id},
    )
    sink.add_metric(Metric.SIGNALS_REJECTED, "Count", 1)
    return rejection.to_json()


def parse_record(record: SQSRecord, settings: ControlSettings) -> ParseResult:
    sink.add_metric(Metric.SIGNALS_RECEIVED, "Count", 1)
    return parse_event(
        record.body,
        expected_account=settings.account_id,
        expected_region=settings.region,
        allow_test_events=settings.allow_test_events,
    )


def handle_record(record: SQSRecord, parsed: ParseResult) -> dict[str, Any]:
    """One SQS record's signals (on a pool thread). Raises only for transient failures (the
    record is retried)."""
    if isinstance(parsed, Rejection):
        return _reject(parsed, record)
    current = runtime()
    control_plane = current.control_plane
    handled: list[dict[str, Any]] = []
    for signal in parsed:
        # The context's own keys (a copy per record), not the logger's shared ones.
        logger.thread_safe_append_keys(correlation_id=signal.event_id)
        try:
            fleet_record, managed = control_plane.lookup(signal)
            if not managed:
                logger.info(
                    f"ignoring {signal.kind.value} for unmanaged instance {signal.instance_id}",
                    extra={"instance_id": signal.instance_id, "kind": signal.kind.value},
                )
                sink.add_metric(Metric.SIGNALS_UNMANAGED, "Count", 1)
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
            sink.add_metric(Metric.SIGNALS_REJECTED, "Count", 1)
    return {"signals": handled}


class Batch:
    """One invocation's records, each on the record pool; a record waits for the earlier
    records of the batch that name one of its instances.

    ``handle`` parses a record before its first ``await``: asyncio starts the tasks of
    Powertools' ``gather`` in record order, so that part runs in batch order and each record
    sees which earlier records touch its instances."""

    def __init__(self, current: Runtime) -> None:
        self.current = current
        self.last_for_instance: dict[str, asyncio.Event] = {}

    async def handle(self, record: SQSRecord) -> dict[str, Any]:
        parsed = parse_record(record, self.current.settings)
        instances = {signal.instance_id for signal in parsed} if not isinstance(parsed, Rejection) else set()
        earlier = [self.last_for_instance[i] for i in instances if i in self.last_for_instance]
        finished = asyncio.Event()
        for instance_id in instances:
            self.last_for_instance[instance_id] = finished
        try:
            for event in earlier:
                await event.wait()
            work = functools.partial(contextvars.copy_context().run, handle_record, record, parsed)
            return await asyncio.get_running_loop().run_in_executor(self.current.record_pool, work)
        finally:
            finished.set()


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    current = runtime()
    current.idempotency_config.register_lambda_context(context)
    response = async_process_partial_response(
        event=event, record_handler=Batch(current).handle, processor=processor, context=context
    )
    return dict(response)
