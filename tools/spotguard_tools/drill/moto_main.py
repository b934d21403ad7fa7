"""``python -m spotguard_tools.drill.moto_main``: moto's server with four SQS fixes and
five fixes of its per-request cost.

moto's server answers requests on several threads, and its SQS queue is not guarded:

- ``DeleteMessage`` rebuilds a queue's message list from a snapshot without the lock that
  ``SendMessage`` takes, so a message sent while another one is being deleted can vanish
  (seen in the drill: four tasks of one ``SendMessageBatch`` gone, never received);
- two ``ReceiveMessage`` calls at the same moment can both take the same message (seen:
  two instances starting one task within milliseconds, both with the same receive count).

The drill counts lost and duplicated tasks, so the emulator must not add its own. Both
fixes take the queue's own lock (a condition variable: a long poll waiting for messages
releases it); nothing else changes.

moto also applies a visibility change made with the receipt handle of an earlier receive
to the message's current one; SQS refuses it (``ReceiptHandleIsInvalid``). Seen in the
drill: the two state changes of one hard kill (shutting-down, terminated) each requeued its
tasks, and the second, with the dead instance's handles, made a task visible again that
another agent had just received, so two agents ran it at once. The emulator refuses it too.

A long poll in moto wakes when a message is *sent*, not when one becomes visible again by
``ChangeMessageVisibility``: it looks again only after a second, so every requeued message
waited up to a second longer than on SQS, whose long polls answer as soon as a message is
available. A visibility change that makes a message visible now wakes the queue's waiting
receives.

moto's server also spends CPU that has nothing to do with the emulated service, and the
benchmarks measure against it (issue 15):

- its router lists moto's package directory (``os.listdir`` and an ``isdir`` per backend,
  some 200 system calls) for every request, under the one lock all requests pass through,
  and each response object lists its class's methods (``inspect.getmembers``): both are
  computed once (neither changes while the server runs);
- werkzeug formats and writes a log line per request: kept only when
  ``SPOTGUARD_MOTO_REQUEST_LOG`` is set;
- its SQS queue asks the clock twice per message for every receive (is it visible? is it
  delayed?) and each ask builds two ``datetime`` objects: with 2,000 messages in the work
  queue, receives were 59 % of the server's time in the drill. The clock is read with
  ``time.time()`` (the same instant, in milliseconds since the epoch);
- its JSON response serializer walks every DynamoDB attribute value against the
  ``AttributeValue`` shape's ten members (about 70 look-ups per attribute): a Query answering
  1,000 leases spent 0.6 s there. An attribute value that is one string, number, boolean or
  null (already in the wire form: ``{"S": "..."}``) is written as it is; every other value
  (binary, sets, lists, maps) goes through moto's serializer as before;
- it builds every attribute of a queue, its three message counters included (a scan of
  the queue's messages each), once for each message it sends and three times for each
  message it receives, to read one setting: a third of the server's time in the worker
  benchmark. The counters come from one scan (none while a message is sent: the send
  reads ContentBasedDeduplication only), and a receive's retention check reads its one
  setting.

Answers are unchanged (``tests/drill/test_emulator.py`` compares them with plain moto's).

It also keeps the **agent ledger** when ``SPOTGUARD_DRILL_AGENT_LEDGER`` names a file: what
the agents did to the work queue, as SQS and the lease table saw it, in the drill
ledger's format (:mod:`spotguard_tools.drill.ledger`):

- ``start``: an agent wrote a lease for a message it received (instance from the lease key);
- ``done``: an agent deleted the message (a task is done when the agent deleted its
  message after success, whoever's code ran it: the drill's handler or the user's);
- ``released``: the lease went away and the message did not (drain, release, failure).

The drill counts completions from it, so the count does not depend on the task's code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from moto import backends
from moto.core import responses, serialize
from moto.server import main as moto_server_main
from moto.sqs import models
from moto.sqs.exceptions import ReceiptHandleIsInvalid
from spotguard_core.contracts import LEASE_TABLE_PK, LEASE_TABLE_SK, instance_id_of_key

from spotguard_tools.drill import ledger

#: Set (to anything) to keep werkzeug's line per request in the server's log.
REQUEST_LOG_ENV = "SPOTGUARD_MOTO_REQUEST_LOG"


def _install_request_cost_fixes() -> None:
    if not getattr(backends.list_of_moto_modules, "_spotguard_cached", False):
        modules = tuple(backends.list_of_moto_modules())
        cached = functools.wraps(backends.list_of_moto_modules)(lambda: modules)
        cached._spotguard_cached = True  # type: ignore[attr-defined]
        backends.list_of_moto_modules = cached
    if not getattr(responses.method_names_from_class, "_spotguard_cached", False):
        # Each request listed its response class's methods with ``inspect.getmembers``.
        names = functools.cache(responses.method_names_from_class)
        names._spotguard_cached = True  # type: ignore[attr-defined]
        responses.method_names_from_class = names
    if not getattr(models.unix_time_millis, "_spotguard_fast", False):
        exact = models.unix_time_millis

        def unix_time_millis(dt: Any = None) -> float:
            return time.time() * 1000.0 if dt is None else float(exact(dt))

        unix_time_millis._spotguard_fast = True  # type: ignore[attr-defined]
        models.unix_time_millis = unix_time_millis
    if not os.environ.get(REQUEST_LOG_ENV):
        # Errors stay; werkzeug logs each request at INFO.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _install_attribute_value_fast_path()
    _install_queue_attribute_fast_paths()


#: A queue's message counters, which moto computes with one scan of its messages each.
_QUEUE_COUNTERS = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesDelayed",
    "ApproximateNumberOfMessagesNotVisible",
)


#: Set while this thread runs moto's ``send_message``, which builds a queue's attributes to
#: read one setting (ContentBasedDeduplication), never its counters.
_SENDING = threading.local()


def queue_counters(queue: Any) -> dict[str, int]:
    """moto's three approximate counters of ``queue`` from one scan at one instant."""
    current = models.unix_time_millis()
    visible = delayed = not_visible = 0
    for message in queue._messages:
        is_delayed = current < message.delayed_until
        is_visible = current > message.visible_at
        delayed += is_delayed
        not_visible += not is_visible
        visible += is_visible and not is_delayed
    return dict(zip(_QUEUE_COUNTERS, (visible, delayed, not_visible), strict=True))


