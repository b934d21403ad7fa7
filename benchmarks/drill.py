"""Benchmark: the local drill at fleet scale, spotguard against the visibility-timeout baseline.

At least 20 instances and 2,000 tasks; 30 % of the instances are interrupted, half of them
by a hard kill without notice and half by a spot warning. Both modes run the same seeded
plan. Prints one JSON document: both reports and the ratio of the baseline's recovery
latency (interruption -> task picked up again) to spotguard's.

    .venv/bin/python benchmarks/drill.py [--instances 20] [--tasks 2000] [--seed 7]

Sized for 2 cores: short tasks and two workers per agent.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotguard_tools.drill import Drill, DrillConfig
from spotguard_tools.drill.progress import Progress

#: Keep the JSON readable: the per-instance records are in each run's report.json.
_OMIT = ("fleet_records", "terminated_by_watchdog_ids", "bootstrap_failure_ids", "config")


def config_for(args: argparse.Namespace) -> DrillConfig:
    interrupted = max(2, math.ceil(args.instances * args.interrupted_fraction))
    hard_kills = interrupted // 2
    return DrillConfig(
        seed=args.seed,
        instances=args.instances,
        concurrency=2,
        tasks=args.tasks,
        task_min_seconds=0.5,
        task_max_seconds=2.0,
        long_task_fraction=0.03,
        long_task_seconds=14.0,
        spot_warnings=interrupted - hard_kills,
        hard_kills=hard_kills,
        rebalances=0,
        bootstrap_failures=0,
        chaos_start_seconds=3.0,
        chaos_end_seconds=25.0,
        warning_seconds=10.0,
        visibility_timeout_seconds=30,
        bootstrap_deadline_seconds=120,
        heartbeat_stale_seconds=60,
        watchdog_interval_seconds=5.0,
        imds_poll_seconds=1.0,
        timeout_seconds=400.0,
        out_dir=Path(args.out_dir),
    )


def summary(report: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in report.items() if key not in _OMIT}


def ratio(baseline: float, spotguard: float) -> float | None:
    return round(baseline / spotguard, 1) if spotguard > 0 else None


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a run like Ctrl-C: its agents, control plane and emulator are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--interrupted-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out-dir", default="drill-out/benchmark")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    config = config_for(args)
    progress = Progress(interval=15.0, enabled=not args.quiet)
    started = time.time()
    reports = {}
    for mode_config in (config, replace(config, requeue_enabled=False)):
        reports[mode_config.mode] = Drill(mode_config, progress).run()
    ours, theirs = reports["spotguard"], reports["baseline"]
    document = {
        "benchmark": "drill",
        "instances": config.instances,
        "tasks": config.tasks,
        "interrupted_instances": config.spot_warnings + config.hard_kills,
        "hard_kills": config.hard_kills,
        "spot_warnings": config.spot_warnings,
        "config": config.to_json(),
        "recovery_latency_ratio_baseline_to_spotguard": {
            key: ratio(theirs["requeue_latency_s"][key], ours["requeue_latency_s"][key])
            for key in ("p50", "p95", "p99", "max")
        },
        "spotguard": summary(ours),
        "baseline": summary(theirs),
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(document, indent=2))
    return 0 if ours["tasks_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
