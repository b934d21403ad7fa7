"""Give leased messages back to the queue: the one release path of the agent and the control plane.

"Count the interruption requeue, make the message visible, delete the lease" happens here
and nowhere else: the control plane requeues a going-away instance's leases
(``requeue_instance``), the agent releases a task on a drain or a failure, hands back
messages it received but did not start, and at start releases the leases a crashed
predecessor left (``release``).

Order matters (poison rule, see docs/control-plane.md): each message's interruption
requeue counter is written *before* its visibility changes, so the next worker that
receives it already subtracts this receive from ``ApproximateReceiveCount``
(``contracts.genuine_failures``). A counter written for a message whose visibility change
then fails only makes the worker more lenient, never stricter. A failure release
(``interruption=False``) counts nothing: it is a genuine failure.

The calls (bounded by ``concurrency`` or the shared ``executor``; boto3 clients are
thread-safe, the control plane's use botocore's adaptive retries): the counters (one
BatchWriteItem per 25 leases when the leases know their count,
``Lease.interruption_requeues``), the visibility changes (one ``ChangeMessageVisibilityBatch``
per ten leases of one queue), then the lease deletes (25 per BatchWriteItem). The order above
holds per message, not per phase: each chunk of ten waits for the counter calls of its own
ten messages only, so the first chunks are visible while later counters are still being
written. ``requeue_instance`` reads the leases a Query page at a time
(``LeaseStore.release_pages``, only the lease attributes: a first page of 100, then
DynamoDB's own pages) and submits each page as it arrives, so the first messages are back
while the Query is still reading the rest. The deletes start
after the last visibility change: the messages first, the bookkeeping after. 1,000 leases are
180 calls (40 + 100 + 40) plus the Query's two pages. Nothing written is read back. Entries
failing because the message is gone (already deleted by the worker, or the receipt handle is
no longer valid) count as done; throttled or failed entries are retried with exponential
back-off; leases of entries that still failed are kept and reported, so the caller can retry.
A Query page that fails after its retries raises once the pages already read are released.

Standard library + boto3 only: the agent bundle ships this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from spotguard_core.aws import AWS_ERRORS
from spotguard_core.contracts import Lease, Metric
from spotguard_core.lease_store import BATCH_WRITE_LIMIT, LeaseStore
from spotguard_core.ports import MetricsSink

LOGGER = logging.getLogger(__name__)
SQS_BATCH_LIMIT = 10
MAX_ATTEMPTS = 6
#: Chunks of ten released at once: 1,000 leases are 100 chunks, about four rounds.
DEFAULT_CONCURRENCY = 32
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
#: What a counter or lease write may raise: AWS errors and items left unprocessed after retries.
BOOKKEEPING_ERRORS: tuple[type[Exception], ...] = (*AWS_ERRORS, RuntimeError)
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
        return asdict(self)


def _gone(code: str, message: str) -> bool:
    lowered = message.lower()
    return code in GONE_CODES and (
        code != "InvalidParameterValue" or "receipt" in lowered or "does not exist" in lowered
    )


def _batches(items: Sequence[Lease], size: int) -> list[list[Lease]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _one_chunk(leases: Sequence[Lease]) -> bool:
    """One visibility change and one counter call cover these leases."""
    return len(leases) <= SQS_BATCH_LIMIT and len({lease.queue_url for lease in leases}) <= 1


#: One chunk's visibility change: (visible, gone, still failed, when the last became visible).
_VisibilityOutcome = tuple[list[Lease], list[Lease], list[Lease], float | None]


class _Inline:
    """Runs a submitted call at once on the caller's thread (one chunk: no threads)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 - handed to whoever reads the result
            future.set_exception(error)
        return future


