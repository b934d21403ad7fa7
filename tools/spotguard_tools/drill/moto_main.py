"""``python -m spotguard_tools.drill.moto_main``: moto's server with two thread-safety fixes.

moto's server answers requests on several threads, and its SQS queue is not guarded:

- ``DeleteMessage`` rebuilds a queue's message list from a snapshot without the lock that
  ``SendMessage`` takes, so a message sent while another one is being deleted can vanish
  (seen in the drill: four tasks of one ``SendMessageBatch`` gone, never received);
- two ``ReceiveMessage`` calls at the same moment can both take the same message (seen:
  two instances starting one task within milliseconds, both with the same receive count).

The drill counts lost and duplicated tasks, so the emulator must not add its own. Both
fixes take the queue's own lock (a condition variable: a long poll waiting for messages
releases it); nothing else changes.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.server import main as moto_server_main
from moto.sqs import models


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

    delete_message._spotguard_locked = True  # type: ignore[attr-defined]
    models.Queue.delete_message = delete_message  # type: ignore[method-assign]
    models.SQSBackend.receive_message = receive_message  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    _install_sqs_locks()
    moto_server_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
