"""Benchmark: the local drill at fleet scale, spotguard against the visibility-timeout baseline.

20 instances and 2,000 tasks by default; 30 % of the instances are interrupted, half by a
hard kill without notice and half by a spot warning. Both modes run the same seeded plan
in one run. Prints one JSON document: both reports and the ratio of the baseline's
recovery latency to spotguard's at p50 and p99.

Recovery latency runs from the moment an interruption is *observable* (the IMDS notice
and published warning; for a hard kill, the published state change) to the task being
picked up again, so it is spotguard's figure; the harness's own delay between acting and
the interruption being observable (moto's ``TerminateInstances`` under load) is reported
apart (``harness_delay_s``).

The plan must cut enough work short for a p99 to mean something (>= 30 requeued tasks per
mode): eight workers per agent, tasks of seconds, three in ten of them longer than the warning,
and warnings and kills aimed at the busiest instances, so every interrupted instance holds
several tasks that cannot finish there. The fleet's throughput on 2 cores is the emulator's
(every task costs several AWS calls), so what is in flight at an interruption is throughput
x duration, not the slot count. The interruptions' clock starts once every initial
instance runs three quarters of its slots at once: on a starved machine the fleet can
work one task per instance for a minute, and a plan played then cuts little short.

Each task checkpoints every ``--checkpoint-every-seconds`` (4 s) of work, not the drill's
default 1 s: 160 running tasks checkpointing every second ask the emulator for 160
PutObject a second, more than moto answers on 2 cores (about 140 requests a second in
all), and every other call of the run (receives, leases, the dispatcher's requeue) then
queues behind them, so the figure measured moto's queue, not spotguard (the 20 s tasks
still save four checkpoints and resume from them).

    .venv/bin/python benchmarks/drill.py [--instances 20] [--tasks 2000] [--seed 7]
        [--checkpoint-every-seconds 4] [--aws-faults 0.05] [--aws-latency-ms 20]

Sized for 2 cores.
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
#: A p99 over fewer requeued tasks than this is one or two tasks, not a distribution.
MIN_REQUEUED = 30
GOAL_P99_RATIO = 15.0


def config_for(args: argparse.Namespace) -> DrillConfig:
    interrupted = max(2, math.ceil(args.instances * args.interrupted_fraction))
    hard_kills = interrupted // 2
    return DrillConfig(
        seed=args.seed,
        instances=args.instances,
        concurrency=args.concurrency,
        tasks=args.tasks,
        task_min_seconds=2.0,
        task_max_seconds=6.0,
        long_task_fraction=0.3,
        long_task_seconds=20.0,
        long_tasks=0,
        checkpoint_every_seconds=args.checkpoint_every_seconds,
        aim_at_busiest=True,
        spot_warnings=interrupted - hard_kills,
        hard_kills=hard_kills,
        rebalances=0,
        bootstrap_failures=0,
        chaos_start_seconds=3.0,
        chaos_when_running=max(1, args.concurrency * 3 // 4),
        chaos_end_seconds=25.0,
        warning_seconds=8.0,
        visibility_timeout_seconds=30,
        bootstrap_deadline_seconds=120,
        heartbeat_stale_seconds=60,
        watchdog_interval_seconds=5.0,
        imds_poll_seconds=1.0,
        dispatcher_concurrency=args.dispatchers,
        aws_faults=args.aws_faults,
        aws_latency_ms=args.aws_latency_ms,
        timeout_seconds=args.timeout,
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
    parser.add_argument("--concurrency", type=int, default=8, help="workers per agent")
    parser.add_argument("--interrupted-fraction", type=float, default=0.3)
    parser.add_argument(
        "--dispatchers", type=int, default=4, help="concurrent dispatcher batches (Lambda's SQS event source)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--checkpoint-every-seconds", type=float, default=4.0, help="work between two checkpoints of a task"
    )
    parser.add_argument("--aws-faults", type=float, default=0.0, help="fraction of AWS calls failed")
    parser.add_argument("--aws-latency-ms", type=int, default=0, help="added before every AWS call")
    parser.add_argument("--timeout", type=float, default=600.0, help="hard stop of each mode's run")
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
    ratios = {
        key: ratio(theirs["requeue_latency_s"][key], ours["requeue_latency_s"][key])
        for key in ("p50", "p95", "p99", "max")
    }
    requeued = {mode: report["requeue_latency_s"]["count"] for mode, report in reports.items()}
    document = {
        "benchmark": "drill",
        "instances": config.instances,
        "tasks": config.tasks,
        "concurrency": config.concurrency,
        "interrupted_instances": config.spot_warnings + config.hard_kills,
        "hard_kills": config.hard_kills,
        "spot_warnings": config.spot_warnings,
        "aws_faults": config.aws_faults,
        "aws_latency_ms": config.aws_latency_ms,
        "latency_model": "recovery from the moment the interruption is observable to the task's next start",
        "recovery_latency_ratio_baseline_to_spotguard": ratios,
        "requeue_latency_s": {mode: report["requeue_latency_s"] for mode, report in reports.items()},
        "harness_delay_s": {mode: report["harness_delay_s"] for mode, report in reports.items()},
        "requeued_tasks": requeued,
        "goals": {
            f"p99_ratio_at_least_{GOAL_P99_RATIO:g}x": (ratios["p99"] or 0) >= GOAL_P99_RATIO,
            f"at_least_{MIN_REQUEUED}_requeued_per_mode": min(requeued.values()) >= MIN_REQUEUED,
            "none_lost": all(r["tasks_lost"] == 0 for r in reports.values()),
            "none_duplicated": all(r["tasks_duplicated"] == 0 for r in reports.values()),
            "none_in_dlq": all(r["tasks_in_dlq"] == 0 for r in reports.values()),
        },
        "config": config.to_json(),
        "spotguard": summary(ours),
        "baseline": summary(theirs),
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(document, indent=2))
    return 0 if all(r["tasks_lost"] == 0 for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
