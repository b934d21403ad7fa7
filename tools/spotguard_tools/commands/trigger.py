"""``spotguard trigger``: run a migration job now (operations API, SigV4)."""

from __future__ import annotations

import argparse
from typing import Any

from spotguard_tools.ops_cli import add_api_arguments, call_api, print_json, table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("trigger", help="run a migration job now (operations API, SigV4)")
    add_api_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="list and select only; change nothing")
    parser.add_argument("--max-migrations", type=int, help="migrate at most this many instances")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = call_api(
        args, lambda client: client.trigger(dry_run=args.dry_run, max_migrations=args.max_migrations)
    )
    if result is None:
        return 1
    if args.json:
        print_json(result)
        return 0
    print(f"job {result['jobId']}: {result['status']}" + (" (dry run)" if result.get("dryRun") else ""))
    job = result.get("job")
    if job:
        summary = job["summary"]
        print(
            f"instances {summary['totalInstances']}, eligible {summary['eligibleInstances']}, "
            f"migrated {summary['migratedInstances']}, errors {summary['errorCount']}"
        )
        if job["outcomes"]:
            print(
                table(
                    ["INSTANCE", "OUTCOME", "NEW INSTANCE", "ATTEMPTS", "ERROR"],
                    [
                        [o["instanceId"], o["outcome"], o.get("newInstanceId"), o["attempts"], o.get("error")]
                        for o in job["outcomes"]
                    ],
                )
            )
    elif result["status"] == "accepted":
        print("the reconciler runs it now; follow it with: spotguard history --limit 1")
    return 0