def _install_queue_attribute_fast_paths() -> None:
    """The queue's attributes as moto builds them, the counters from one scan; a receive's
    retention check reads ``MessageRetentionPeriod`` alone (moto built every attribute
    three times for it, for each message received)."""
    if getattr(models.Queue.__dict__["attributes"].fget, "_spotguard_fast", False):
        return
    fields = {
        name: models.camelcase_to_underscores(name)
        for name in (
            *models.Queue.BASE_ATTRIBUTES,
            *models.Queue.FIFO_ATTRIBUTES,
            *models.Queue.KMS_ATTRIBUTES,
        )
    }

    def attributes(self: Any) -> dict[str, Any]:
        # A send reads only ContentBasedDeduplication: its counters would go unread.
        sending = getattr(_SENDING, "active", False)
        counters = dict.fromkeys(_QUEUE_COUNTERS, 0) if sending else queue_counters(self)
        names = list(self.BASE_ATTRIBUTES)
        if self.fifo_queue:
            names += self.FIFO_ATTRIBUTES
        if self.kms_master_key_id:
            names += self.KMS_ATTRIBUTES
        result: dict[str, Any] = {
            name: counters[name] if name in counters else getattr(self, fields[name]) for name in names
        }
        if self.policy:
            result["Policy"] = self.policy
        if self.redrive_policy:
            result["RedrivePolicy"] = json.dumps(self.redrive_policy)
        return {
            key: str(value).lower() if isinstance(value, bool) else value for key, value in result.items()
        }

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str, message: Any) -> bool:
        retention_period = self.get_queue(queue_name).message_retention_period
        return bool(retention_period + message.sent_timestamp / 1000 > time.time())

    original_send = models.SQSBackend.send_message

    def send_message(self: Any, *args: Any, **kwargs: Any) -> Any:
        _SENDING.active = True
        try:
            return original_send(self, *args, **kwargs)
        finally:
            _SENDING.active = False

    models.SQSBackend.send_message = send_message  # type: ignore[method-assign]
    attributes._spotguard_fast = True  # type: ignore[attr-defined]
    models.Queue.attributes = property(attributes)  # type: ignore[method-assign,assignment]
    models.SQSBackend.is_message_valid_based_on_retention_period = (  # type: ignore[method-assign]
        is_message_valid_based_on_retention_period
    )


