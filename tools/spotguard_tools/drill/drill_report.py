"""The drill's report: counted from the ledger, the journal and the control-plane log."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from spotguard_tools.drill.constants import WATCHDOG_KIND
from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.ledger import Ledger
from spotguard_tools.drill.plan import ChaosKind

#: Interruptions whose in-flight tasks must come back (a rebalance keeps the instance).
_TAKING = {ChaosKind.SPOT_WARNING, ChaosKind.HARD_KILL}
#: Kinds the report always lists (0 when none happened); the others only when they did.
_ALWAYS_COUNTED = (
    ChaosKind.SPOT_WARNING,
    ChaosKind.HARD_KILL,
    ChaosKind.REBALANCE,
    ChaosKind.BOOTSTRAP_FAILURE,
)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Interruption:
    instance_id: str
    kind: str  # a ChaosKind value, or "watchdog" for terminations by the control plane
    at: float  # when the drill acted
    #: When the interruption could first be observed (the IMDS notice, the published
    #: warning or state change); recovery is measured from here. None: at ``at``.
    observable_at: float | None = None

    @property
    def observable(self) -> float:
        return self.at if self.observable_at is None else max(self.at, self.observable_at)

    @property
    def harness_delay(self) -> float:
        """The drill's own lag between acting and the interruption being observable."""
        return self.observable - self.at


def requeue_latencies(ledger: Ledger, interruptions: Sequence[Interruption]) -> list[tuple[str, float]]:
    """Seconds from the interruption of a task's instance (the moment it was observable)
    to the task being picked up again.

    A task counts when its attempt on the interrupted instance never completed there; the
    next attempt (on any instance) after that is the pick-up. Tasks never picked up again
    are lost and have no latency.
    """
    by_task: dict[str, list[Any]] = {}
    for attempt in ledger.attempts:
        by_task.setdefault(attempt.task_id, []).append(attempt)
    latencies = []
    for interruption in interruptions:
        if interruption.kind not in _TAKING and interruption.kind != WATCHDOG_KIND:
            continue
        for attempt in ledger.attempts:
            if attempt.instance_id != interruption.instance_id or attempt.finished_at is not None:
                continue
            origin = max(interruption.observable, attempt.started_at)
            later = [
                a for a in by_task[attempt.task_id] if a.started_at > attempt.started_at and a is not attempt
            ]
            if later:
                latencies.append((interruption.kind, max(0.0, min(a.started_at for a in later) - origin)))
    return latencies


#: Journal marks after which nothing runs on an instance any more.
_INSTANCE_ENDS = (Mark.HARD_KILL, Mark.RECLAIMED, Mark.RETIRED, Mark.TERMINATED)


def work_redone_seconds(ledger: Ledger, journal: Journal) -> float:
    """Work executed again because an attempt did not finish, summed over the attempts.

    An attempt that neither completed nor was its task's last ran from its start to its
    release, or to its instance's end (kill, reclaim, termination); the next attempt
    redoes all of that except what the attempt saved in a checkpoint.
    """
    ends: dict[str, list[float]] = {}
    for mark in _INSTANCE_ENDS:
        for entry in journal.entries(mark):
            ends.setdefault(entry.instance_id, []).append(entry.t)
    last_start: dict[str, float] = {}
    for attempt in ledger.attempts:
        last_start[attempt.task_id] = max(last_start.get(attempt.task_id, 0.0), attempt.started_at)
    redone = 0.0
    for attempt in ledger.attempts:
        if attempt.finished_at is not None or attempt.started_at >= last_start[attempt.task_id]:
            continue
        if attempt.released_at is not None:
            end = attempt.released_at
        else:
            later = [t for t in ends.get(attempt.instance_id, []) if t >= attempt.started_at]
            end = min(later) if later else attempt.last_seen_at
        redone += max(0.0, end - attempt.started_at - attempt.saved_seconds)
    return round(redone, 1)


def tasks_resumed_from_checkpoint(ledger: Ledger) -> int:
    return len({a.task_id for a in ledger.attempts if a.resumed_from is not None})


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(latencies),
        "p50": round(percentile(latencies, 50), 2),
        "p95": round(percentile(latencies, 95), 2),
        "p99": round(percentile(latencies, 99), 2),
        "max": round(max(latencies, default=0.0), 2),
    }


def in_flight_at(ledger: Ledger, instance_id: str, at: float) -> int:
    """Attempts running on ``instance_id`` at ``at`` that never completed there."""
    return sum(
        1
        for a in ledger.attempts
        if a.instance_id == instance_id and a.started_at <= at and a.finished_at is None
    )


