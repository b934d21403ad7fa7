"""``spotguard drill``: run the local drill (no AWS account needed) and print its report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from spotguard_tools.drill import Drill, DrillConfig
from spotguard_tools.drill.config import add_arguments, config_from_arguments
from spotguard_tools.drill.drill_report import report_table
from spotguard_tools.drill.progress import Progress


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
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    add_arguments(parser)
    parser.set_defaults(run=run, parser=parser)


def config_from(args: argparse.Namespace) -> DrillConfig:
    try:
        return config_from_arguments(args, requeue_enabled=not args.baseline)
    except ValueError as error:
        args.parser.error(str(error))
        raise  # not reached: error() exits


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
    console = Console(soft_wrap=True, highlight=False, markup=False)
    console.print(report_table(reports))
    if len(reports) == 2:
        console.print(_comparison(reports[0], reports[1]))
    elif config.requeue_enabled:
        console.print("the same plan without spotguard's requeue: spotguard drill --compare (or --baseline)")
    for report in reports:
        if report.get("timeline"):
            console.print(f"timeline ({report['mode']}): {report['timeline']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document: Any = reports[0] if len(reports) == 1 else {"spotguard": reports[0], "baseline": reports[1]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"report: {args.json}")
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
