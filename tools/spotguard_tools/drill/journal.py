"""What happened during a drill, in order: the timeline's and the report's raw material."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Mark(StrEnum):
    LAUNCHED = "launched"  # appeared in the ASG
    AGENT_STARTED = "agent_started"
    READY = "ready"  # bootstrap reported ready
    SPOT_WARNING = "spot_warning"
    REBALANCE = "rebalance"
    HEALTH_EVENT = "health_event"  # AWS Health scheduled change (EventBridge only)
    RETIRED = "retired"  # a Health scheduled change's start time passed with the instance running
    HARD_KILL = "hard_kill"
    RECLAIMED = "reclaimed"  # the spot deadline passed: the instance was taken
    DETACHED = "detached"  # left the ASG while still running (replacement requested early)
    TERMINATED = "terminated"  # EC2 state reached terminated
    TERMINATED_BY_CONTROL_PLANE = "terminated_by_control_plane"
    AGENT_EXITED = "agent_exited"  # the agent process ended before it was ready
    CHAOS_STARTED = "chaos_started"  # the chaos plan's clock starts (instance "-")
    REPORT_FAILED = "report_failed"  # `spotguard-agent report ready` exited non-zero


@dataclass(frozen=True, slots=True)
class Entry:
    t: float  # epoch seconds
    mark: Mark
    instance_id: str
    detail: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._lock = threading.Lock()

    def record(self, mark: Mark, instance_id: str, *, at: float | None = None, **detail: Any) -> Entry:
        entry = Entry(at if at is not None else time.time(), mark, instance_id, detail)
        with self._lock:
            self._entries.append(entry)
        return entry

    def entries(self, mark: Mark | None = None) -> list[Entry]:
        with self._lock:
            return [e for e in self._entries if mark is None or e.mark == mark]

    def write(self, path: Path) -> None:
        with path.open("w") as out:
            for entry in self.entries():
                out.write(
                    json.dumps(
                        {
                            "t": entry.t,
                            "mark": entry.mark.value,
                            "instance_id": entry.instance_id,
                            **entry.detail,
                        }
                    )
                    + "\n"
                )

    def first(self, mark: Mark, instance_id: str) -> Entry | None:
        return next((e for e in self.entries(mark) if e.instance_id == instance_id), None)
