"""``spotguard history``: recent migration jobs from the operations API."""

from __future__ import annotations

import argparse
from typing import Any

from spotguard_tools.ops_cli import add_api_arguments, call_api, console, print_json, seconds, table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "history", help="list migration jobs, newest first (operations API, SigV4)"
    )
    add_api_arguments(parser)
    parser.add_argument("--limit", type=int, default=20, help="jobs per page (1-100, default 20)")
    parser.add_argument("--offset", type=int, default=0, help="jobs to skip (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = call_api(args, lambda client: client.history(limit=args.limit, offset=args.offset))
    if result is None:
        return 1
    if args.json:
        print_json(result)
        return 0
    rows = [
        [
            job["jobId"],
            job["trigger"],
            job["startedAt"],
            job["status"] + (" (dry run)" if job.get("dryRun") else ""),
            seconds(job.get("durationMs")),
            job["summary"]["totalInstances"],
            job["summary"]["eligibleInstances"],
            job["summary"]["migratedInstances"],
            job["summary"]["errorCount"],
        ]
        for job in result["jobs"]
    ]
    out = console()
    out.print(
        table(
            ["JOB", "TRIGGER", "STARTED", "STATUS", "DURATION", "TOTAL", "ELIGIBLE", "MIGRATED", "ERRORS"],
            rows,
        )
    )
    shown = len(result["jobs"])
    first = result["offset"] + 1 if shown else result["offset"]
    out.print(f"\njobs {first}-{result['offset'] + shown} of {result['total']}")
    return 0
