"""Sample handler: timed work described by the message body, resumable from a checkpoint.

Body: ``{"task_id": "t-1", "seconds": 2.5, "fail": false}``. It "works" ``seconds`` in small
steps and raises when ``fail`` is true. ``expected_seconds`` tells a drain how long a task
takes, so the worker can tell which running tasks finish before the interruption deadline.

Checkpoints: every ``CHECKPOINT_EVERY_SECONDS`` of work, and when the agent releases the
message (drain), it stores its progress with ``context.checkpoint(bytes)``; an attempt that
starts from ``context.resumed`` only does the rest and says so in the log (``resumed at``).

A handler is any ``module:function`` taking ``(body: str, context)``; raising means failure.
It runs in the agent's handler process; what it prints goes to the agent log with the
message id.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

CHECKPOINT_EVERY_SECONDS = 10.0
_STEP_SECONDS = 0.05


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


def _resumed_progress(context: Any) -> float:
    resumed = getattr(context, "resumed", None)
    if not resumed:
        return 0.0
    try:
        return float(json.loads(resumed)["done_seconds"])
    except (ValueError, KeyError, TypeError):
        return 0.0  # not ours: start over


def _save(context: Any, done: float) -> None:
    checkpoint = getattr(context, "checkpoint", None)
    if checkpoint is not None:
        checkpoint(json.dumps({"done_seconds": round(done, 3)}).encode())


def handle(body: str, context: Any) -> dict[str, Any]:
    task = _parse(body)
    task_id = task.get("task_id")
    seconds = float(task.get("seconds", 0) or 0)
    done = min(seconds, _resumed_progress(context))
    if done:
        sys.stdout.write(f"task {task_id} resumed at {done:.1f} s of {seconds:.1f} s\n")
    last_saved = done
    started = time.monotonic() - done
    while done < seconds:
        if context.released.wait(min(_STEP_SECONDS, seconds - done)):
            _save(context, time.monotonic() - started)
            sys.stdout.write(
                f"task {task_id} released at {time.monotonic() - started:.1f} s (checkpoint saved)\n"
            )
            return {"task_id": task_id, "released": True}
        done = time.monotonic() - started
        if done - last_saved >= CHECKPOINT_EVERY_SECONDS and done < seconds:
            _save(context, done)
            last_saved = done
    if task.get("fail"):
        raise TaskFailed(f"task {task_id} asked to fail")
    return {"task_id": task_id, "seconds": seconds}