#: Attribute value members whose wire form is the model's own: a str, or a bool.
_PLAIN_ATTRIBUTE_TYPES = {"S": str, "N": str, "BOOL": bool, "NULL": bool}


def plain_attribute_value(value: Any) -> bool:
    """One string, number, boolean or null in DynamoDB's wire form (``{"N": "1.5"}``)."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((kind, inner),) = value.items()
    expected = _PLAIN_ATTRIBUTE_TYPES.get(kind)
    return expected is not None and type(inner) is expected


def _install_attribute_value_fast_path() -> None:
    original = serialize.BaseJSONSerializer._serialize_type_structure
    if getattr(original, "_spotguard_fast", False):
        return

    def serialize_structure(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        if key and shape.name == "AttributeValue" and plain_attribute_value(value):
            self._default_serialize(serialized, dict(value), shape, key)
            return
        original(self, serialized, value, shape, key)

    serialize_structure._spotguard_fast = True  # type: ignore[attr-defined]
    serialize.BaseJSONSerializer._serialize_type_structure = serialize_structure  # type: ignore[method-assign]


def stale_receipt_handle(queue: Any, receipt_handle: str) -> bool:
    """The handle of an earlier receive of a message received again since: SQS refuses a
    visibility change with it, moto applied it to the message's new receive."""
    for message in queue._messages:
        if message.had_receipt_handle(receipt_handle):
            return bool(message.receipt_handle != receipt_handle)
    return False


