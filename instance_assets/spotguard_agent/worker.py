"""The draining SQS worker.

Per message: poison check -> lease written -> handler runs (visibility extended and lease
heartbeat refreshed while it runs) -> delete on success / release with backoff on failure
-> lease removed. A drain (IMDS notice, SIGTERM) stops receiving, lets tasks finish that
fit before ``deadline - drain_margin`` and releases the rest at once (visibility 0, lease
removed), then ``run()`` returns 0.

Poison rule: SQS's ``ApproximateReceiveCount`` also counts receives that ended because an
instance went away. The control plane counts those interruption requeues per message
(``contracts.requeue_counter_key``); only ``contracts.genuine_failures(receive_count,
requeues)`` count toward ``max_failures``. When it is reached the worker moves the message
to the DLQ itself (send a copy, delete), so interruptions never push healthy tasks there.
The queue's redrive policy stays as a backstop far above that threshold.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from spotguard_core.contracts import (
    METRIC_DIMENSION_FLEET,
    METRIC_NAMESPACE,
    RECEIVE_COUNT_ATTRIBUTE,
    REQUEUE_COUNTER_ATTRIBUTE,
    REQUEUE_COUNTER_TTL_SECONDS,
    TTL_ATTRIBUTE,
    Lease,
    Metric,
    Signal,
    SignalKind,
    genuine_failures,
    now,
    requeue_counter_key,
)

from spotguard_agent import cloudlogs
from spotguard_agent.awsclients import AwsClients
from spotguard_agent.config import AgentConfig
from spotguard_agent.execution import EXECUTION_METRICS, Execution, WorkloadConfig, build_execution
from spotguard_agent.handler_host import load_handler
from spotguard_agent.report import Reporter

LOG = logging.getLogger("spotguard.worker")
#: botocore raises ResponseParserError (not a BotoCoreError) for a garbled 5xx body.
AWS_ERRORS = (BotoCoreError, ClientError, ResponseParserError)
MAX_BACKOFF_SECONDS = 900
_SERIALIZER = TypeSerializer()


class TaskState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"


@dataclass
class TaskContext:
    """The agent's side of a task's context (the handler's own, in its child process, is
    ``handler_host.HostContext`` with the same attributes plus ``checkpoint()``)."""

    message_id: str
    receive_count: int
    attributes: dict[str, Any]
    #: Set when the agent released the message (drain): the execution stops the task
    #: (SIGTERM, grace, SIGKILL); its result is ignored.
    released: threading.Event = field(default_factory=threading.Event)
    #: The checkpoint this attempt started from (Python handlers), if any.
    resumed: bytes | None = None
    #: This attempt stored a checkpoint (deleted once the message is done).
    checkpointed: bool = False


@dataclass
class Task:
    message: dict[str, Any]
    lease: Lease
    receive_count: int
    requeues: int
    started: float  # monotonic
    expected_seconds: float | None
    context: TaskContext
    state: TaskState = TaskState.RUNNING
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_extended: float = 0.0  # monotonic

    @property
    def message_id(self) -> str:
        return str(self.message["MessageId"])

    @property
    def receipt_handle(self) -> str:
        return str(self.message["ReceiptHandle"])

    def fits(self, deadline_monotonic: float | None) -> bool:
        """Will the task be done by the deadline? Unknown duration: assume it will not."""
        if deadline_monotonic is None:
            return True
        if self.expected_seconds is None:
            return False
        return self.started + self.expected_seconds <= deadline_monotonic


ExpectedSeconds = Callable[[str], "float | None"]
#: ``load_handler(spec)`` (imported above) now lives in ``handler_host``: handlers are
#: imported in their child process, never in the agent's.
__all__ = ["TaskContext", "Worker", "load_handler"]


class Worker:
    def __init__(
        self,
        config: AgentConfig,
        *,
        instance_id: str,
        clients: AwsClients | None = None,
        reporter: Reporter | None = None,
        workload: WorkloadConfig | None = None,
    ) -> None:
        config.validate_worker()
        self.config = config
        self.instance_id = instance_id
        self.clients = clients or AwsClients(config.region)
        self.reporter = reporter or Reporter(
            self.clients, instance_id=instance_id, fleet=config.fleet, fleet_table=config.fleet_table
        )
        # The user's work runs in child processes (spotguard_agent.execution); the handler
        # reports its expected_seconds from there, per task.
        self.workload = workload or WorkloadConfig.from_environ()
        self.cloud_logs: cloudlogs.CloudLogsHandler | None = None
        if self.workload.log_group:
            logs = self.clients.client("logs")
            self.cloud_logs = cloudlogs.attach(logs, group=self.workload.log_group, instance_id=instance_id)
        self.expected_seconds: ExpectedSeconds | None = None
        self.execution: Execution = build_execution(
            handler=config.handler,
            workload=self.workload,
            s3=self.clients.client("s3") if self.workload.checkpoint_bucket else None,
            fleet=config.fleet,
            deadline=lambda: self.drain_signal.deadline if self.drain_signal is not None else None,
            count=self._count,
        )
        self.sqs = self.clients.sqs
        self.dynamodb = self.clients.dynamodb
        self._tasks: dict[str, Task] = {}
        self._tasks_lock = threading.Lock()
        self._slots = threading.Semaphore(config.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="task")
        self._stop = threading.Event()  # stop receiving
        self._drain_lock = threading.Lock()
        self.drain_signal: Signal | None = None
        self.drain_started_at: float | None = None  # epoch seconds
        self._deadline_monotonic: float | None = None
        self._lifecycle_terminating = False
        self.counters: dict[Metric, int] = dict.fromkeys(
            (
                Metric.TASKS_COMPLETED,
                Metric.TASKS_FAILED,
                Metric.TASKS_RELEASED_ON_DRAIN,
                Metric.POISON_MESSAGES,
                *EXECUTION_METRICS,
            ),
            0,
        )
        self._published: dict[Metric, int] = dict(self.counters)
        self._counter_lock = threading.Lock()

    # ------------------------------------------------------------------ public state
    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    def running_tasks(self) -> list[Task]:
        with self._tasks_lock:
            return [t for t in self._tasks.values() if t.state is TaskState.RUNNING]

    def status(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "draining": self.draining,
            "drain_kind": self.drain_signal.kind.value if self.drain_signal else None,
            "running_tasks": len(self.running_tasks()),
            "counters": {m.value: n for m, n in self.counters.items()},
        }

    def _count(self, metric: Metric, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[metric] += n

    # ------------------------------------------------------------------ drain: the one path
    def drain(self, signal: Signal) -> None:
        """Stop taking work; finish what fits before the deadline, release the rest now.

        Called by the IMDS watcher, by SIGTERM and by the CLI; a later signal can only make
        the deadline earlier.
        """
        with self._drain_lock:
            first = self.drain_signal is None
            deadline_monotonic = None
            if signal.deadline is not None:
                seconds_left = signal.deadline.timestamp() - now()
                deadline_monotonic = time.monotonic() + seconds_left - self.config.drain_margin_seconds
            if first:
                self.drain_signal = signal
                self.drain_started_at = now()
                self._deadline_monotonic = deadline_monotonic
            elif deadline_monotonic is not None and (
                self._deadline_monotonic is None or deadline_monotonic < self._deadline_monotonic
            ):
                self._deadline_monotonic = deadline_monotonic
            if signal.kind is SignalKind.LIFECYCLE_TERMINATE:
                self._lifecycle_terminating = True
            self._stop.set()
        LOG.warning(
            "draining (%s, deadline %s, requeue %s)",
            signal.kind.value,
            signal.deadline.isoformat() if signal.deadline else "none",
            "on" if self.config.requeue_enabled else "off",
        )
        self._release_what_does_not_fit()
        if first:
            deadline_epoch = signal.deadline.timestamp() if signal.deadline else None
            threading.Thread(
                target=self.reporter.draining, args=(deadline_epoch, signal.kind.value), daemon=True
            ).start()

    def _release_what_does_not_fit(self) -> None:
        if not self.config.requeue_enabled:
            return  # baseline mode: running tasks go on, nothing is released early
        deadline = self._deadline_monotonic
        late = [task for task in self.running_tasks() if not task.fits(deadline)]
        if deadline is not None and time.monotonic() >= deadline:
            late = self.running_tasks()
        for task in late:
            if self._release(task, visibility=0, reason="drain"):
                self._count(Metric.TASKS_RELEASED_ON_DRAIN)

    # ------------------------------------------------------------------ main loop
    def request_stop(self) -> None:
        """Stop without a notice (tests, ``KeyboardInterrupt``): running tasks finish."""
        self._stop.set()

    def run(self) -> int:
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        LOG.info(
            "worker started: queue %s, handler %s, concurrency %d",
            self.config.work_queue_url,
            self.config.handler,
            self.config.concurrency,
        )
        try:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=0.2):
                    continue
                free = 1
                while free < min(self.config.concurrency, 10) and self._slots.acquire(blocking=False):
                    free += 1
                try:
                    messages = self._receive(free)
                except AWS_ERRORS as error:
                    LOG.warning("receive failed: %s", error)
                    messages = []
                    self._stop.wait(1.0)
                for message in messages:
                    free -= 1
                    if not self._start(message):
                        self._slots.release()
                for _ in range(free):
                    self._slots.release()
            self._wait_for_tasks()
        finally:
            self._close_execution()
            self._pool.shutdown(wait=False)
            self._flush_metrics()
        if self._lifecycle_terminating:
            self.reporter.complete_lifecycle(
                self.config.asg_name, self.config.terminate_hook_name, "CONTINUE"
            )
        LOG.info("worker stopped: %s", json.dumps(self.status()["counters"]))
        return 0

    def _wait_for_tasks(self) -> None:
        """Until no task is RUNNING. Released tasks whose handler has not noticed yet do not
        hold the exit up: their messages are already back on the queue."""
        while True:
            with self._tasks_lock:
                if all(t.state is TaskState.RELEASED for t in self._tasks.values()):
                    return
            time.sleep(0.05)

    def _receive(self, count: int) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=self.config.work_queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=self.config.receive_wait_seconds,
            VisibilityTimeout=self.config.visibility_timeout_seconds,
            AttributeNames=[RECEIVE_COUNT_ATTRIBUTE],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages", []))

    def _start(self, message: dict[str, Any]) -> bool:
        """Take one received message. True when a task was started (it holds a slot)."""
        message_id = str(message["MessageId"])
        if self._stop.is_set():
            # Arrived after the drain (or stop) began and not started: give it straight back.
            self._change_visibility(message["ReceiptHandle"], 0)
            return False
        receive_count = int(message.get("Attributes", {}).get(RECEIVE_COUNT_ATTRIBUTE, "1"))
        requeues = self._interruption_requeues(message_id) if receive_count > 1 else 0
        if requeues is not None and self._is_poison(message, receive_count, requeues):
            return False
        at = now()
        lease = Lease(
            instance_id=self.instance_id,
            message_id=message_id,
            receipt_handle=str(message["ReceiptHandle"]),
            queue_url=self.config.work_queue_url,
            leased_at=at,
            heartbeat_at=at,
        )
        try:
            self._put_lease(lease)
        except AWS_ERRORS as error:
            # Without a lease nobody could requeue the message if this instance vanished:
            # do not start it; let another attempt (here or elsewhere) take it shortly.
            LOG.warning("lease write failed for %s, not starting it: %s", message_id, error)
            self._change_visibility(lease.receipt_handle, 5)
            return False
        body = str(message.get("Body", ""))
        expected = None
        if self.expected_seconds is not None:
            try:
                value = self.expected_seconds(body)
                expected = float(value) if value is not None else None
            except Exception as error:  # noqa: BLE001 - user code: a bad estimate only means "unknown"
                LOG.info("expected_seconds failed for %s: %s", message_id, error)
        task = Task(
            message=message,
            lease=lease,
            receive_count=receive_count,
            requeues=requeues or 0,
            started=time.monotonic(),
            expected_seconds=expected,
            context=TaskContext(message_id, receive_count, dict(message.get("MessageAttributes", {}))),
            last_extended=time.monotonic(),
        )
        with self._tasks_lock:
            self._tasks[message_id] = task
        self._pool.submit(self._execute, task)
        return True

    # ------------------------------------------------------------------ one task
    def _execute(self, task: Task) -> None:
        cloudlogs.set_message_id(task.message_id)  # every log line of this task names it
        try:
            try:
                self.execution.run(task)  # returns once done or released; raises on failure
            except Exception as error:  # noqa: BLE001 - any handler exception is a task failure
                self._on_failure(task, error)
            else:
                self._on_success(task)
        finally:
            with self._tasks_lock:
                self._tasks.pop(task.message_id, None)
            self._slots.release()
            cloudlogs.set_message_id(None)

    def _close_execution(self) -> None:
        """At exit: stopping tasks finish their stop (and checkpoint), children end, logs
        ship (bounded; the handler stays attached: ``logging.shutdown()`` at the agent's exit
        ships the last lines)."""
        self.execution.close()
        if self.cloud_logs is not None:
            self.cloud_logs.ship(timeout=5.0)

    def _on_success(self, task: Task) -> None:
        with task.lock:
            if task.state is not TaskState.RUNNING:
                LOG.info("task %s finished after it was released; result dropped", task.message_id)
                return
            task.state = TaskState.DONE
            try:
                self.sqs.delete_message(
                    QueueUrl=self.config.work_queue_url, ReceiptHandle=task.receipt_handle
                )
            except AWS_ERRORS as error:
                LOG.warning("delete failed for %s (it will be redelivered): %s", task.message_id, error)
            self._delete_lease(task.lease)
        self.execution.succeeded(task)
        self._count(Metric.TASKS_COMPLETED)

    def _on_failure(self, task: Task, error: Exception) -> None:
        failures = genuine_failures(task.receive_count, task.requeues) + 1
        delay = int(min(MAX_BACKOFF_SECONDS, self.config.failure_backoff_seconds * 2 ** (failures - 1)))
        LOG.warning(
            "task %s failed (genuine failure %d of %d), visible again in %d s: %s",
            task.message_id,
            failures,
            self.config.max_failures,
            delay,
            error,
        )
        if self._release(task, visibility=delay, reason="failure", final_state=TaskState.FAILED):
            self._count(Metric.TASKS_FAILED)

    def _release(
        self, task: Task, *, visibility: int, reason: str, final_state: TaskState = TaskState.RELEASED
    ) -> bool:
        with task.lock:
            if task.state is not TaskState.RUNNING:
                return False
            task.state = final_state
            task.context.released.set()
            if final_state is TaskState.RELEASED:
                # An interruption, not a failure: count it first, so the next receive is not
                # taken for a failed attempt (contracts.genuine_failures; the poison rule).
                self._count_interruption_requeue(task.message_id)
            self._change_visibility(task.receipt_handle, visibility)
            self._delete_lease(task.lease)
        LOG.info("released %s (%s, visible in %d s)", task.message_id, reason, visibility)
        if final_state is TaskState.RELEASED and self.cloud_logs is not None:
            self.cloud_logs.ship_now()  # a drain: the instance may be gone soon
        return True

    # ------------------------------------------------------------------ heartbeat loop
    def _heartbeat_loop(self) -> None:
        """Visibility extension and the drain deadline: nothing slow may delay these, so
        the fleet record, lifecycle heartbeats and metrics have their own thread."""
        reports = threading.Thread(target=self._guarded, args=(self._report_until_stopped,), daemon=True)
        reports.start()
        self._guarded(self._extend_until_idle)

    def _guarded(self, loop: Callable[[], None]) -> None:
        while True:
            try:
                loop()
                return
            except Exception:  # the heartbeats must outlive any single failure
                LOG.exception("heartbeat loop error (continuing)")
                time.sleep(0.5)

    def _idle_after_stop(self) -> bool:
        with self._tasks_lock:
            return self._stop.is_set() and not self._tasks

    def _extend_until_idle(self) -> None:
        extend_every = max(0.5, self.config.visibility_timeout_seconds / 3)
        while not self._idle_after_stop():
            current = time.monotonic()
            for task in self.running_tasks():
                if current - task.last_extended >= extend_every:
                    self._extend(task)
            if self._stop.is_set():
                self._release_what_does_not_fit()
            time.sleep(0.1)

    def _report_until_stopped(self) -> None:
        next_fleet = next_lifecycle = 0.0
        next_metrics = time.monotonic() + 60
        while not self._idle_after_stop():
            current = time.monotonic()
            if current >= next_fleet:
                next_fleet = current + self.config.fleet_heartbeat_seconds
                self.reporter.heartbeat()
            if self._lifecycle_terminating and current >= next_lifecycle:
                next_lifecycle = current + 30
                self.reporter.lifecycle_heartbeat(self.config.asg_name, self.config.terminate_hook_name)
            if current >= next_metrics:
                next_metrics = current + 60
                self._flush_metrics()
            time.sleep(0.2)

    def _extend(self, task: Task) -> None:
        with task.lock:
            if task.state is not TaskState.RUNNING:
                return
            task.last_extended = time.monotonic()
            try:
                self.sqs.change_message_visibility(
                    QueueUrl=self.config.work_queue_url,
                    ReceiptHandle=task.receipt_handle,
                    VisibilityTimeout=self.config.visibility_timeout_seconds,
                )
            except AWS_ERRORS as error:
                LOG.warning("visibility extension failed for %s: %s", task.message_id, error)
            try:
                self.dynamodb.update_item(
                    TableName=self.config.lease_table,
                    Key=_serialize(task.lease.key()),
                    UpdateExpression="SET heartbeat_at = :h",
                    ConditionExpression="attribute_exists(message_id)",
                    ExpressionAttributeValues={":h": {"N": f"{now():.3f}"}},
                )
            except AWS_ERRORS as error:
                LOG.info("lease heartbeat failed for %s: %s", task.message_id, error)

    # ------------------------------------------------------------------ AWS helpers
    def _change_visibility(self, receipt_handle: str, seconds: int) -> None:
        try:
            self.sqs.change_message_visibility(
                QueueUrl=self.config.work_queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=seconds
            )
        except AWS_ERRORS as error:
            LOG.warning("ChangeMessageVisibility(%d) failed: %s", seconds, error)

    def _put_lease(self, lease: Lease) -> None:
        self.dynamodb.put_item(TableName=self.config.lease_table, Item=_serialize(lease.to_item()))

    def _delete_lease(self, lease: Lease) -> None:
        try:
            self.dynamodb.delete_item(TableName=self.config.lease_table, Key=_serialize(lease.key()))
        except AWS_ERRORS as error:
            LOG.warning("lease delete failed for %s: %s", lease.message_id, error)

    def _count_interruption_requeue(self, message_id: str) -> None:
        try:
            self.dynamodb.update_item(
                TableName=self.config.lease_table,
                Key=_serialize(requeue_counter_key(message_id)),
                UpdateExpression="ADD #count :one SET #ttl = :ttl",
                ExpressionAttributeNames={"#count": REQUEUE_COUNTER_ATTRIBUTE, "#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={
                    ":one": {"N": "1"},
                    ":ttl": {"N": str(int(now()) + REQUEUE_COUNTER_TTL_SECONDS)},
                },
            )
        except AWS_ERRORS as error:
            # Worst case the release counts as one failure; the message itself is not lost.
            LOG.warning("requeue counter update failed for %s: %s", message_id, error)

    def _interruption_requeues(self, message_id: str) -> int | None:
        try:
            item = self.dynamodb.get_item(
                TableName=self.config.lease_table,
                Key=_serialize(requeue_counter_key(message_id)),
                ConsistentRead=True,
            ).get("Item")
        except AWS_ERRORS as error:
            # Unknown: do not risk sending a healthy message to the DLQ.
            LOG.warning("requeue counter unreadable for %s, skipping the poison check: %s", message_id, error)
            return None
        if not item or REQUEUE_COUNTER_ATTRIBUTE not in item:
            return 0
        return int(item[REQUEUE_COUNTER_ATTRIBUTE]["N"])

    def _is_poison(self, message: dict[str, Any], receive_count: int, requeues: int) -> bool:
        failures = genuine_failures(receive_count, requeues)
        if failures < self.config.max_failures:
            return False
        if not self.config.work_dlq_url:
            LOG.warning("message %s failed %d times but no DLQ is configured", message["MessageId"], failures)
            return False
        attributes = {
            name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
            for name, value in message.get("MessageAttributes", {}).items()
        }
        try:
            self.sqs.send_message(
                QueueUrl=self.config.work_dlq_url,
                MessageBody=message.get("Body", ""),
                **({"MessageAttributes": attributes} if attributes else {}),
            )
            self.sqs.delete_message(
                QueueUrl=self.config.work_queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
        except AWS_ERRORS as error:
            LOG.warning("moving poison message %s to the DLQ failed: %s", message["MessageId"], error)
            self._change_visibility(message["ReceiptHandle"], int(self.config.failure_backoff_seconds))
            return True
        LOG.warning(
            "message %s moved to the DLQ: %d genuine failures (%d receives, %d interruption requeues)",
            message["MessageId"],
            failures,
            receive_count,
            requeues,
        )
        self._count(Metric.POISON_MESSAGES)
        return True

    def _flush_metrics(self) -> None:
        with self._counter_lock:
            deltas = {m: n - self._published[m] for m, n in self.counters.items() if n > self._published[m]}
            self._published = dict(self.counters)
        if not deltas or not self.config.fleet:
            return
        with contextlib.suppress(*AWS_ERRORS):
            self.clients.client("cloudwatch").put_metric_data(
                Namespace=METRIC_NAMESPACE,
                MetricData=[
                    {
                        "MetricName": metric.value,
                        "Dimensions": [{"Name": METRIC_DIMENSION_FLEET, "Value": self.config.fleet}],
                        "Value": float(delta),
                        "Unit": "Count",
                    }
                    for metric, delta in deltas.items()
                ],
            )


def _serialize(item: dict[str, Any]) -> dict[str, Any]:
    return {key: _SERIALIZER.serialize(value) for key, value in item.items()}


def deadline_text(value: datetime | None) -> str:
    return value.isoformat() if value else "none"
