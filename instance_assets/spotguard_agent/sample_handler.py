"""Sample handler: timed work described by the message body.

Body: ``{"task_id": "t-1", "seconds": 2.5, "fail": false}``. It sleeps ``seconds`` in small
steps (stopping early when the agent released the message during a drain) and raises when
``fail`` is true. ``expected_seconds`` tells a drain how long a task takes, so the worker
can tell which running tasks finish before the interruption deadline.

A handler is any ``module:function`` taking ``(body: str, context)``; raising means failure.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOG = logging.getLogger("spotguard.sample_handler")


class TaskFailed(RuntimeError):
    pass


def _parse(body: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def expected_seconds(body: str) -> float | None:
    seconds = _parse(body).get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


def handle(body: str, context: Any) -> dict[str, Any]:
    task = _parse(body)
    seconds = float(task.get("seconds", 0) or 0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if context.released.wait(min(0.05, max(0.0, end - time.monotonic()))):
            LOG.info("task %s released after %.2f s", task.get("task_id"), seconds - (end - time.monotonic()))
            return {"task_id": task.get("task_id"), "released": True}
    if task.get("fail"):
        raise TaskFailed(f"task {task.get('task_id')} asked to fail")
    return {"task_id": task.get("task_id"), "seconds": seconds}
