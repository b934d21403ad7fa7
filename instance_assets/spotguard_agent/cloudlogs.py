"""Agent and task logs in CloudWatch Logs, so they outlive the instance.

A ``logging.Handler`` on the ``spotguard`` loggers (the agent's own lines and every line a
task prints, which the execution logs through ``spotguard.task``): records go into a
bounded queue, a background thread ships them with batched ``PutLogEvents`` to
``Env.LOG_GROUP``, one stream per instance (the instance id). Each event is one JSON line
with the message id when there is one (``{"level", "logger", "message_id", "message"}``),
so Logs Insights can filter one task across instances.

It never blocks the work: ``emit`` only puts into the queue; when the queue is full (CloudWatch
slow or unreachable) the line is dropped and counted, and the next batch carries a line
saying how many were dropped. The thread ships at least every ``FLUSH_SECONDS``; ``flush()``
(called when a drain starts and at exit) ships what is queued now, bounded in time.

Why our own PutLogEvents and not the CloudWatch agent: nothing to install on any AMI (the
agent is python3 + boto3 already; the CloudWatch agent is a separate package and its own
daemon and configuration), the drain path decides when to flush (the CloudWatch agent tails
journald/files on its own schedule and is killed with the instance), and the instance
role's permission stays one log group. The cost: logs of the bootstrap before the agent
starts stay in the journal and ``/var/log/spotguard-bootstrap.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
import time
from typing import Any

#: Thread-local id of the message the current thread works on (set by the worker).
_CURRENT = threading.local()
FLUSH_SECONDS = 1.0
QUEUE_LIMIT = 10_000
#: PutLogEvents limits: 10,000 events and 1,048,576 bytes (message bytes + 26 per event).
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_000_000
MAX_EVENT_BYTES = 200_000  # events are limited to 256 KB; longer lines are cut (marked)
EVENT_OVERHEAD_BYTES = 26


def set_message_id(message_id: str | None) -> None:
    _CURRENT.message_id = message_id


def current_message_id() -> str | None:
    return getattr(_CURRENT, "message_id", None)


class CloudLogsHandler(logging.Handler):
    def __init__(self, logs_client: Any, *, group: str, stream: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.client = logs_client
        self.group = group
        self.stream = stream
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._dropped = 0
        #: Lines dropped since start (queue full); each batch reports its share too.
        self.dropped = 0
        self._dropped_lock = threading.Lock()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_requested = 0
        self._flush_done = 0
        self._shutdown = threading.Event()
        self._stream_ready = False
        self.shipped = 0
        self._thread = threading.Thread(target=self._run, name="cloudlogs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message_id = getattr(record, "message_id", None) or current_message_id()
            line = {
                "level": record.levelname,
                "logger": record.name,
                "message_id": message_id,
                "message": record.getMessage(),
            }
            if record.exc_info:
                line["exception"] = logging.Formatter().formatException(record.exc_info)
            event = {"timestamp": int(record.created * 1000), "message": json.dumps(line)}
            self._queue.put_nowait(event)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1
                self.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)

    def flush(self) -> None:
        self.ship(timeout=5.0)

    def ship(self, timeout: float = 5.0) -> bool:
        """Ship what is queued now; True when it was shipped within ``timeout``."""
        with self._flushed:
            self._flush_requested += 1
            wanted = self._flush_requested
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self._flush_done < wanted and time.monotonic() < deadline:
                self._flushed.wait(0.05)
            return self._flush_done >= wanted

    def ship_now(self) -> None:
        """Wake the shipping thread without waiting for it (the drain path)."""
        self._wake.set()

    def close(self) -> None:
        self.flush()
        self._shutdown.set()
        self._wake.set()
        super().close()

    # ------------------------------------------------------------------ shipping thread
    def _run(self) -> None:
        while not self._shutdown.is_set():
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            with self._flushed:
                requested = self._flush_requested
            try:
                self._ship_queued()
            except Exception as error:  # noqa: BLE001 - never die: the next round retries
                _stderr(f"cloudlogs: shipping failed: {error}")
            with self._flushed:
                self._flush_done = max(self._flush_done, requested)
                self._flushed.notify_all()

    def _ship_queued(self) -> None:
        events: list[dict[str, Any]] = []
        with contextlib.suppress(queue.Empty):
            while len(events) < MAX_BATCH_EVENTS * 2:
                events.append(self._queue.get_nowait())
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            notice = {"level": "WARNING", "logger": "spotguard.cloudlogs", "message_id": None}
            notice["message"] = f"{dropped} log lines dropped (CloudWatch Logs too slow)"
            events.append({"timestamp": int(time.time() * 1000), "message": json.dumps(notice)})
        if not events:
            return
        events.sort(key=lambda event: event["timestamp"])  # PutLogEvents wants them in order
        for batch in _batches(events):
            self._put(batch)

    def _put(self, batch: list[dict[str, Any]]) -> None:
        if not self._stream_ready:
            self._create_stream()
        try:
            self.client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=batch)
        except Exception as error:
            if _code(error) != "ResourceNotFoundException":
                raise
            self._create_stream()
            self.client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=batch)
        self.shipped += len(batch)

    def _create_stream(self) -> None:
        try:
            self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
        except Exception as error:
            if _code(error) != "ResourceAlreadyExistsException":
                raise
        self._stream_ready = True


def _batches(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for original in events:
        event = original
        if len(event["message"].encode()) > MAX_EVENT_BYTES:
            event = {**event, "message": event["message"][: MAX_EVENT_BYTES // 4] + " …[cut]"}
        event_size = len(event["message"].encode()) + EVENT_OVERHEAD_BYTES
        if current and (len(current) >= MAX_BATCH_EVENTS or size + event_size > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(event)
        size += event_size
    if current:
        batches.append(current)
    return batches


def _code(error: Exception) -> str:
    response = getattr(error, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _stderr(text: str) -> None:
    # Not through logging: this handler is on the logging path itself.
    with contextlib.suppress(Exception):
        sys.stderr.write(text + "\n")


def attach(logs_client: Any, *, group: str, instance_id: str) -> CloudLogsHandler:
    """Ship the ``spotguard`` loggers (agent and tasks) to ``group``/``instance_id``."""
    handler = CloudLogsHandler(logs_client, group=group, stream=instance_id)
    logger = logging.getLogger("spotguard")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def detach(handler: CloudLogsHandler) -> None:
    logging.getLogger("spotguard").removeHandler(handler)
    handler.close()
