"""The drill's task handler, run by the real agent on each simulated instance.

A task is ``{"task_id": "...", "seconds": 2.5}``: it sleeps that long (the "work") and
records its start and its completion in the drill's ledger, so the drill counts lost and
duplicated tasks from facts. The agent's handler contract: ``handle(body, context)``;
``context.released`` is set when the agent released the message during a drain (the
task stops and records nothing: another instance will run it); ``expected_seconds(body)``
lets a drain tell which running tasks finish before the deadline. Standard library only,
like any handler on an instance.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from spotguard_tools.drill import ledger

#: How often a running task checks whether the agent released it.
_CHECK_SECONDS = 0.05


def _task(body: str) -> dict[str, Any]:
    document = json.loads(body)
    if not isinstance(document, dict) or "task_id" not in document:
        raise ValueError(f"not a drill task: {body[:200]!r}")
    return document


def expected_seconds(body: str) -> float | None:
    try:
        return float(_task(body).get("seconds", 0))
    except (ValueError, TypeError):
        return None


def handle(body: str, context: Any) -> dict[str, Any]:
    task = _task(body)
    task_id = str(task["task_id"])
    seconds = float(task.get("seconds", 1.0))
    path = os.environ[ledger.LEDGER_ENV]
    instance = os.environ.get(ledger.INSTANCE_ENV, "unknown")
    receive_count = int(getattr(context, "receive_count", 0) or 0)
    ledger.append(
        path,
        {"ev": ledger.START, "task": task_id, "instance": instance, "t": time.time(), "rc": receive_count},
        durable=False,
    )
    released = getattr(context, "released", None)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if released is not None:
            if released.wait(min(_CHECK_SECONDS, left)):
                ledger.append(
                    path,
                    {"ev": ledger.RELEASED, "task": task_id, "instance": instance, "t": time.time()},
                    durable=False,
                )
                return {"task_id": task_id, "released": True}
        else:
            time.sleep(min(_CHECK_SECONDS, left))
    ledger.append(
        path, {"ev": ledger.DONE, "task": task_id, "instance": instance, "t": time.time()}, durable=True
    )
    return {"task_id": task_id, "seconds": seconds}
