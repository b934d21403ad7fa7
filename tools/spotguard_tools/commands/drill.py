"""``spotguard drill``: run the local drill (no AWS account needed) and print its report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotguard_core.contracts import RebalancePolicy

from spotguard_tools.drill import Drill, DrillConfig
from spotguard_tools.drill.progress import Progress
from spotguard_tools.drill.report import format_table

_DEFAULTS = DrillConfig()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "drill",
        help="run the local drill: a spot fleet on this machine, interruptions injected, tasks counted",
        description=(
            "Start an AWS emulator (moto) on 127.0.0.1, run the real agent on simulated instances and "
            "the real dispatcher and watchdog, inject spot warnings, hard kills, rebalance recommendations "
            "and a failing bootstrap while tasks run, and report what happened to every task. "
            "Exit status 1 when a task was lost."
        ),
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the JSON report here")
    parser.add_argument(
        "--timeline",
        type=Path,
        metavar="PATH",
        help="timeline picture (PNG); default OUT/<mode>/timeline.png",
    )
    parser.add_argument("--no-timeline", action="store_true", help="do not draw the timeline picture")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--baseline",
        action="store_true",
        help="spotguard's requeue off: only the visibility timeout brings work back",
    )
    mode.add_argument(
        "--compare", action="store_true", help="run spotguard and the baseline; print them side by side"
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="chaos plan and task durations (default %(default)s)"
    )
    parser.add_argument(
        "--instances", type=int, default=_DEFAULTS.instances, help="fleet size (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=_DEFAULTS.concurrency, help="tasks per agent (default %(default)s)"
    )
    parser.add_argument(
        "--tasks", type=int, default=_DEFAULTS.tasks, help="tasks to run (default %(default)s)"
    )
    parser.add_argument("--spot-warnings", type=int, default=_DEFAULTS.spot_warnings)
    parser.add_argument("--hard-kills", type=int, default=_DEFAULTS.hard_kills)
    parser.add_argument("--rebalances", type=int, default=_DEFAULTS.rebalances)
    parser.add_argument("--bootstrap-failures", type=int, default=_DEFAULTS.bootstrap_failures)
    parser.add_argument(
        "--warning-seconds",
        type=float,
        default=_DEFAULTS.warning_seconds,
        help="the 2-minute spot warning, compressed (default %(default)s)",
    )
    parser.add_argument(
        "--visibility-timeout",
        type=int,
        default=_DEFAULTS.visibility_timeout_seconds,
        help="work queue (default %(default)s)",
    )
    parser.add_argument(
        "--rebalance-policy",
        choices=[p.value for p in RebalancePolicy],
        default=_DEFAULTS.rebalance_policy,
    )
    parser.add_argument("--timeout", type=float, default=_DEFAULTS.timeout_seconds, help="hard stop, seconds")
    parser.add_argument(
        "--out-dir", type=Path, default=_DEFAULTS.out_dir, help="logs, ledger, reports (default %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> DrillConfig:
    return replace(
        _DEFAULTS,
        seed=args.seed,
        instances=args.instances,
        concurrency=args.concurrency,
        tasks=args.tasks,
        spot_warnings=args.spot_warnings,
        hard_kills=args.hard_kills,
        rebalances=args.rebalances,
        bootstrap_failures=args.bootstrap_failures,
        warning_seconds=args.warning_seconds,
        visibility_timeout_seconds=args.visibility_timeout,
        rebalance_policy=args.rebalance_policy,
        timeout_seconds=args.timeout,
        out_dir=args.out_dir,
        requeue_enabled=not args.baseline,
    )


def _stop_on_sigterm() -> None:
    """SIGTERM ends the drill like Ctrl-C: its agents, control plane and emulator are stopped."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run(args: argparse.Namespace) -> int:
    _stop_on_sigterm()
    config = config_from(args)
    configs = [config, replace(config, requeue_enabled=False)] if args.compare else [config]
    progress = Progress(enabled=not args.quiet)
    reports = []
    for each in configs:
        drill = Drill(each, progress)
        report = drill.run()
        if not args.no_timeline:
            single = args.timeline if args.timeline is not None and len(configs) == 1 else None
            path = single or (each.out_dir / each.mode / "timeline.png")
            if args.timeline is not None and len(configs) > 1:
                path = args.timeline.with_name(f"{args.timeline.stem}-{each.mode}{args.timeline.suffix}")
            report["timeline"] = str(drill.draw_timeline(path))
        reports.append(report)
    print(format_table(reports))
    if len(reports) == 2:
        print(_comparison(reports[0], reports[1]))
    elif config.requeue_enabled:
        print("the same plan without spotguard's requeue: spotguard drill --compare (or --baseline)")
    for report in reports:
        if report.get("timeline"):
            print(f"timeline ({report['mode']}): {report['timeline']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document: Any = reports[0] if len(reports) == 1 else {"spotguard": reports[0], "baseline": reports[1]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"report: {args.json}")
    lost = reports[0]["tasks_lost"]
    if lost:
        print(f"FAILED: {lost} task(s) lost", file=sys.stderr)
        return 1
    return 0


def _comparison(spotguard: dict[str, Any], baseline: dict[str, Any]) -> str:
    ours = spotguard["requeue_latency_s"]["p50"]
    theirs = baseline["requeue_latency_s"]["p50"]
    if ours <= 0:
        return ""
    return (
        f"requeue latency p50: baseline {theirs:.1f} s, spotguard {ours:.1f} s "
        f"(spotguard brings interrupted work back {theirs / ours:.0f}x faster)"
    )