def read_control_plane_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def build_report(
    *,
    mode: str,
    config: dict[str, Any],
    task_ids: Sequence[str],
    ledger: Ledger,
    journal: Journal,
    completions: Ledger | None = None,
    interruptions: Sequence[Interruption],
    control_plane_log: Sequence[dict[str, Any]],
    initial_instances: int,
    launched_instances: int,
    bootstrap_failure_ids: Sequence[str],
    tasks_in_dlq: int,
    wall_s: float,
    drill_s: float,
) -> dict[str, Any]:
    # A task is done when an agent deleted its message after success (``completions``,
    # the agents' record); without that record, when the handler recorded its completion.
    counted = completions if completions is not None else ledger
    done = counted.done & set(task_ids)
    by_kind = requeue_latencies(ledger, interruptions)
    latencies = [latency for _, latency in by_kind]
    kinds = Counter(i.kind for i in interruptions if i.kind != WATCHDOG_KIND)
    for kind in _ALWAYS_COUNTED:
        kinds.setdefault(kind.value, 0)
    killed_in_flight = sum(
        in_flight_at(ledger, i.instance_id, i.at) for i in interruptions if i.kind == ChaosKind.HARD_KILL
    )
    reclaimed_in_flight = sum(
        in_flight_at(ledger, e.instance_id, e.t)
        for e in journal.entries(Mark.RECLAIMED)
        if e.detail.get("agent_alive")
    )
    by_watchdog = sorted({e.instance_id for e in journal.entries(Mark.TERMINATED_BY_CONTROL_PLANE)})
    dispatcher = [r for r in control_plane_log if r.get("fn") == "dispatcher"]
    watchdog = [r for r in control_plane_log if r.get("fn") == "watchdog"]
    return {
        "mode": mode,
        "tasks_total": len(task_ids),
        "tasks_done": len(done),
        "tasks_lost": len(task_ids) - len(done),
        "tasks_duplicated": counted.duplicated,
        "tasks_sent_twice_by_producer": counted.sent_twice,
        "tasks_in_dlq": tasks_in_dlq,
        "requeue_latency_s": latency_summary(latencies),
        "requeue_latency_by_kind_s": {
            kind: latency_summary([latency for k, latency in by_kind if k == kind])
            for kind in sorted({k for k, _ in by_kind})
        },
        "harness_delay_s": latency_summary(
            [i.harness_delay for i in interruptions if i.kind in _TAKING or i.kind == WATCHDOG_KIND]
        ),
        "interruptions": dict(sorted(kinds.items())),
        "tasks_resumed_from_checkpoint": tasks_resumed_from_checkpoint(ledger),
        "work_redone_seconds": work_redone_seconds(ledger, journal),
        "hard_killed_in_flight": killed_in_flight,
        "reclaimed_in_flight": reclaimed_in_flight,
        "replacements": max(0, launched_instances - initial_instances),
        "instances_launched": launched_instances,
        "terminated_by_watchdog": len(by_watchdog),
        "terminated_by_watchdog_ids": by_watchdog,
        "bootstrap_failure_ids": list(bootstrap_failure_ids),
        "bootstrap_failures_terminated": sum(1 for i in bootstrap_failure_ids if i in by_watchdog),
        "control_plane": {
            "dispatcher_invocations": len(dispatcher),
            "signals_handled": sum(int(r.get("records", 0)) for r in dispatcher),
            "signals_failed": sum(len(r.get("failed", [])) for r in dispatcher),
            "dispatcher_errors": sum(1 for r in dispatcher if r.get("error")),
            "watchdog_runs": len(watchdog),
            "watchdog_errors": sum(1 for r in watchdog if r.get("error")),
        },
        "wall_s": round(wall_s, 1),
        "drill_s": round(drill_s, 1),
        "config": config,
    }


def _rows() -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    def latency(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['requeue_latency_s'][key]:.1f} s"

    return [
        ("tasks done / total", lambda r: f"{r['tasks_done']} / {r['tasks_total']}"),
        ("tasks lost", lambda r: str(r["tasks_lost"])),
        ("tasks duplicated", lambda r: str(r["tasks_duplicated"])),
        ("tasks in DLQ", lambda r: str(r["tasks_in_dlq"])),
        ("requeued tasks", lambda r: str(r["requeue_latency_s"]["count"])),
        ("tasks resumed from a checkpoint", lambda r: str(r.get("tasks_resumed_from_checkpoint", 0))),
        ("work redone", lambda r: f"{r.get('work_redone_seconds', 0.0):.1f} s"),
        ("requeue latency p50", latency("p50")),
        ("requeue latency p95", latency("p95")),
        ("requeue latency p99", latency("p99")),
        ("requeue latency max", latency("max")),
        ("spot warnings", lambda r: str(r["interruptions"].get("spot_warning", 0))),
        (
            "hard kills",
            lambda r: (
                f"{r['interruptions'].get('hard_kill', 0)} ({r['hard_killed_in_flight']} tasks in flight)"
            ),
        ),
        ("rebalance recommendations", lambda r: str(r["interruptions"].get("rebalance", 0))),
        ("AWS Health scheduled changes", lambda r: str(r["interruptions"].get("health_event", 0))),
        ("bootstrap failures", lambda r: str(r["interruptions"].get("bootstrap_failure", 0))),
        ("terminated by watchdog", lambda r: str(r["terminated_by_watchdog"])),
        ("replacements joined", lambda r: str(r["replacements"])),
        ("running outside the ASG at the end", lambda r: str(r.get("instances_running_outside_asg", 0))),
        ("signals dispatched", lambda r: str(r["control_plane"]["signals_handled"])),
        ("AWS faults injected", lambda r: str(r.get("aws_faults_injected", 0))),
        ("wall time", lambda r: f"{r['wall_s']:.0f} s"),
    ]


def report_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One column per report (spotguard, baseline): the numbers a reader compares."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("")
    for report in reports:
        table.add_column(str(report["mode"]), justify="right")
    for label, render in _rows():
        cells = [render(report) for report in reports]
        lost = label == "tasks lost" and any(cell != "0" for cell in cells)
        table.add_row(label, *cells, style="bold red" if lost else None)
    return table


def format_table(reports: Sequence[dict[str, Any]], width: int = 100) -> str:
    """:func:`report_table` as plain text (logs, tests, benchmark output)."""
    console = Console(width=width, color_system=None, file=io.StringIO(), highlight=False)
    with console.capture() as capture:
        console.print(report_table(reports))
    return "\n".join(line.rstrip() for line in capture.get().splitlines())
