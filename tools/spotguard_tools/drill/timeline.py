"""The timeline picture: one lane per instance, its tasks, and what happened to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.ledger import Ledger

#: marker, colour, label of each journal mark drawn on the lanes
_MARKS: dict[Mark, tuple[str, str, str]] = {
    Mark.LAUNCHED: ("^", "#555555", "launched"),
    Mark.READY: ("|", "#2b8a3e", "bootstrap ready"),
    Mark.SPOT_WARNING: ("D", "#f59f00", "spot warning (notice)"),
    Mark.REBALANCE: ("s", "#1c7ed6", "rebalance recommendation"),
    Mark.DETACHED: (">", "#7048e8", "detached: replacement requested"),
    Mark.HARD_KILL: ("X", "#e03131", "hard kill (no notice)"),
    Mark.RECLAIMED: ("x", "#c92a2a", "reclaimed at the warning deadline"),
    Mark.TERMINATED_BY_CONTROL_PLANE: ("*", "#862e9c", "terminated by the watchdog"),
}


_FINISHED = "#40c057"
_RELEASED = "#ff922b"
_KILLED = "#fa5252"


def _draw_tasks(axes: Any, ledger: Ledger, row: dict[str, int], ended: dict[str, float], t0: float) -> None:
    """One bar per task attempt, stacked within its instance's lane so none hides another."""
    per_lane_slots: dict[str, list[float]] = {}
    for attempt in sorted(ledger.attempts, key=lambda a: a.started_at):
        if attempt.instance_id not in row:
            continue
        start = attempt.started_at - t0
        if attempt.finished_at is not None:
            stop, colour = attempt.finished_at - t0, _FINISHED
        elif attempt.released_at is not None:
            stop, colour = attempt.released_at - t0, _RELEASED
        else:
            stop, colour = ended.get(attempt.instance_id, start + 0.5), _KILLED
        stop = max(stop, start + 0.15)
        slots = per_lane_slots.setdefault(attempt.instance_id, [])
        slot = next((i for i, busy_until in enumerate(slots) if busy_until <= start), len(slots))
        if slot == len(slots):
            slots.append(stop)
        else:
            slots[slot] = stop
        offset = -0.32 + (slot % 4) * 0.16
        axes.broken_barh(
            [(start, stop - start)], (row[attempt.instance_id] + offset, 0.14), color=colour, zorder=2
        )


def draw_timeline(
    path: Path,
    *,
    ledger: Ledger,
    journal: Journal,
    t0: float,
    end: float,
    title: str,
    lanes_limit: int = 60,
) -> Path:
    import matplotlib  # noqa: PLC0415 - heavy import, only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    launches = journal.entries(Mark.LAUNCHED)
    lanes = [e.instance_id for e in launches][:lanes_limit]
    row = {iid: index for index, iid in enumerate(lanes)}
    height = max(3.0, 0.45 * len(lanes) + 1.6)
    figure, axes = plt.subplots(figsize=(13, height), dpi=110)
    ended: dict[str, float] = {e.instance_id: e.t - t0 for e in journal.entries(Mark.TERMINATED)}

    # the instance's life as a thin grey bar
    for entry in launches:
        if entry.instance_id not in row:
            continue
        y = row[entry.instance_id]
        stop = ended.get(entry.instance_id, end - t0)
        axes.broken_barh([(entry.t - t0, stop - (entry.t - t0))], (y - 0.06, 0.12), color="#ced4da", zorder=1)

    _draw_tasks(axes, ledger, row, ended, t0)

    legend: list[Any] = [
        Patch(color=_FINISHED, label="task finished"),
        Patch(color=_RELEASED, label="task released on drain (runs again elsewhere)"),
        Patch(color=_KILLED, label="task killed with its instance"),
    ]
    for mark, (marker, colour, label) in _MARKS.items():
        points = [(e.t - t0, row[e.instance_id]) for e in journal.entries(mark) if e.instance_id in row]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        axes.scatter(xs, ys, marker=marker, color=colour, s=70, zorder=3, linewidths=1.5)
        legend.append(
            Line2D([], [], marker=marker, color=colour, linestyle="None", markersize=8, label=label)
        )

    labels = []
    for iid in lanes:
        launched = journal.first(Mark.LAUNCHED, iid)
        tag = " (replacement)" if launched is not None and not launched.detail.get("initial") else ""
        labels.append(f"{iid}{tag}")
    axes.set_yticks(range(len(lanes)), labels, fontsize=8)
    axes.set_ylim(-0.8, len(lanes) - 0.2)
    axes.invert_yaxis()
    axes.set_xlim(min(0.0, min((e.t - t0 for e in launches), default=0.0)), end - t0)
    axes.set_xlabel("seconds since the tasks were queued (drill time: a 2-minute warning is a few seconds)")
    axes.set_title(title, fontsize=11)
    axes.grid(axis="x", color="#eeeeee")
    axes.legend(
        handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8, frameon=False
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def title_for(report: dict[str, Any]) -> str:
    latency = report["requeue_latency_s"]
    return (
        f"spotguard drill ({report['mode']}): {report['tasks_done']}/{report['tasks_total']} tasks done, "
        f"{report['tasks_lost']} lost, {report['tasks_duplicated']} duplicated; "
        f"requeue latency p50 {latency['p50']:.1f} s, max {latency['max']:.1f} s"
    )
