"""The drill's task handler, run by the real agent on each simulated instance.

A task is ``{"task_id": "...", "seconds": 2.5}``: it sleeps that long (the "work") and
records its start, its checkpoints and its completion in the drill's ledger, so the drill
counts lost and duplicated tasks and redone work from facts. The agent's handler
contract: ``handle(body, context)``; ``context.released`` is set when the agent released
the message during a drain (the task stops and records nothing more: another instance
will run it); ``expected_seconds(body)`` lets a drain tell which running tasks finish
before the deadline.

Checkpoints: every ``CHECKPOINT_EVERY_SECONDS`` of work (``--checkpoint-every-seconds``,
``SPOTGUARD_DRILL_CHECKPOINT_EVERY_SECONDS``) the task saves its progress with
``context.checkpoint(bytes)`` (the agent stores it in the checkpoint bucket), and once
more when it is released; an attempt that finds ``context.resumed`` continues from the
saved progress instead of starting over. ``SPOTGUARD_DRILL_CHECKPOINTS=0`` turns them off
(the comparison run). Standard library only, like any handler on an instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from spotguard_tools.drill import ledger

LOG = logging.getLogger("spotguard.drill.task")
#: How often a running task checks whether the agent released it.
_CHECK_SECONDS = 0.05
#: Seconds of work between two checkpoints, unless the drill sets another interval.
CHECKPOINT_EVERY_SECONDS = 1.0


def _task(body: str) -> dict[str, Any]:
    document = json.loads(body)
    if not isinstance(document, dict) or "task_id" not in document:
        raise ValueError(f"not a drill task: {body[:200]!r}")
    return document


def expected_seconds(body: str) -> float | None:
    """What is left of the task: a resumed task is shorter (the agent asks before it runs
    the handler, so this is the whole task; a drain then errs on the side of releasing)."""
    try:
        return float(_task(body).get("seconds", 0))
    except (ValueError, TypeError):
        return None


def _progress(resumed: Any) -> float | None:
    """Seconds done according to the checkpoint the agent handed back (None: no checkpoint)."""
    if not resumed:
        return None
    try:
        return float(json.loads(bytes(resumed))["done"])
    except (ValueError, KeyError, TypeError):
        LOG.warning("checkpoint not understood, starting over: %r", bytes(resumed)[:100])
        return None


def _checkpoint_every() -> float:
    try:
        return float(os.environ.get(ledger.CHECKPOINT_EVERY_ENV) or CHECKPOINT_EVERY_SECONDS)
    except ValueError:
        return CHECKPOINT_EVERY_SECONDS


def _saver(context: Any) -> Callable[[bytes], Any] | None:
    if os.environ.get(ledger.CHECKPOINTS_ENV, "1") == "0":
        return None
    save = getattr(context, "checkpoint", None)
    return save if callable(save) else None


class _Run:
    """One attempt of one task: its progress and its ledger records."""

    def __init__(self, task_id: str, context: Any) -> None:
        self.task_id = task_id
        self.path = os.environ[ledger.LEDGER_ENV]
        self.instance = os.environ.get(ledger.INSTANCE_ENV, "unknown")
        self.save = _saver(context)
        self.resumed_from = _progress(getattr(context, "resumed", None)) if self.save else None
        self.done = self.resumed_from or 0.0

    def record(self, event: str, *, durable: bool = False, **detail: Any) -> None:
        record = {"ev": event, "task": self.task_id, "instance": self.instance, "t": time.time(), **detail}
        ledger.append(self.path, record, durable=durable)

    def checkpoint(self) -> None:
        if self.save is None:
            return
        try:
            saved = self.save(json.dumps({"done": round(self.done, 3)}).encode())
        except Exception as error:  # noqa: BLE001 - a failed save only means more work redone
            LOG.warning("checkpoint of %s failed: %s", self.task_id, error)
            return
        if saved is not False:  # False: the agent keeps no checkpoints (no bucket)
            self.record(ledger.CHECKPOINT, done=round(self.done, 3))


def handle(body: str, context: Any) -> dict[str, Any]:
    task = _task(body)
    task_id = str(task["task_id"])
    seconds = float(task.get("seconds", 1.0))
    run = _Run(task_id, context)
    receive_count = int(getattr(context, "receive_count", 0) or 0)
    start: dict[str, Any] = {"rc": receive_count}
    if run.resumed_from is not None:
        start["from"] = round(run.resumed_from, 3)
    run.record(ledger.START, **start)
    released = getattr(context, "released", None)
    last = time.monotonic()
    every = _checkpoint_every()
    next_checkpoint = run.done + every
    while (left := seconds - run.done) > 0:
        step = min(_CHECK_SECONDS, left)
        if released is not None:
            if released.wait(step):
                run.done += time.monotonic() - last
                with contextlib.suppress(Exception):
                    run.checkpoint()  # the last progress, while the agent still lets it
                run.record(ledger.RELEASED)
                return {"task_id": task_id, "released": True}
        else:
            time.sleep(step)
        now = time.monotonic()
        run.done += now - last
        last = now
        if run.done >= next_checkpoint and run.done < seconds:
            run.checkpoint()
            next_checkpoint = run.done + every
            last = time.monotonic()  # saving is not work
    run.record(ledger.DONE, durable=True)
    return {"task_id": task_id, "seconds": seconds, "resumed_from": run.resumed_from}
