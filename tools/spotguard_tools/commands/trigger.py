"""``spotguard trigger``: run a migration job now (operations API, SigV4).

The API hands the job to the reconciler and answers with its id; the command then waits
(a spinner on a terminal) until the job shows up finished in the history, and prints its
outcomes. ``--no-wait`` returns right after the hand-over. With ``--json`` it prints the
API's answer, with ``status`` and ``job`` from the finished job once waited for.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from spotguard_tools.api_client import OpsApiClient
from spotguard_tools.ops_cli import add_api_arguments, call_api, console, print_json, table

#: Jobs read per poll: a job just handed over is among the newest.
POLL_PAGE = 20
POLL_INTERVAL_SECONDS = 2.0
DEFAULT_WAIT_SECONDS = 900.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("trigger", help="run a migration job now (operations API, SigV4)")
    add_api_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="list and select only; change nothing")
    parser.add_argument("--max-migrations", type=int, help="migrate at most this many instances")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is handed over")
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=DEFAULT_WAIT_SECONDS,
        help=f"longest wait for the job to finish (default {DEFAULT_WAIT_SECONDS:.0f})",
    )
    parser.set_defaults(run=run)


def finished_job(client: OpsApiClient, job_id: str, *, wait_seconds: float) -> dict[str, Any] | None:
    """The job's history record once it is no longer running; None if the wait ran out."""
    deadline = time.monotonic() + wait_seconds
    while True:
        page = client.history(limit=POLL_PAGE, offset=0)
        job = next((j for j in page["jobs"] if j.get("jobId") == job_id), None)
        if job is not None and job.get("status") != "running":
            return job
        if time.monotonic() + POLL_INTERVAL_SECONDS > deadline:
            return None
        time.sleep(POLL_INTERVAL_SECONDS)


def run(args: argparse.Namespace) -> int:
    accepted = call_api(
        args, lambda client: client.trigger(dry_run=args.dry_run, max_migrations=args.max_migrations)
    )
    if accepted is None:
        return 1
    job: dict[str, Any] | None = None
    if not args.no_wait:
        job = call_api(
            args,
            lambda client: finished_job(client, accepted["jobId"], wait_seconds=args.wait_seconds),
            message=f"job {accepted['jobId']}: waiting for the reconciler…",
        )
    result = dict(accepted)
    if job is not None:
        result["status"], result["job"] = job["status"], job
    if args.json:
        print_json(result)
        return 0
    out = console()
    out.print(f"job {result['jobId']}: {result['status']}" + (" (dry run)" if result.get("dryRun") else ""))
    if job is None:
        if not args.no_wait:
            print(f"still running after {args.wait_seconds:.0f} s", file=sys.stderr)
        out.print("the reconciler runs it; follow it with: spotguard history --limit 1")
        return 0
    summary = job["summary"]
    out.print(
        f"instances {summary['totalInstances']}, eligible {summary['eligibleInstances']}, "
        f"migrated {summary['migratedInstances']}, errors {summary['errorCount']}"
    )
    if job["outcomes"]:
        out.print(
            table(
                ["INSTANCE", "OUTCOME", "NEW INSTANCE", "ATTEMPTS", "ERROR"],
                [
                    [o["instanceId"], o["outcome"], o.get("newInstanceId"), o["attempts"], o.get("error")]
                    for o in job["outcomes"]
                ],
            )
        )
    return 0
