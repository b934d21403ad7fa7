"""``python -m spotguard_tools.drill.moto_main``: moto's server with one thread-safety fix.

moto's server answers requests on several threads. Its SQS ``DeleteMessage`` rebuilds a
queue's message list from a snapshot without the lock that ``SendMessage`` takes, so a
message sent while another one is being deleted can vanish (seen in the drill: four tasks
of one ``SendMessageBatch`` gone, never received). SQS never drops a message; the drill
counts lost tasks, so the emulator must not lose any itself. The fix takes the queue's own
lock around the delete; nothing else changes.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.server import main as moto_server_main
from moto.sqs import models


def _install_sqs_delete_lock() -> None:
    original = models.Queue.delete_message
    if getattr(original, "_spotguard_locked", False):
        return

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            original(self, receipt_handle)

    delete_message._spotguard_locked = True  # type: ignore[attr-defined]
    models.Queue.delete_message = delete_message  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    _install_sqs_delete_lock()
    moto_server_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