def _install_sqs_locks() -> None:
    original_delete = models.Queue.delete_message
    if getattr(original_delete, "_spotguard_locked", False):
        return
    original_receive = models.SQSBackend.receive_message

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            original_delete(self, receipt_handle)

    def receive_message(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        with self.get_queue(queue_name)._messages_lock:
            return original_receive(self, queue_name, *args, **kwargs)

    original_change = models.SQSBackend.change_message_visibility

    def change_message_visibility(
        self: Any, queue_name: str, receipt_handle: str, visibility_timeout: int
    ) -> None:
        queue = self.get_queue(queue_name)
        with queue._messages_lock:
            if stale_receipt_handle(queue, receipt_handle):
                raise ReceiptHandleIsInvalid
            original_change(self, queue_name, receipt_handle, visibility_timeout)
            if int(visibility_timeout) == 0:
                queue._messages_lock.notify_all()  # visible now: wake the long polls

    delete_message._spotguard_locked = True  # type: ignore[attr-defined]
    models.Queue.delete_message = delete_message  # type: ignore[method-assign]
    models.SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    models.SQSBackend.change_message_visibility = change_message_visibility  # type: ignore[method-assign]


_LEASE_PREFIX = "lease#"


def _holder(pk: str) -> str | None:
    """The instance of a lease key (None for a requeue counter)."""
    try:
        return instance_id_of_key(pk)
    except ValueError:
        return None


class AgentLedger:
    """Appends what agents did to the work queue (see the module docstring)."""

    def __init__(self, path: str, work_queue: str, lease_table: str) -> None:
        self.path = path
        self.work_queue = work_queue
        self.lease_table = lease_table
        self.lock = threading.Lock()
        self.tasks: dict[str, tuple[str, int]] = {}  # message id -> (task id, receive count)
        self.holders: dict[str, str] = {}  # message id -> instance holding its lease
        self.deleted: set[str] = set()
        self.completed_receipts: set[str] = set()

    def _append(self, record: dict[str, Any]) -> None:
        ledger.append(self.path, {**record, "t": time.time()}, durable=record["ev"] == ledger.DONE)

    def received(self, queue_name: str, messages: list[Any]) -> None:
        if queue_name != self.work_queue:
            return
        with self.lock:
            for message in messages:
                try:
                    task = str(json.loads(message.body)["task_id"])
                except (ValueError, KeyError, TypeError):
                    task = f"message:{message.id}"
                self.tasks[message.id] = (task, int(message.approximate_receive_count))

    def leased(self, table: str, pk: str, sk: str) -> None:
        instance = _holder(pk)
        if table != self.lease_table or instance is None or not sk.startswith(_LEASE_PREFIX):
            return
        message_id = sk[len(_LEASE_PREFIX) :]
        with self.lock:
            task, receive_count = self.tasks.get(message_id, (f"message:{message_id}", 0))
            self.holders[message_id] = instance
            self._append(
                {
                    "ev": ledger.START,
                    "task": task,
                    "instance": instance,
                    "rc": receive_count,
                    "message": message_id,
                }
            )

    def unleased(self, table: str, pk: str, sk: str) -> None:
        if table != self.lease_table or not sk.startswith(_LEASE_PREFIX):
            return
        message_id = sk[len(_LEASE_PREFIX) :]
        with self.lock:
            instance = _holder(pk)
            if message_id in self.deleted or instance is None or self.holders.get(message_id) != instance:
                return
            del self.holders[message_id]
            task, _ = self.tasks.get(message_id, (f"message:{message_id}", 0))
            self._append({"ev": ledger.RELEASED, "task": task, "instance": instance, "message": message_id})

    def deleting(self, queue_name: str, message_id: str, receipt_handle: str) -> None:
        if queue_name != self.work_queue:
            return
        with self.lock:
            if receipt_handle in self.completed_receipts:
                return
            self.completed_receipts.add(receipt_handle)
            self.deleted.add(message_id)
            task, _ = self.tasks.get(message_id, (f"message:{message_id}", 0))
            instance = self.holders.get(message_id, "unknown")
            self._append({"ev": ledger.DONE, "task": task, "instance": instance, "message": message_id})


def _install_agent_ledger(agent_ledger: AgentLedger) -> None:
    from moto.dynamodb.models.table import Table  # noqa: PLC0415 - only with the agent ledger

    original_receive = models.SQSBackend.receive_message
    original_delete = models.Queue.delete_message
    original_put = Table.put_item
    original_delete_item = Table.delete_item

    def receive_message(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        messages = original_receive(self, queue_name, *args, **kwargs)
        agent_ledger.received(queue_name, messages)
        return messages

    def delete_message(self: Any, receipt_handle: str) -> None:
        # Under the queue's own (re-entrant) lock, so the message found is the one deleted.
        # One completion per receive: a retried delete of the same receipt handle (the
        # client timed out, botocore sent it again) is the same completion, not a new one.
        with self._messages_lock:
            message = next((m for m in self._messages if m.had_receipt_handle(receipt_handle)), None)
            original_delete(self, receipt_handle)
            if message is not None:
                agent_ledger.deleting(self.name, message.id, receipt_handle)

    def put_item(self: Any, item_attrs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        item = original_put(self, item_attrs, *args, **kwargs)
        pk = item_attrs.get(LEASE_TABLE_PK, {}).get("S", "")
        sk = item_attrs.get(LEASE_TABLE_SK, {}).get("S", "")
        agent_ledger.leased(self.name, pk, sk)
        return item

    def delete_item(self: Any, hash_key: Any, range_key: Any) -> Any:
        item = original_delete_item(self, hash_key, range_key)
        if item is not None and range_key is not None:
            agent_ledger.unleased(self.name, str(hash_key.value), str(range_key.value))
        return item

    models.SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
    models.Queue.delete_message = delete_message  # type: ignore[method-assign]
    Table.put_item = put_item  # type: ignore[method-assign]
    Table.delete_item = delete_item  # type: ignore[method-assign]


def install_emulator_fixes() -> None:
    """Every fix above except the agent ledger (also used in-process by the emulator test)."""
    _install_request_cost_fixes()
    _install_sqs_locks()


def main(argv: list[str] | None = None) -> None:
    install_emulator_fixes()
    path = os.environ.get(ledger.AGENT_LEDGER_ENV)
    if path:
        _install_agent_ledger(
            AgentLedger(
                path, os.environ.get(ledger.WORK_QUEUE_ENV, ""), os.environ.get(ledger.LEASE_TABLE_ENV, "")
            )
        )
    moto_server_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