@dataclass(kw_only=True)
class Requeuer:
    """``executor``: a long-lived pool shared by every release of the process (the
    dispatcher's: warm threads, one bound across the records it handles at once); without
    one, each release that needs threads starts and stops its own."""

    lease_store: LeaseStore
    sqs: Any
    metrics: MetricsSink | None = None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    concurrency: int = DEFAULT_CONCURRENCY
    executor: Executor | None = None

    def __post_init__(self) -> None:
        self.concurrency = max(1, self.concurrency)

    def requeue_instance(
        self, instance_id: str, *, event_time: datetime | None = None, count_interruption: bool = True
    ) -> RequeueResult:
        """Requeue every lease ``instance_id`` still holds, each Query page as it arrives.
        Raises ``RequeueIncompleteError`` if some messages stayed invisible after retries
        (their leases are kept), or the Query's error after releasing the pages read.
        ``count_interruption=False``: the instance went away without notice (the message may
        be the cause), so the receive is not subtracted from the poison count."""
        return self._release_pages(
            instance_id,
            self.lease_store.release_pages(instance_id),
            visibility_timeout=0,
            interruption=count_interruption,
            leased=True,
            event_time=event_time,
        )

    def requeue_leases(
        self,
        instance_id: str,
        leases: Sequence[Lease],
        *,
        event_time: datetime | None = None,
        count_interruption: bool = True,
    ) -> RequeueResult:
        """Make ``leases``' messages visible now, counted as interruptions unless
        ``count_interruption`` is False (no notice came first: the message may be the cause)."""
        return self.release(instance_id, leases, interruption=count_interruption, event_time=event_time)

    def release(
        self,
        instance_id: str,
        leases: Sequence[Lease],
        *,
        visibility_timeout: int = 0,
        interruption: bool = True,
        leased: bool = True,
        event_time: datetime | None = None,
    ) -> RequeueResult:
        """Give ``leases``' messages back: visible again in ``visibility_timeout`` seconds.

        ``interruption``: count the requeue first (the instance is going away, or the
        message was never started); False for a genuine failure. ``leased``: the leases are
        in the table (False for messages whose lease write failed: nothing to delete).
        Raises ``RequeueIncompleteError`` when some messages are still invisible after
        retries (their leases are kept for whoever retries)."""
        return self._release_pages(
            instance_id,
            [list(leases)],
            visibility_timeout=visibility_timeout,
            interruption=interruption,
            leased=leased,
            event_time=event_time,
        )

    def _release_pages(
        self,
        instance_id: str,
        pages: Iterable[list[Lease]],
        *,
        visibility_timeout: int,
        interruption: bool,
        leased: bool,
        event_time: datetime | None,
    ) -> RequeueResult:
        """The release itself: see the module docstring for the order of the calls."""
        result = RequeueResult(instance_id=instance_id)
        own_pool: ThreadPoolExecutor | None = None
        runner: Any = self.executor
        if runner is None and isinstance(pages, list) and len(pages) == 1 and _one_chunk(pages[0]):
            runner = _Inline()  # the agent's usual case: no threads
        elif runner is None:
            # Threads start on the first submission (none for an instance without leases).
            runner = own_pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="requeue")
        visibility: list[Future[_VisibilityOutcome]] = []
        read_error: Exception | None = None
        try:
            try:
                for page in pages:
                    result.leases += len(page)
                    visibility.extend(self._submit_page(runner, page, visibility_timeout, interruption))
            except AWS_ERRORS as error:
                # Release what was read; the caller retries the signal for the rest.
                read_error = error
            outcomes = [future.result() for future in visibility]
            done = [lease for visible, gone, _, _ in outcomes for lease in visible + gone]
            undeleted: list[Lease] = []
            if leased and done:
                # After every visibility change: the messages first, the bookkeeping after.
                deletes = [runner.submit(self._delete, batch) for batch in _batches(done, BATCH_WRITE_LIMIT)]
                undeleted = [lease for future in deletes for lease in future.result()]
        finally:
            if own_pool is not None:
                own_pool.shutdown(wait=True)
        failed = self._tally(result, outcomes, requeued_now=visibility_timeout == 0, event_time=event_time)
        if read_error is not None:
            raise read_error
        if failed:
            raise RequeueIncompleteError(
                f"{len(failed)} of {result.leases} messages of {instance_id} are still invisible "
                "after retries"
            )
        if undeleted:
            # The messages are back on the queue, but a lease left behind would let a later
            # sweep change the visibility of a copy someone else now holds: retry the signal
            # (the retry finds those messages visible or gone, and deletes the leases).
            raise RequeueIncompleteError(
                f"{len(undeleted)} released leases of {instance_id} could not be deleted after retries"
            )
        return result

    def _tally(
        self,
        result: RequeueResult,
        outcomes: list[_VisibilityOutcome],
        *,
        requeued_now: bool,
        event_time: datetime | None,
    ) -> list[Lease]:
        """Add the chunks' outcomes to ``result``, record the metrics; the failed leases."""
        failed: list[Lease] = []
        visible_at: list[float] = []
        for visible, gone, still_failed, at in outcomes:
            result.requeued += len(visible)
            result.already_gone += len(gone)
            failed.extend(still_failed)
            if at is not None:
                visible_at.append(at)
        self._record(result, failed, requeued_now=requeued_now, visible_at=visible_at, event_time=event_time)
        return failed

    def _submit_page(
        self, runner: Any, page: list[Lease], visibility_timeout: int, interruption: bool
    ) -> list[Future[_VisibilityOutcome]]:
        """Submit one page: its counters (25 a call), then each chunk of ten's visibility
        change, which waits for the counter calls of its own messages only (poison rule)."""
        by_queue: dict[str, list[Lease]] = {}
        for lease in page:
            by_queue.setdefault(lease.queue_url, []).append(lease)
        ordered = [lease for queue_leases in by_queue.values() for lease in queue_leases]
        counted: list[Future[None]] = []
        if interruption:
            counted = [runner.submit(self._count, batch) for batch in _batches(ordered, BATCH_WRITE_LIMIT)]
        futures: list[Future[_VisibilityOutcome]] = []
        position = 0
        for queue_url, queue_leases in by_queue.items():
            for chunk in _batches(queue_leases, SQS_BATCH_LIMIT):
                # The counter batches holding this chunk's messages (one or two of them).
                first, last = position // BATCH_WRITE_LIMIT, (position + len(chunk) - 1) // BATCH_WRITE_LIMIT
                position += len(chunk)
                futures.append(
                    runner.submit(
                        self._change_visibility_after,
                        counted[first : last + 1],
                        queue_url,
                        chunk,
                        visibility_timeout,
                    )
                )
        return futures

    def _change_visibility_after(
        self, counted: list[Future[None]], queue_url: str, chunk: Sequence[Lease], visibility_timeout: int
    ) -> _VisibilityOutcome:
        # Never waits on a call that has not started: the pool takes its work in submission
        # order and the counter calls were submitted first, so they are running or done.
        for future in counted:
            future.result()
        return self._change_visibility(queue_url, chunk, visibility_timeout)

    def _count(self, chunk: Sequence[Lease]) -> None:
        try:
            self.lease_store.count_interruptions(chunk)
        except BOOKKEEPING_ERRORS as error:
            # Never hold a requeue up for bookkeeping: worst case the next receive of these
            # messages counts as one genuine failure; nothing is lost.
            LOGGER.warning("counting %d interruption requeues failed: %s", len(chunk), error)

    def _delete(self, chunk: Sequence[Lease]) -> list[Lease]:
        """Delete released leases; the ones that could not be deleted are returned."""
        try:
            self.lease_store.delete(chunk)
        except BOOKKEEPING_ERRORS as error:
            LOGGER.warning("deleting %d released leases failed: %s", len(chunk), error)
            return list(chunk)
        return []

    def _record(
        self,
        result: RequeueResult,
        failed: list[Lease],
        *,
        requeued_now: bool,
        visible_at: list[float],
        event_time: datetime | None,
    ) -> None:
        metrics = self.metrics
        if result.requeued and event_time is not None and visible_at:
            result.latency_ms = max(0.0, (max(visible_at) - event_time.timestamp()) * 1000)
        if failed:
            result.failed = [lease.message_id for lease in failed]
        if metrics is None:
            return
        if result.requeued and requeued_now:  # made visible at once (not a failure's back-off)
            metrics.add_metric(Metric.MESSAGES_REQUEUED, "Count", result.requeued)
        if result.latency_ms is not None:
            metrics.add_metric(Metric.REQUEUE_LATENCY, "Milliseconds", result.latency_ms)
        if failed:
            metrics.add_metric(Metric.REQUEUE_FAILURES, "Count", len(failed))

    def _change_visibility(
        self, queue_url: str, chunk: Sequence[Lease], visibility_timeout: int
    ) -> _VisibilityOutcome:
        """(visible, gone, still failed, when the last of them became visible)."""
        pending = {str(index): lease for index, lease in enumerate(chunk)}
        visible: list[Lease] = []
        gone: list[Lease] = []
        visible_at: float | None = None
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.sleep(min(2.0, BASE_BACKOFF_SECONDS * 2**attempt))
            entries = [
                {"Id": key, "ReceiptHandle": lease.receipt_handle, "VisibilityTimeout": visibility_timeout}
                for key, lease in pending.items()
            ]
            try:
                response = self.sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in QUEUE_GONE_CODES:
                    gone.extend(pending.values())
                    return visible, gone, [], visible_at
                LOGGER.warning("ChangeMessageVisibilityBatch failed (%s), attempt %d", code, attempt + 1)
                continue  # botocore already retried throttling; back off and try the chunk again
            except AWS_ERRORS as error:
                LOGGER.warning("ChangeMessageVisibilityBatch failed (%s), attempt %d", error, attempt + 1)
                continue
            for success in response.get("Successful", []):
                visible.append(pending.pop(success["Id"]))
                visible_at = self.clock()
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
        return visible, gone, list(pending.values()), visible_at
