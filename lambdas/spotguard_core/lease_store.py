"""DynamoDB adapter of the lease table: who holds which SQS message, and requeue counters.

One table, two item kinds (``contracts``): leases under the instance key (its ARN,
``contracts.instance_key``) / ``lease#<msg>`` (written by the agent's worker, deleted by it or
by the control plane after a requeue) and per-message interruption requeue counters under
``message#<msg>`` / ``requeues``.

The agent and the control plane both use this class (standard library + boto3 only: the
agent bundle ships it); nothing else writes the table.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from boto3.dynamodb.conditions import Attr, Key

from spotguard_core import aws, dynamo
from spotguard_core.contracts import (
    LEASE_TABLE_PK,
    LEASE_TABLE_SK,
    REQUEUE_COUNTER_ATTRIBUTE,
    REQUEUE_COUNTER_PK_PREFIX,
    REQUEUE_COUNTER_TTL_SECONDS,
    TTL_ATTRIBUTE,
    Env,
    Lease,
    checked_instance_arn_prefix,
    instance_key,
    lease_sk,
    requeue_counter_key,
)

LEASE_SK_PREFIX = lease_sk("")
#: DynamoDB limits: 25 writes per BatchWriteItem, 100 keys per BatchGetItem.
BATCH_WRITE_LIMIT = 25
BATCH_GET_LIMIT = 100
BATCH_RETRY_ATTEMPTS = 8
#: Leases in the first Query page of a release: its messages are on their way back to the
#: queue while the rest is read. The rest comes in DynamoDB's own pages (up to 1 MB, some
#: 3,000 leases): every further page is one more round trip in sequence, and a store that
#: reads the whole partition for each page (moto does) pays for it again.
RELEASE_FIRST_PAGE_SIZE = 100
#: What ``Lease.from_item`` reads of a lease item (the instance comes from the key; not the
#: sort key, the plain ``instance_id`` or the TTL).
LEASE_ATTRIBUTES = (
    LEASE_TABLE_PK,
    "message_id",
    "receipt_handle",
    "queue_url",
    "leased_at",
    "heartbeat_at",
    "interruption_requeues",
)


class LeaseStore:
    """Reads and writes leases. The table name comes from ``SPOTGUARD_LEASE_TABLE`` and the
    instance ARN prefix from ``SPOTGUARD_INSTANCE_ARN_PREFIX`` unless given; ``clients`` is the
    process's ``aws.ClientFactory`` (default: the control plane's).

    ``batch_counters=False`` (the agent) reads and writes requeue counters one item at a time:
    the instance role may only ``GetItem``/``UpdateItem`` them (no batch calls, which could
    carry any item), see ``spotguard_cdk.permissions.InstanceRole``."""

    def __init__(
        self,
        table_name: str | None = None,
        *,
        table: Any = None,
        clients: aws.ClientFactory | None = None,
        sleep: Any = time.sleep,
        arn_prefix: str | None = None,
        batch_counters: bool = True,
    ) -> None:
        self.table = table if table is not None else dynamo.table(Env.LEASE_TABLE, table_name, clients)
        self.arn_prefix = checked_instance_arn_prefix(arn_prefix)
        self._sleep = sleep
        self._batch_counters = batch_counters

    @property
    def _client(self) -> Any:
        return self.table.meta.client

    # -- leases --------------------------------------------------------------------------
    def put(self, lease: Lease) -> None:
        self.table.put_item(Item=lease.to_item(self.arn_prefix))

    def put_many(self, leases: Sequence[Lease]) -> list[Lease]:
        """Write leases with BatchWriteItem (one call for a receive of up to ten messages).

        Returns the leases still unwritten after retrying unprocessed items (the caller must
        not start those messages); a whole-call failure raises."""
        items = [lease.to_item(self.arn_prefix) for lease in leases]
        by_key = {
            (item[LEASE_TABLE_PK], item[LEASE_TABLE_SK]): lease
            for item, lease in zip(items, leases, strict=True)
        }
        unwritten: list[Lease] = []
        for start in range(0, len(items), BATCH_WRITE_LIMIT):
            requests = [{"PutRequest": {"Item": item}} for item in items[start : start + BATCH_WRITE_LIMIT]]
            for request in self._batch_write(requests):
                item = request["PutRequest"]["Item"]
                unwritten.append(by_key[(item[LEASE_TABLE_PK], item[LEASE_TABLE_SK])])
        return unwritten

    def heartbeat(self, lease: Lease, at: float) -> bool:
        """Refresh a lease's heartbeat; False when the lease is gone (released meanwhile)."""
        try:
            self.table.update_item(
                Key=lease.key(self.arn_prefix),
                UpdateExpression="SET heartbeat_at = :at",
                ConditionExpression=Attr("message_id").exists(),
                ExpressionAttributeValues={":at": dynamo.to_dynamo(at)},
            )
        except self._client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def for_instance(self, instance_id: str) -> list[Lease]:
        """Every lease held by ``instance_id`` (Query on the partition, paginated)."""
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key(LEASE_TABLE_PK).eq(instance_key(instance_id, self.arn_prefix))
            & Key(LEASE_TABLE_SK).begins_with(LEASE_SK_PREFIX),
            "ConsistentRead": True,
        }
        return [Lease.from_item(item) for item in dynamo.items(self.table.query, **kwargs)]

    def release_pages(
        self,
        instance_id: str,
        *,
        first_page_size: int = RELEASE_FIRST_PAGE_SIZE,
        page_size: int | None = None,
    ) -> Iterator[list[Lease]]:
        """``instance_id``'s leases, one Query page at a time (the requeue releases each page
        while the next one is read), with only the attributes a lease is read from: the first
        page of at most ``first_page_size``, then pages of at most ``page_size`` (None:
        DynamoDB's own). Through the table's client, not the resource: boto3 clients are
        thread-safe."""
        kwargs: dict[str, Any] = {
            "TableName": self.table.name,
            "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :prefix)",
            "ExpressionAttributeNames": {
                "#pk": LEASE_TABLE_PK,
                "#sk": LEASE_TABLE_SK,
                **{f"#a{index}": name for index, name in enumerate(LEASE_ATTRIBUTES)},
            },
            "ExpressionAttributeValues": {
                ":pk": instance_key(instance_id, self.arn_prefix),
                ":prefix": LEASE_SK_PREFIX,
            },
            "ProjectionExpression": ", ".join(f"#a{index}" for index in range(len(LEASE_ATTRIBUTES))),
            "ConsistentRead": True,
            "Limit": first_page_size if page_size is None else min(first_page_size, page_size),
        }
        while True:
            page = self._client.query(**kwargs)
            yield [Lease.from_item(item) for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
            if page_size is None:
                kwargs.pop("Limit", None)
            else:
                kwargs["Limit"] = page_size

    def scan_leases(self) -> Iterator[Lease]:
        """Every lease in the table (the watchdog's orphan sweep)."""
        kwargs: dict[str, Any] = {"FilterExpression": lease_filter()}
        for item in dynamo.items(self.table.scan, **kwargs):
            yield Lease.from_item(item)

    def delete(self, leases: Iterable[Lease]) -> int:
        """Delete leases with BatchWriteItem (25 per call; unprocessed items retried)."""
        keys = [lease.key(self.arn_prefix) for lease in leases]
        for start in range(0, len(keys), BATCH_WRITE_LIMIT):
            requests = [{"DeleteRequest": {"Key": key}} for key in keys[start : start + BATCH_WRITE_LIMIT]]
            left = self._batch_write(requests)
            if left:
                raise RuntimeError(f"{len(left)} lease deletes left unprocessed after retries")
        return len(keys)

    def _batch_write(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """BatchWriteItem with retries of unprocessed items; returns what is still unprocessed."""
        pending = {self.table.name: requests}
        for attempt in range(BATCH_RETRY_ATTEMPTS):
            response = self._client.batch_write_item(RequestItems=pending)
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                return []
            self._sleep(min(2.0, 0.05 * 2**attempt))
        return list(pending.get(self.table.name, []))

    # -- interruption requeue counters ----------------------------------------------------
    def count_interruptions(self, leases: Sequence[Lease], *, now: float | None = None) -> None:
        """Count one interruption requeue for each lease's message (the poison rule).

        A lease that knows its count (``Lease.interruption_requeues``) gets ``count + 1``
        written with BatchWriteItem: one call per 25 messages, and writing it twice (agent and
        control plane racing on one lease) counts it once. Leases that do not know it get an
        ``ADD`` each (creates the counter at 1)."""
        expires_at = int((now or time.time()) + REQUEUE_COUNTER_TTL_SECONDS)
        known = [lease for lease in leases if lease.interruption_requeues is not None]
        if not self._batch_counters:
            for lease in known:
                self._set_requeue_counter(
                    lease.message_id, int(lease.interruption_requeues or 0) + 1, expires_at
                )
            known = []
        for start in range(0, len(known), BATCH_WRITE_LIMIT):
            requests = [
                {
                    "PutRequest": {
                        "Item": {
                            **requeue_counter_key(lease.message_id),
                            REQUEUE_COUNTER_ATTRIBUTE: int(lease.interruption_requeues or 0) + 1,
                            TTL_ATTRIBUTE: expires_at,
                        }
                    }
                }
                for lease in known[start : start + BATCH_WRITE_LIMIT]
            ]
            left = self._batch_write(requests)
            if left:
                raise RuntimeError(f"{len(left)} requeue counters left unwritten after retries")
        for lease in leases:
            if lease.interruption_requeues is None:
                self.increment_requeue_counter(lease.message_id, now=now)

    def increment_requeue_counter(self, message_id: str, *, now: float | None = None) -> None:
        """Add one interruption requeue to the message's counter (``ADD``: creates it at 1)."""
        expires_at = int((now or time.time()) + REQUEUE_COUNTER_TTL_SECONDS)
        self.table.update_item(
            Key=requeue_counter_key(message_id),
            UpdateExpression="ADD #count :one SET #ttl = :ttl",
            ExpressionAttributeNames={"#count": REQUEUE_COUNTER_ATTRIBUTE, "#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={":one": 1, ":ttl": expires_at},
        )

    def _set_requeue_counter(self, message_id: str, count: int, expires_at: int) -> None:
        """Write a known count (idempotent like the batch put) with the one call the instance
        role may make on a counter, touching only the counter's attributes."""
        self.table.update_item(
            Key=requeue_counter_key(message_id),
            UpdateExpression="SET #count = :count, #ttl = :ttl",
            ExpressionAttributeNames={"#count": REQUEUE_COUNTER_ATTRIBUTE, "#ttl": TTL_ATTRIBUTE},
            ExpressionAttributeValues={":count": count, ":ttl": expires_at},
        )

    def requeue_counts(self, message_ids: Sequence[str]) -> dict[str, int]:
        """Interruption requeue counts of ``message_ids`` (BatchGetItem, strongly consistent;
        0 for a message never requeued; one GetItem each without ``batch_counters``)."""
        counts = dict.fromkeys(message_ids, 0)
        ids = list(counts)
        if not self._batch_counters:
            for message_id in ids:
                item = self.table.get_item(
                    Key=requeue_counter_key(message_id),
                    ProjectionExpression="#count",
                    ExpressionAttributeNames={"#count": REQUEUE_COUNTER_ATTRIBUTE},
                    ConsistentRead=True,
                ).get("Item")
                counts[message_id] = int((item or {}).get(REQUEUE_COUNTER_ATTRIBUTE, 0))
            return counts
        for start in range(0, len(ids), BATCH_GET_LIMIT):
            request: dict[str, Any] = {
                self.table.name: {
                    "Keys": [requeue_counter_key(i) for i in ids[start : start + BATCH_GET_LIMIT]],
                    "ConsistentRead": True,
                }
            }
            for attempt in range(BATCH_RETRY_ATTEMPTS):
                response = self._client.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(self.table.name, []):
                    message_id = str(item[LEASE_TABLE_PK]).removeprefix(REQUEUE_COUNTER_PK_PREFIX)
                    counts[message_id] = int(item.get(REQUEUE_COUNTER_ATTRIBUTE, 0))
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                self._sleep(min(2.0, 0.05 * 2**attempt))
            else:
                raise RuntimeError("requeue counters left unread after retries")
        return counts

    def requeue_count(self, message_id: str) -> int:
        """How often interruptions requeued ``message_id`` (the tests' view of the poison rule)."""
        return self.requeue_counts([message_id])[message_id]


def lease_filter() -> Any:
    """Scan filter of the leases of the current key scheme: ``lease#`` sort keys under an
    instance ARN. Leases written under the old ``instance#<id>`` keys are left to their TTL
    (docs/security.md, migration)."""
    return Attr(LEASE_TABLE_SK).begins_with(LEASE_SK_PREFIX) & Attr(LEASE_TABLE_PK).begins_with("arn:")
