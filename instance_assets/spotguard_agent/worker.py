"""The draining SQS worker.

Per receive (up to ten messages): poison check (the requeue counters are read in one
BatchGetItem, and only for messages received before) -> leases written in one
BatchWriteItem -> each handler runs (visibility extended and lease heartbeat refreshed while
it runs) -> deletes batched (DeleteMessageBatch, then the leases in one BatchWriteItem) /
release with backoff on failure. A message whose lease could not be written is never
started. While recent tasks are short the worker receives up to ``prefetch`` messages
ahead of its free slots (leased like the others), so one receive and one lease batch serve
up to ten messages. The receive loop hands each receive to the intake thread (poison check,
lease write, queueing) and receives again at once, so the next receive overlaps this one's
lease write; when tasks are so short that the backlog would be worked off before a receive
and its lease write could bring more (``_intake_seconds``, measured), it receives the next
batch ahead while every slot is busy.

A drain (IMDS notice, the control plane's order in the fleet record, SIGTERM) stops
receiving, hands back at once what was received but not started, lets tasks finish that fit
before ``deadline - drain_margin`` and releases the rest at once, then ``run()`` records
``drained_at`` and returns 0. On start, the agent first releases the leases its instance
still holds (a crash and a systemd restart): their messages are not worth a visibility
timeout.

Every give-back goes through ``spotguard_core.requeue.Requeuer.release``, the control
plane's own release path: count the interruption requeue, make the message visible, delete
the lease. Handing back (drain, arrived during a drain, lease write failed, left by a
crashed predecessor) counts as an interruption; a handler failure does not.

Poison rule: SQS's ``ApproximateReceiveCount`` also counts receives that ended because an
instance went away. Interruption requeues are counted per message
(``contracts.requeue_counter_key``); only ``contracts.genuine_failures(receive_count,
requeues)`` count toward ``max_failures``. When it is reached the worker moves the message
to the DLQ itself (send a copy, delete), so interruptions never push healthy tasks there.
The queue's redrive policy stays as a backstop far above that threshold.

While it holds leases the instance is protected from scale-in (ASG instance protection,
best effort, set at once, cleared after ``protection_idle_seconds`` idle).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spotguard_core.aws import AWS_ERRORS
from spotguard_core.contracts import (
    AGENT_METRIC_NAMESPACE,
    METRIC_DIMENSION_FLEET,
    RECEIVE_COUNT_ATTRIBUTE,
    FleetRecord,
    InstanceState,
    Lease,
    Metric,
    Signal,
    SignalKind,
    SignalSource,
    genuine_failures,
    now,
    utc_from_epoch,
)
from spotguard_core.lease_store import LeaseStore
from spotguard_core.requeue import BOOKKEEPING_ERRORS, RequeueIncompleteError, Requeuer

from spotguard_agent import cloudlogs
from spotguard_agent.awsclients import AwsClients
from spotguard_agent.config import AgentConfig
from spotguard_agent.execution import EXECUTION_METRICS, Execution, WorkloadConfig, build_execution
from spotguard_agent.fleet_reporter import FleetReporter
from spotguard_agent.handler_host import ExpectedSeconds, estimate_seconds, load_handler

LOG = logging.getLogger("spotguard.worker")
MAX_BACKOFF_SECONDS = 900
SQS_BATCH_LIMIT = 10
#: A message whose lease could not be written comes back after this long (not at once: the
#: table may be throttling, and an immediate redelivery would only fail the same way).
LEASE_FAILURE_VISIBILITY_SECONDS = 5
#: Prefetch only while the mean task takes at most this long: a prefetched message then
#: waits a few seconds at most, and long tasks never hoard messages other instances could run.
PREFETCH_MAX_TASK_SECONDS = 0.5
#: Weight of the newest task in the running mean of task durations (and of intake times).
DURATION_SMOOTHING = 0.2
#: ``Signal.attributes["origin"]`` of a drain ordered through the fleet record.
FLEET_RECORD_ORIGIN = "fleet_record"
#: ``Signal.attributes["origin"]`` of a drain because the process is told to stop (SIGTERM,
#: SIGINT: ``systemctl restart``, an upgrade, a shutdown). It says nothing about the
#: instance: the fleet record is left alone (a draining record cannot go back to ready, and
#: the restarted agent would obey it), no ``drained_at`` either.
PROCESS_STOP_ORIGIN = "process_stop"
RELEASE_ERRORS: tuple[type[Exception], ...] = (RequeueIncompleteError, *BOOKKEEPING_ERRORS)


class TaskState(enum.Enum):
    QUEUED = "queued"  # received and leased, not started yet
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"


HELD_STATES = frozenset({TaskState.QUEUED, TaskState.RUNNING})


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
    state: TaskState = TaskState.QUEUED
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
        reporter: FleetReporter | None = None,
        workload: WorkloadConfig | None = None,
    ) -> None:
        config.validate_worker()
        self.config = config
        self.instance_id = instance_id
        self.clients = clients or AwsClients(config.region)
        self.reporter = reporter or FleetReporter(
            self.clients,
            instance_id=instance_id,
            fleet=config.fleet,
            fleet_table=config.fleet_table,
            arn_prefix=config.instance_arn_prefix,
        )
        # The user's work runs in child processes (spotguard_agent.execution); the handler
        # reports its expected_seconds from there, per task.
        self.workload = workload or WorkloadConfig.from_agent_config(config)
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
            slots=config.concurrency,
        )
        self.sqs = self.clients.sqs
        # Keys under this instance's ARN; counters one item at a time (the instance role's limits).
        self.leases = LeaseStore(
            config.lease_table,
            clients=self.clients,
            arn_prefix=config.instance_arn_prefix,
            batch_counters=False,
        )
        self.requeuer = Requeuer(lease_store=self.leases, sqs=self.sqs)
        self._tasks: dict[str, Task] = {}
        self._tasks_lock = threading.Lock()
        #: Notified whenever a task ends or a delete batch finishes (the receive loop waits on it).
        self._changed = threading.Condition(self._tasks_lock)
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="task")
        #: One thread: receives are taken in order, each while the next one is received.
        self._intake = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        #: Messages received and not yet taken (leased and queued, or given back).
        self._in_transit = 0
        #: Running mean of a receive plus its intake (lease write), in seconds.
        self._intake_seconds: float | None = None
        self._deletes = DeleteBatcher(self)
        self._protection = ScaleInProtection(self)
        self._stop = threading.Event()  # stop receiving
        self._drain_lock = threading.Lock()
        self.drain_signal: Signal | None = None
        self.drain_started_at: float | None = None  # epoch seconds
        self._deadline_monotonic: float | None = None
        self._deadline_epoch: float | None = None
        self._lifecycle_terminating = False
        self._drain_report: threading.Thread | None = None
        self._mean_task_seconds: float | None = None
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

    def held_tasks(self) -> list[Task]:
        """Tasks whose lease this worker holds: running or received and waiting for a slot."""
        with self._tasks_lock:
            return [t for t in self._tasks.values() if t.state in HELD_STATES]

    def holds_leases(self) -> bool:
        with self._tasks_lock:
            held = self._in_transit > 0
            held = held or any(t.state is not TaskState.RELEASED for t in self._tasks.values())
        return held or not self._deletes.idle()

    def status(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "draining": self.draining,
            "drain_kind": self.drain_signal.kind.value if self.drain_signal else None,
            "running_tasks": len(self.running_tasks()),
            "held_tasks": len(self.held_tasks()),
            "counters": {m.value: n for m, n in self.counters.items()},
        }

    def _count(self, metric: Metric, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[metric] += n

    # ------------------------------------------------------------------ drain: the one path
    def drain(self, signal: Signal) -> None:
        """Stop taking work; finish what fits before the deadline, release the rest now.

        Called by the IMDS watcher, by the fleet record's drain order, by SIGTERM and by the
        CLI; a later signal can only make the deadline earlier.
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
                self._deadline_epoch = signal.deadline.timestamp() if signal.deadline else None
            elif deadline_monotonic is not None and (
                self._deadline_monotonic is None or deadline_monotonic < self._deadline_monotonic
            ):
                self._deadline_monotonic = deadline_monotonic
                self._deadline_epoch = signal.deadline.timestamp() if signal.deadline else None
            if signal.kind is SignalKind.LIFECYCLE_TERMINATE:
                self._lifecycle_terminating = True
            self._stop.set()
        LOG.warning(
            "draining (%s, deadline %s, requeue %s)",
            signal.kind.value,
            signal.deadline.isoformat() if signal.deadline else "none",
            "on" if self.config.requeue_enabled else "off",
        )
        with self._tasks_lock:
            self._changed.notify_all()
        self._release_what_does_not_fit()
        if first and signal.attributes.get("origin") not in (FLEET_RECORD_ORIGIN, PROCESS_STOP_ORIGIN):
            # The control plane already wrote its own order; record only what we saw first.
            deadline_epoch = signal.deadline.timestamp() if signal.deadline else None
            self._drain_report = threading.Thread(
                target=self.reporter.draining, args=(deadline_epoch, signal), daemon=True
            )
            self._drain_report.start()

    def follow_fleet_record(self, record: FleetRecord | None) -> None:
        """The control plane's drain channel: ``state == draining`` in our own record means
        drain by ``drain_deadline_at`` (whatever decided it: Health event, early
        replacement, an operator). Read on every fleet heartbeat."""
        if record is None or record.state is not InstanceState.DRAINING:
            return
        deadline = utc_from_epoch(record.drain_deadline_at) if record.drain_deadline_at else None
        if self.drain_signal is not None and (
            deadline is None
            or (self._deadline_epoch is not None and deadline.timestamp() >= self._deadline_epoch)
        ):
            return  # already draining, and the record does not bring the deadline forward
        last = record.last_signal or {}
        try:
            kind = SignalKind(last.get("kind", ""))
        except ValueError:
            kind = SignalKind.DRAIN_DEADLINE
        try:
            source = SignalSource(last.get("source", ""))
        except ValueError:
            source = SignalSource.EVENTBRIDGE
        received = datetime.now(UTC)
        LOG.warning("the fleet record orders a drain (%s)", kind.value)
        self.drain(
            Signal(
                instance_id=self.instance_id,
                kind=kind,
                source=source,
                event_id=str(last.get("event_id") or f"fleet-record:{self.instance_id}"),
                received_at=received,
                deadline=deadline,
                state=last.get("state"),
                event_time=received,
                attributes={"origin": FLEET_RECORD_ORIGIN},
            )
        )

    def _release_what_does_not_fit(self) -> None:
        if not self.config.requeue_enabled:
            return  # baseline mode: received tasks go on, nothing is released early
        queued = [task for task in self.held_tasks() if task.state is TaskState.QUEUED]
        if queued:
            self._hand_back(queued, reason="drain: received, not started")
        deadline = self._deadline_monotonic
        late = [task for task in self.running_tasks() if not task.fits(deadline)]
        if deadline is not None and time.monotonic() >= deadline:
            late = self.running_tasks()
        if not late:
            return

        def release(task: Task) -> None:
            if self._release(task, visibility=0, reason="drain"):
                self._count(Metric.TASKS_RELEASED_ON_DRAIN)

        if len(late) == 1:
            release(late[0])
            return
        with ThreadPoolExecutor(max_workers=min(len(late), 16), thread_name_prefix="release") as pool:
            list(pool.map(release, late))

    # ------------------------------------------------------------------ main loop
    def request_stop(self) -> None:
        """Stop without a notice (tests, ``KeyboardInterrupt``): running tasks finish."""
        self._stop.set()
        with self._tasks_lock:
            self._changed.notify_all()

    def run(self) -> int:
        # A drain ordered while this agent was not running (or before it started) applies now.
        self.follow_fleet_record(self.reporter.heartbeat())
        self._release_leftover_leases()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        self._deletes.start()
        self._protection.start()
        LOG.info(
            "worker started: queue %s, handler %s, concurrency %d",
            self.config.work_queue_url,
            self.config.handler,
            self.config.concurrency,
        )
        try:
            while not self._stop.is_set():
                room = self._room()
                if room <= 0:
                    with self._tasks_lock:
                        self._changed.wait(0.2)
                    continue
                receive_started = time.monotonic()
                try:
                    messages = self._receive(min(SQS_BATCH_LIMIT, room))
                except AWS_ERRORS as error:
                    LOG.warning("receive failed: %s", error)
                    self._stop.wait(1.0)
                    continue
                if messages:
                    with self._tasks_lock:
                        self._in_transit += len(messages)
                    self._intake.submit(self._take_received, messages, receive_started)
            self._wait_for_tasks()
        finally:
            self._intake.shutdown(wait=True)
            self._close_execution()
            self._pool.shutdown(wait=False)
            self._deletes.close()
            self._flush_metrics()
        if self._lifecycle_terminating:
            self.reporter.complete_lifecycle(
                self.config.asg_name, self.config.terminate_hook_name, "CONTINUE"
            )
        if self._drain_report is not None:
            self._drain_report.join(timeout=10)  # the process exits right after run()
        instance_drain = (
            self.drain_signal is not None
            and self.drain_signal.attributes.get("origin") != PROCESS_STOP_ORIGIN
        )
        if instance_drain and not self.holds_leases():
            self.reporter.drained()
        self._protection.stop()
        LOG.info("worker stopped: %s", json.dumps(self.status()["counters"]))
        return 0

    def _room(self) -> int:
        """How many more messages to receive now: free slots, plus the prefetch while tasks are short."""
        limit = self.config.concurrency
        mean = self._mean_task_seconds
        prefetching = bool(self.config.prefetch) and mean is not None and mean <= PREFETCH_MAX_TASK_SECONDS
        with self._tasks_lock:
            held = len(self._tasks) + self._in_transit
        if not prefetching:
            return limit - held
        if held <= limit:
            # The backlog has run down to what is running: one receive and one lease batch
            # then serve a full batch, not the one slot that just came free.
            return limit + self.config.prefetch - held
        # Every slot is busy and a backlog waits. Receive the next batch ahead only when the
        # backlog will be worked off before a receive and its lease write could bring one
        # (tasks this short wait for round trips, not for slots): at most one batch ahead.
        intake = self._intake_seconds
        if mean is None or intake is None or held > limit + self.config.prefetch:
            return 0
        return SQS_BATCH_LIMIT if held * mean / limit <= intake else 0

    def _take_received(self, messages: list[dict[str, Any]], receive_started: float) -> None:
        """The intake thread's part of a receive: take it, then measure receive + intake."""
        try:
            self._take(messages)
        except Exception:  # the intake must outlive any single failure; the leases say what was taken
            LOG.exception("taking %d received messages failed", len(messages))
        finally:
            took = time.monotonic() - receive_started
            previous = self._intake_seconds
            smoothed = took if previous is None else previous + DURATION_SMOOTHING * (took - previous)
            self._intake_seconds = smoothed
            with self._tasks_lock:
                self._in_transit -= len(messages)
                self._changed.notify_all()

    def _wait_for_tasks(self) -> None:
        """Until no task is held and every delete is done. Released tasks whose handler has
        not noticed yet do not hold the exit up: their messages are already back on the queue."""
        while self.holds_leases():
            time.sleep(0.05)

    def _release_leftover_leases(self) -> None:
        """Leases this instance still holds at start belong to a crashed predecessor (systemd
        restarted us): their messages go back now, counted as interruptions."""
        try:
            leftover = self.leases.for_instance(self.instance_id)
            if leftover:
                result = self.requeuer.release(self.instance_id, leftover, interruption=True)
                LOG.warning(
                    "released %d leases left by a previous run (%d already gone)",
                    result.requeued,
                    result.already_gone,
                )
        except RELEASE_ERRORS as error:
            LOG.warning("releasing leases left by a previous run failed: %s", error)

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

    def _lease_for(self, message: dict[str, Any], requeues: int | None) -> Lease:
        at = now()
        return Lease(
            instance_id=self.instance_id,
            message_id=str(message["MessageId"]),
            receipt_handle=str(message["ReceiptHandle"]),
            queue_url=self.config.work_queue_url,
            leased_at=at,
            heartbeat_at=at,
            interruption_requeues=requeues,
        )

    def _take(self, messages: list[dict[str, Any]]) -> None:
        """Take one receive: poison checks, one lease batch, then the tasks are queued."""
        if self._stop.is_set():
            # Arrived after the drain (or stop) began and not started: give it straight back.
            leases = [self._lease_for(m, 0 if _receive_count(m) == 1 else None) for m in messages]
            self._give_back(leases, leased=False, reason="received after the drain began")
            return
        receive_counts = {str(m["MessageId"]): _receive_count(m) for m in messages}
        # A first receive cannot have been requeued: read counters only for the others.
        again = [message_id for message_id, count in receive_counts.items() if count > 1]
        known: dict[str, int] | None = {}
        if again:
            try:
                known = self.leases.requeue_counts(again)
            except BOOKKEEPING_ERRORS as error:
                # Unknown: do not risk sending a healthy message to the DLQ.
                LOG.warning("requeue counters unreadable, skipping the poison check: %s", error)
                known = None
        tasks: list[Task] = []
        for message in messages:
            message_id = str(message["MessageId"])
            receive_count = receive_counts[message_id]
            requeues: int | None = 0
            if receive_count > 1:
                requeues = known.get(message_id, 0) if known is not None else None
            if requeues is not None and self._is_poison(message, receive_count, requeues):
                continue
            tasks.append(self._task_for(message, receive_count, requeues))
        if not tasks:
            return
        try:
            unwritten = self.leases.put_many([task.lease for task in tasks])
        except AWS_ERRORS as error:
            LOG.warning("lease write failed for %d messages, not starting them: %s", len(tasks), error)
            unwritten = [task.lease for task in tasks]
        if unwritten:
            # Without a lease nobody could requeue the message if this instance vanished: do
            # not start it. Not the message's fault: counted as an interruption.
            failed_ids = {lease.message_id for lease in unwritten}
            self._give_back(
                unwritten,
                leased=False,
                visibility=LEASE_FAILURE_VISIBILITY_SECONDS,
                reason="lease write failed",
            )
            tasks = [task for task in tasks if task.message_id not in failed_ids]
        with self._tasks_lock:
            for task in tasks:
                self._tasks[task.message_id] = task
        for task in tasks:
            self._pool.submit(self._execute, task)

    def _task_for(self, message: dict[str, Any], receive_count: int, requeues: int | None) -> Task:
        message_id = str(message["MessageId"])
        body = str(message.get("Body", ""))
        expected = estimate_seconds(
            self.expected_seconds,
            body,
            lambda error: LOG.info("expected_seconds failed for %s: %s", message_id, error),
        )
        return Task(
            message=message,
            lease=self._lease_for(message, requeues),
            receive_count=receive_count,
            requeues=requeues or 0,
            started=time.monotonic(),
            expected_seconds=expected,
            context=TaskContext(message_id, receive_count, dict(message.get("MessageAttributes", {}))),
            last_extended=time.monotonic(),
        )

    def _give_back(self, leases: Sequence[Lease], *, leased: bool, reason: str, visibility: int = 0) -> None:
        """Hand messages back that this worker will not start, counted as interruptions."""
        try:
            self.requeuer.release(
                self.instance_id, leases, visibility_timeout=visibility, interruption=True, leased=leased
            )
        except RELEASE_ERRORS as error:
            LOG.warning("handing back %d messages (%s) failed: %s", len(leases), reason, error)
            return
        LOG.info("handed back %d messages (%s)", len(leases), reason)

    def _hand_back(self, tasks: Sequence[Task], *, reason: str) -> None:
        """Queued (received, not started) tasks go back at once, counted as interruptions."""
        taken: list[Task] = []
        for task in tasks:
            with task.lock:
                if task.state is not TaskState.QUEUED:
                    continue
                task.state = TaskState.RELEASED
                task.context.released.set()
                taken.append(task)
        if not taken:
            return
        self._give_back([task.lease for task in taken], leased=True, reason=reason)
        with self._tasks_lock:
            for task in taken:
                self._tasks.pop(task.message_id, None)
            self._changed.notify_all()
        self._count(Metric.TASKS_RELEASED_ON_DRAIN, len(taken))

    def _begin(self, task: Task) -> bool:
        """Start a queued task, unless a drain began while it waited for a slot."""
        if self._stop.is_set() and self.config.requeue_enabled:
            self._hand_back([task], reason="drain: received, not started")
            return False
        with task.lock:
            if task.state is not TaskState.QUEUED:
                return False
            task.state = TaskState.RUNNING
            task.started = time.monotonic()
        return True

    def _finished(self, task: Task, began: bool) -> None:
        if began:
            duration = time.monotonic() - task.started
            previous = self._mean_task_seconds
            self._mean_task_seconds = (
                duration if previous is None else previous + DURATION_SMOOTHING * (duration - previous)
            )
        with self._tasks_lock:
            self._tasks.pop(task.message_id, None)
            self._changed.notify_all()

    # ------------------------------------------------------------------ one task
    def _execute(self, task: Task) -> None:
        began = False
        cloudlogs.set_message_id(task.message_id)  # every log line of this task names it
        try:
            began = self._begin(task)
            if not began:
                return
            try:
                self.execution.run(task)  # returns once done or released; raises on failure
            except Exception as error:  # noqa: BLE001 - any handler exception is a task failure
                self._on_failure(task, error)
            else:
                self._on_success(task)
        finally:
            self._finished(task, began)
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
        # Deleted in batches (DeleteMessageBatch, then the leases); counted as completed then,
        # and its checkpoint deleted (execution.succeeded).
        self._deletes.put(task)

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
        """Give one task's message back (the core release path): an interruption
        (``RELEASED``: counted first, so the next receive is not taken for a failed attempt)
        or a failure (``FAILED``: visible again after the backoff, not counted)."""
        with task.lock:
            if task.state not in HELD_STATES:
                return False
            task.state = final_state
            task.context.released.set()
            try:
                self.requeuer.release(
                    self.instance_id,
                    [task.lease],
                    visibility_timeout=visibility,
                    interruption=final_state is TaskState.RELEASED,
                )
            except RELEASE_ERRORS as error:
                # The lease stays: if this instance goes away the control plane requeues it.
                LOG.warning("release of %s (%s) failed: %s", task.message_id, reason, error)
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
        return self._stop.is_set() and not self.holds_leases()

    def _extend_until_idle(self) -> None:
        extend_every = max(0.5, self.config.visibility_timeout_seconds / 3)
        while not self._idle_after_stop():
            current = time.monotonic()
            due = [task for task in self.held_tasks() if current - task.last_extended >= extend_every]
            for start in range(0, len(due), SQS_BATCH_LIMIT):
                self._extend(due[start : start + SQS_BATCH_LIMIT])
            if self._stop.is_set():
                self._release_what_does_not_fit()
            time.sleep(0.1)

    def _report_until_stopped(self) -> None:
        next_fleet = time.monotonic() + self.config.fleet_heartbeat_seconds  # run() sent the first
        next_lifecycle = 0.0
        next_metrics = time.monotonic() + 60
        while not self._idle_after_stop():
            current = time.monotonic()
            if current >= next_fleet:
                next_fleet = current + self.config.fleet_heartbeat_seconds
                self.follow_fleet_record(self.reporter.heartbeat())
            if self._lifecycle_terminating and current >= next_lifecycle:
                next_lifecycle = current + 30
                self.reporter.lifecycle_heartbeat(self.config.asg_name, self.config.terminate_hook_name)
            if current >= next_metrics:
                next_metrics = current + 60
                self._flush_metrics()
            time.sleep(0.2)

    def _extend(self, tasks: Sequence[Task]) -> None:
        """One ChangeMessageVisibilityBatch for up to ten held tasks, then their lease heartbeats.
        The tasks' locks are held across the call, so a release never races an extension
        (which would hide a released message again)."""
        locked: list[Task] = []
        try:
            for task in tasks:
                task.lock.acquire()
                if task.state in HELD_STATES:
                    locked.append(task)
                else:
                    task.lock.release()
            if not locked:
                return
            at = time.monotonic()
            for task in locked:
                task.last_extended = at
            entries = [
                {
                    "Id": str(index),
                    "ReceiptHandle": task.receipt_handle,
                    "VisibilityTimeout": self.config.visibility_timeout_seconds,
                }
                for index, task in enumerate(locked)
            ]
            try:
                response = self.sqs.change_message_visibility_batch(
                    QueueUrl=self.config.work_queue_url, Entries=entries
                )
                for failure in response.get("Failed", []):
                    LOG.warning("visibility extension failed for one message: %s", failure.get("Message"))
            except AWS_ERRORS as error:
                LOG.warning("visibility extension failed for %d messages: %s", len(locked), error)
        finally:
            for task in locked:
                task.lock.release()
        stamp = now()
        for task in locked:
            try:
                self.leases.heartbeat(task.lease, stamp)
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
                Namespace=AGENT_METRIC_NAMESPACE,
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


