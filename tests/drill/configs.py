"""The short drill's settings, shared by the drill tests (tens of tasks, every kind of
interruption, about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

from spotguard_tools.drill import DrillConfig


def short_config(out_dir: Path, **overrides: object) -> DrillConfig:
    settings: dict[str, object] = {
        "instances": 4,
        "concurrency": 2,
        "tasks": 48,
        "task_min_seconds": 0.5,
        "task_max_seconds": 2.0,
        "long_task_fraction": 0.15,
        "long_task_seconds": 9.0,
        "long_tasks": 0,
        "spot_warnings": 1,
        "hard_kills": 2,
        "rebalances": 1,
        "bootstrap_failures": 1,
        "chaos_start_seconds": 2.0,
        "chaos_end_seconds": 12.0,
        "warning_seconds": 6.0,
        "visibility_timeout_seconds": 20,
        "bootstrap_deadline_seconds": 25,
        "watchdog_interval_seconds": 2.0,
        "timeout_seconds": 90.0,
        "out_dir": out_dir,
        **overrides,
    }
    return DrillConfig(**settings)  # type: ignore[arg-type]
