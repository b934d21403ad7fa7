"""The drill's ledger: every task start and completion, appended durably by task id.

Agents (separate processes) append one JSON line per record with a single ``write`` on a
file opened with ``O_APPEND`` (atomic for lines this short on a local file system), and
``fsync`` completions, so "lost" and "duplicated" are counted from what really happened.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Environment variables the drill gives each simulated instance's agent (drill-only).
LEDGER_ENV = "SPOTGUARD_DRILL_LEDGER"
INSTANCE_ENV = "SPOTGUARD_DRILL_INSTANCE_ID"
#: The emulator's agent ledger (:mod:`spotguard_tools.drill.moto_main`): where, and which
#: queue and lease table are the fleet's.
AGENT_LEDGER_ENV = "SPOTGUARD_DRILL_AGENT_LEDGER"
WORK_QUEUE_ENV = "SPOTGUARD_DRILL_WORK_QUEUE"
LEASE_TABLE_ENV = "SPOTGUARD_DRILL_LEASE_TABLE"

START = "start"
DONE = "done"
RELEASED = "released"  # the agent gave the message back during a drain; the task stopped
CHECKPOINT = "checkpoint"  # the task saved its progress (``context.checkpoint``): ``done`` seconds
#: "0" turns the drill task handler's checkpoints off (the comparison run of the drill test).
CHECKPOINTS_ENV = "SPOTGUARD_DRILL_CHECKPOINTS"
#: Seconds of work between two checkpoints of the drill task handler (``--checkpoint-every-seconds``).
CHECKPOINT_EVERY_ENV = "SPOTGUARD_DRILL_CHECKPOINT_EVERY_SECONDS"


def append(path: str | Path, record: dict[str, Any], *, durable: bool) -> None:
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Attempt:
    """One run of a task on one instance."""

    task_id: str
    instance_id: str
    started_at: float
    finished_at: float | None = None
    #: When the task stopped because the agent released its message (drain).
    released_at: float | None = None
    receive_count: int = 0
    #: Seconds of the task already done when this attempt started (from a checkpoint).
    resumed_from: float | None = None
    #: Seconds of the task done at this attempt's last saved checkpoint.
    checkpointed: float | None = None
    #: The last moment this attempt was seen alive in the ledger.
    last_seen_at: float = 0.0

    @property
    def start_progress(self) -> float:
        return self.resumed_from or 0.0

    @property
    def saved_seconds(self) -> float:
        """Work of this attempt the next one does not redo (it resumes from the checkpoint)."""
        if self.checkpointed is None:
            return 0.0
        return max(0.0, self.checkpointed - self.start_progress)


@dataclass(slots=True)
class Ledger:
    attempts: list[Attempt] = field(default_factory=list)
    completions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Completions per SQS message, when the records name it (the agent ledger). A task
    #: the producer sent twice (a retried SendMessageBatch whose first try had landed) is
    #: two messages: two completions, neither a duplicate of the other.
    message_completions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @classmethod
    def read(cls, path: Path) -> Ledger:
        ledger = cls()
        if not path.exists():
            return ledger
        open_attempts: dict[tuple[str, str], Attempt] = {}
        for raw in path.read_text().splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line torn by a SIGKILL mid-write
            key = (str(record["task"]), str(record["instance"]))
            if "message" in record:
                ledger.messages[key[0]].add(str(record["message"]))
            if record["ev"] == START:
                resumed = record.get("from")
                attempt = Attempt(
                    task_id=key[0],
                    instance_id=key[1],
                    started_at=float(record["t"]),
                    receive_count=int(record.get("rc", 0)),
                    resumed_from=float(resumed) if resumed is not None else None,
                    last_seen_at=float(record["t"]),
                )
                ledger.attempts.append(attempt)
                open_attempts[key] = attempt
            elif record["ev"] == CHECKPOINT:
                running = open_attempts.get(key)
                if running is not None:
                    running.checkpointed = float(record["done"])
                    running.last_seen_at = float(record["t"])
            elif record["ev"] == RELEASED:
                released = open_attempts.pop(key, None)
                if released is not None:
                    released.released_at = float(record["t"])
            elif record["ev"] == DONE:
                ledger.completions[key[0]] += 1
                if "message" in record:
                    ledger.message_completions[str(record["message"])] += 1
                started = open_attempts.pop(key, None)
                if started is not None:
                    started.finished_at = float(record["t"])
        return ledger

    @property
    def done(self) -> set[str]:
        return {task for task, count in self.completions.items() if count > 0}

    @property
    def duplicated(self) -> int:
        """Completions beyond the first of one message (of one task, without message ids)."""
        counts = self.message_completions or self.completions
        return sum(count - 1 for count in counts.values() if count > 1)

    @property
    def sent_twice(self) -> int:
        """Tasks that reached the queue as more than one message (the producer's retries)."""
        return sum(1 for ids in self.messages.values() if len(ids) > 1)
