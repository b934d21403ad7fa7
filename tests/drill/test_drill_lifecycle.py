"""Short drills for the fleet's lifecycle: long tasks resumed from checkpoints, and early
replacements (rebalance recommendations, AWS Health scheduled changes) that must end.

Real moto server, real agents, real dispatcher and watchdog, as in ``test_drill_short``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from spotguard_tools.drill import Drill

from tests.drill.configs import short_config

pytestmark = [pytest.mark.drill, pytest.mark.xdist_group("drill")]


def test_long_tasks_resume_from_their_checkpoints(tmp_path: Path) -> None:
    """The same plan twice: with checkpoints an interrupted long task continues where it
    stopped; without, its work is done again."""
    config = short_config(
        tmp_path / "checkpoints",
        tasks=24,
        long_task_fraction=0.0,
        long_tasks=4,
        long_task_seconds=10.0,
        spot_warnings=1,
        hard_kills=1,
        rebalances=0,
        bootstrap_failures=0,
        chaos_start_seconds=3.0,
        chaos_end_seconds=6.0,
        warning_seconds=4.0,
    )
    with_checkpoints = Drill(config).run()
    without = Drill(replace(config, checkpoints=False, out_dir=tmp_path / "no-checkpoints")).run()
    for report in (with_checkpoints, without):
        assert not report["timed_out"]
        assert report["tasks_lost"] == 0
        assert report["tasks_done"] == report["tasks_total"] == 28
        assert report["tasks_in_dlq"] == 0
        assert report["requeue_latency_s"]["count"] >= 1  # long tasks were cut short
    assert with_checkpoints["tasks_resumed_from_checkpoint"] >= 1
    assert without["tasks_resumed_from_checkpoint"] == 0
    assert without["work_redone_seconds"] > 0
    assert with_checkpoints["work_redone_seconds"] < without["work_redone_seconds"]


def test_early_replacements_leave_nothing_running_outside_the_asg(tmp_path: Path) -> None:
    """Rebalance recommendations under the default policy (replace) and AWS Health
    scheduled changes: each replaced instance drains and ends; nothing is lost."""
    report = Drill(
        short_config(
            tmp_path,
            tasks=32,
            spot_warnings=0,
            hard_kills=0,
            rebalances=2,
            health_events=2,
            bootstrap_failures=0,
        )
    ).run()
    assert not report["timed_out"]
    assert report["interruptions"]["rebalance"] == 2
    assert report["interruptions"]["health_event"] == 2
    assert report["tasks_lost"] == 0
    assert report["tasks_duplicated"] == 0
    assert report["tasks_in_dlq"] == 0
    assert report["instances_running_outside_asg"] == 0, report["instances_running_outside_asg_ids"]
