"""DynamoDB adapter of the lease table: who holds which SQS message, and requeue counters.

One table, two item kinds (``contracts``): leases under ``instance#<id>`` / ``lease#<msg>``
(written by the agent's worker, deleted by it or by the control plane after a requeue) and
per-message interruption requeue counters under ``message#<msg>`` / ``requeues``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from boto3.dynamodb.conditions import Attr, Key

from spotguard_core import dynamo
from spotguard_core.contracts import (
    LEASE_TABLE_PK,
    LEASE_TABLE_SK,
    REQUEUE_COUNTER_ATTRIBUTE,
    REQUEUE_COUNTER_TTL_SECONDS,
    TTL_ATTRIBUTE,
    Env,
    Lease,
    lease_pk,
    requeue_counter_key,
)

LEASE_SK_PREFIX = "lease#"
#: DynamoDB limit: 25 writes per BatchWriteItem.
BATCH_WRITE_LIMIT = 25


class LeaseStore:
    """Reads and writes leases. The table name comes from ``SPOTGUARD_LEASE_TABLE``."""

    def __init__(self, table_name: str | None = None, *, table: Any = None) -> None:
        self.table = table if table is not None else dynamo.table(Env.LEASE_TABLE, table_name)

    @property
    def _client(self) -> Any:
        return self.table.meta.client

    def put(self, lease: Lease) -> None:
        self.table.put_item(Item=lease.to_item())

    def for_instance(self, instance_id: str) -> list[Lease]:
        """Every lease held by ``instance_id`` (Query on the partition, paginated)."""
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key(LEASE_TABLE_PK).eq(lease_pk(instance_id))
            & Key(LEASE_TABLE_SK).begins_with(LEASE_SK_PREFIX),
            "ConsistentRead": True,
        }
        leases: list[Lease] = []
        while True:
            page = self.table.query(**kwargs)
            leases.extend(Lease.from_item(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def scan_leases(self) -> Iterator[Lease]:
        """Every lease in the table (the watchdog's orphan sweep)."""
        kwargs: dict[str, Any] = {"FilterExpression": Attr(LEASE_TABLE_SK).begins_with(LEASE_SK_PREFIX)}
        while True:
            page = self.table.scan(**kwargs)
            for item in page.get("Items", []):
                yield Lease.from_item(item)
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def scan_stale(self, heartbeat_before: float) -> Iterator[Lease]:
        """Leases whose heartbeat is older than ``heartbeat_before`` (epoch seconds)."""
        return (lease for lease in self.scan_leases() if lease.heartbeat_at < heartbeat_before)

    def delete(self, leases: Iterable[Lease]) -> int:
        """Delete leases with BatchWriteItem (25 per call; unprocessed items retried)."""
        keys = [lease.key() for lease in leases]
        for start in range(0, len(keys), BATCH_WRITE_LIMIT):
            requests = [{"DeleteRequest": {"Key": key}} for key in keys[start : start + BATCH_WRITE_LIMIT]]
            self._batch_write(requests)
        return len(keys)

    def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        pending = {self.table.name: requests}
        for attempt in range(8):
            response = self._client.batch_write_item(RequestItems=pending)
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                return
            time.sleep(min(2.0, 0.05 * 2**attempt))
        raise RuntimeError(f"lease deletes left unprocessed after retries: {pending}")

    def increment_requeue_counter(self, message_id: str, *, now: float | None = None) -> None:
        """Add one interruption requeue to the message's counter (``ADD``: creates it at 1).

        One UpdateItem per message: a transaction would save calls on DynamoDB but makes a
        whole group fail together (and moto deep-copies tables per transaction, which made
        the 1,000-lease benchmark take minutes). Callers run these concurrently.
        """
        expires_at = int((now or time.time()) + REQUEUE_COUNTER_TTL_SECONDS)
        self._client.update_item(
            TableName=self.table.name,
            Key=requeue_counter_key(message_id),
            UpdateExpression="ADD #count :one SET #ttl = :ttl",
            ExpressionAttributeNames={"#count": REQUEUE_COUNTER_ATTRIBUTE, "#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={":one": 1, ":ttl": expires_at},
        )

    def requeue_count(self, message_id: str) -> int:
        """How often interruptions requeued ``message_id`` (what the worker subtracts)."""
        item = self.table.get_item(Key=requeue_counter_key(message_id), ConsistentRead=True).get("Item")
        return int(item.get(REQUEUE_COUNTER_ATTRIBUTE, 0)) if item else 0
