"""Make a going-away instance's leased messages visible again, within seconds.

Order matters (poison rule, see docs/control-plane.md): each message's interruption
requeue counter is incremented *before* its visibility changes, so the next worker that
receives it already subtracts this receive from ``ApproximateReceiveCount``
(``contracts.genuine_failures``). A counter incremented for a message whose visibility
change then fails only makes the worker more lenient, never stricter.

``ChangeMessageVisibilityBatch`` to 0, ten entries per call (``ceil(n/10)`` calls per
queue); entries failing because the message is gone (already deleted by the worker, or
the receipt handle is no longer valid) count as done; throttled or failed entries are
retried with exponential back-off. Leases whose message is visible or gone are deleted;
leases of entries that still failed are kept and reported, so the caller can retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from spotguard_core.contracts import Lease, Metric
from spotguard_core.lease_store import LeaseStore
from spotguard_core.ports import MetricsSink

LOGGER = logging.getLogger(__name__)
SQS_BATCH_LIMIT = 10
MAX_ATTEMPTS = 6
#: Chunks of ten requeued at once (boto3 clients are thread-safe).
DEFAULT_CONCURRENCY = 8
BASE_BACKOFF_SECONDS = 0.05
#: Entry error codes meaning the message is not in flight for this receipt handle any more:
#: deleted by the worker, received again elsewhere, or its handle expired. Nothing to do.
GONE_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
        "InvalidParameterValue",
    }
)
#: Whole-call errors meaning the queue itself is gone (its messages with it).
QUEUE_GONE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


class RequeueIncompleteError(RuntimeError):
    """Some messages could not be made visible after retries (transient: retry the signal)."""


@dataclass(slots=True)
class RequeueResult:
    instance_id: str
    leases: int = 0
    requeued: int = 0
    already_gone: int = 0
    failed: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    skipped_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "leases": self.leases,
            "requeued": self.requeued,
            "already_gone": self.already_gone,
            "failed": list(self.failed),
            "latency_ms": self.latency_ms,
            "skipped_reason": self.skipped_reason,
        }


def _gone(code: str, message: str) -> bool:
    lowered = message.lower()
    return code in GONE_CODES and (
        code != "InvalidParameterValue" or "receipt" in lowered or "does not exist" in lowered
    )


class Requeuer:
    def __init__(
        self,
        *,
        lease_store: LeaseStore,
        sqs: Any,
        metrics: MetricsSink,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.lease_store = lease_store
        self.sqs = sqs
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep

    def requeue_instance(
        self, instance_id: str, *, event_time: datetime | None = None, count_interruption: bool = True
    ) -> RequeueResult:
        """Requeue every lease ``instance_id`` still holds. Raises ``RequeueIncompleteError``
        if some messages stayed invisible after retries (their leases are kept).
        ``count_interruption=False``: the instance went away without notice (the message may
        be the cause), so the receive is not subtracted from the poison count."""
        leases = self.lease_store.for_instance(instance_id)
        return self.requeue_leases(
            instance_id, leases, event_time=event_time, count_interruption=count_interruption
        )

    def requeue_leases(
        self,
        instance_id: str,
        leases: Sequence[Lease],
        *,
        event_time: datetime | None = None,
        count_interruption: bool = True,
    ) -> RequeueResult:
        result = RequeueResult(instance_id=instance_id, leases=len(leases))
        if not leases:
            return result
        chunks: list[tuple[str, list[Lease]]] = []
        by_queue: dict[str, list[Lease]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue_url, []).append(lease)
        for queue_url, queue_leases in by_queue.items():
            for start in range(0, len(queue_leases), SQS_BATCH_LIMIT):
                chunks.append((queue_url, queue_leases[start : start + SQS_BATCH_LIMIT]))
        done: list[Lease] = []
        failed: list[Lease] = []
        # Chunks of ten run concurrently: each counts its messages' requeues, then makes
        # them visible; the first messages are back on the queue after two round trips.
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
            for visible, gone, still_failed in pool.map(
                lambda chunk: self._requeue_chunk(*chunk, count_interruption=count_interruption), chunks
            ):
                result.requeued += len(visible)
                result.already_gone += len(gone)
                done.extend(visible + gone)
                failed.extend(still_failed)
        visible_at = self.clock()
        if done:
            self.lease_store.delete(done)
        if result.requeued:
            self.metrics.add_metric(Metric.MESSAGES_REQUEUED, "Count", result.requeued)
            if event_time is not None:
                result.latency_ms = max(0.0, (visible_at - event_time.timestamp()) * 1000)
                self.metrics.add_metric(Metric.REQUEUE_LATENCY, "Milliseconds", result.latency_ms)
        if failed:
            result.failed = [lease.message_id for lease in failed]
            self.metrics.add_metric(Metric.REQUEUE_FAILURES, "Count", len(failed))
            raise RequeueIncompleteError(
                f"{len(failed)} of {len(leases)} messages of {instance_id} are still invisible after retries"
            )
        return result

    def _requeue_chunk(
        self, queue_url: str, chunk: Sequence[Lease], *, count_interruption: bool = True
    ) -> tuple[list[Lease], list[Lease], list[Lease]]:
        # Poison rule: count the interruption *before* the message can be received again.
        if count_interruption:
            for lease in chunk:
                self.lease_store.increment_requeue_counter(lease.message_id)
        return self._change_visibility(queue_url, chunk)

    def _change_visibility(
        self, queue_url: str, chunk: Sequence[Lease]
    ) -> tuple[list[Lease], list[Lease], list[Lease]]:
        pending = {str(index): lease for index, lease in enumerate(chunk)}
        visible: list[Lease] = []
        gone: list[Lease] = []
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.sleep(min(2.0, BASE_BACKOFF_SECONDS * 2**attempt))
            entries = [
                {"Id": entry_id, "ReceiptHandle": lease.receipt_handle, "VisibilityTimeout": 0}
                for entry_id, lease in pending.items()
            ]
            try:
                response = self.sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in QUEUE_GONE_CODES:
                    gone.extend(pending.values())
                    return visible, gone, []
                LOGGER.warning("ChangeMessageVisibilityBatch failed (%s), attempt %d", code, attempt + 1)
                continue  # botocore already retried throttling; back off and try the chunk again
            for success in response.get("Successful", []):
                visible.append(pending.pop(success["Id"]))
            retry: dict[str, Lease] = {}
            for failure in response.get("Failed", []):
                lease = pending.pop(failure["Id"])
                if _gone(failure.get("Code", ""), failure.get("Message", "")):
                    gone.append(lease)
                else:
                    retry[failure["Id"]] = lease
            pending = retry
            if not pending:
                break
        return visible, gone, list(pending.values())