def _receive_count(message: dict[str, Any]) -> int:
    return int(message.get("Attributes", {}).get(RECEIVE_COUNT_ATTRIBUTE, "1"))


class DeleteBatcher:
    """Deletes finished messages in batches: DeleteMessageBatch (ten per call), then their
    leases in one BatchWriteItem. No linger: whatever finished while a batch was in flight
    forms the next one, so a lone task is deleted at once and a busy worker pays one round
    trip per ten messages. ``DELETE_THREADS`` batches are in flight at once: one batch is two
    calls in sequence (the message first, so a failed delete never leaves a message without
    its lease), and with one thread those two round trips per ten messages capped a busy
    worker below a bare receive/delete loop. A second batch starts beside one in flight
    only when it is full."""

    DELETE_THREADS = 2

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._pending: list[Task] = []
        self._in_flight = 0
        self._closed = False
        self._condition = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"deletes-{index}", daemon=True)
            for index in range(self.DELETE_THREADS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def put(self, task: Task) -> None:
        with self._condition:
            self._pending.append(task)
            self._condition.notify_all()

    def idle(self) -> bool:
        with self._condition:
            return not self._pending and not self._in_flight

    def pending_count(self) -> int:
        """Finished tasks waiting for a delete batch."""
        with self._condition:
            return len(self._pending)

    def _batch_ready(self) -> bool:
        """With nothing in flight any pending task goes at once; beside a batch in flight
        only a full one starts (a partial one would cost two calls for a few messages)."""
        if not self._pending:
            return False
        return not self._in_flight or len(self._pending) >= SQS_BATCH_LIMIT

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not self._batch_ready():
                    self._condition.wait()
                if not self._pending:
                    return
                batch = self._pending[:SQS_BATCH_LIMIT]
                del self._pending[:SQS_BATCH_LIMIT]
                self._in_flight += len(batch)
            try:
                self._delete(batch)
            except Exception:  # the delete thread must outlive any single failure
                LOG.exception("delete batch failed")
            finally:
                with self._condition:
                    self._in_flight -= len(batch)
                    self._condition.notify_all()
                with self.worker._tasks_lock:
                    self.worker._changed.notify_all()

    def _delete(self, batch: list[Task]) -> None:
        worker = self.worker
        entries = [
            {"Id": str(index), "ReceiptHandle": task.receipt_handle} for index, task in enumerate(batch)
        ]
        deleted = list(batch)
        try:
            response = worker.sqs.delete_message_batch(QueueUrl=worker.config.work_queue_url, Entries=entries)
            for failure in response.get("Failed", []):
                task = batch[int(failure["Id"])]
                deleted.remove(task)
                LOG.warning(
                    "delete failed for %s (it will be redelivered): %s", task.message_id, failure.get("Code")
                )
        except AWS_ERRORS as error:
            deleted = []
            LOG.warning("delete of %d messages failed (they will be redelivered): %s", len(batch), error)
        try:
            worker.leases.delete([task.lease for task in batch])
        except BOOKKEEPING_ERRORS as error:
            LOG.warning("lease delete failed for %d messages: %s", len(batch), error)
        worker.execution.succeeded(deleted)  # done for good: their checkpoints are not needed any more
        worker._count(Metric.TASKS_COMPLETED, len(batch))


class ScaleInProtection:
    """ASG instance protection while the worker holds leases (the ``sqs-ec2-spot-asg``
    pattern): set as soon as it is busy, cleared once it has been idle for
    ``protection_idle_seconds`` (an idle fleet must always be able to scale in). Runs on its
    own thread and is best effort: a failed call never delays work, it is retried later."""

    POLL_SECONDS = 0.2
    RETRY_SECONDS = 30.0

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.protected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-in-protection", daemon=True)

    @property
    def enabled(self) -> bool:
        return bool(self.worker.config.asg_name)

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.protected:
            self._apply(False)

    def _apply(self, protected: bool) -> bool:
        if self.worker.reporter.set_scale_in_protection(self.worker.config.asg_name, protected):
            self.protected = protected
            return True
        return False

    def _run(self) -> None:
        idle_since: float | None = None
        retry_at = 0.0
        while not self._stop.wait(self.POLL_SECONDS):
            current = time.monotonic()
            busy = self.worker.holds_leases()
            idle_since = None if busy else (idle_since if idle_since is not None else current)
            wanted = busy or (
                self.protected
                and idle_since is not None
                and current - idle_since < self.worker.config.protection_idle_seconds
            )
            if wanted != self.protected and current >= retry_at and not self._apply(wanted):
                retry_at = current + self.RETRY_SECONDS
