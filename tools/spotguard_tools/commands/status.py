"""``spotguard status``: health and migration status from the operations API."""

from __future__ import annotations

import argparse
from typing import Any

from spotguard_tools.ops_cli import add_api_arguments, call_api, console, print_json, seconds, table, yes_no


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="show health and migration status (operations API, SigV4)")
    add_api_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = call_api(
        args, lambda client: {"health": client.health(), "migration": client.migration_status()}
    )
    if result is None:
        return 1
    if args.json:
        print_json(result)
        return 0
    health, migration = result["health"], result["migration"]
    service = health["migrationService"]
    stats, config, last = migration["statistics"], migration["configuration"], migration.get("lastExecution")
    out = console()
    out.print(f"spotguard fleet {health.get('fleet') or '?'}: {health['status']}")
    out.print(
        table(
            ["MIGRATION", "VALUE"],
            [
                ["enabled", yes_no(service["enabled"])],
                ["status", service["status"]],
                ["last execution", service["lastExecution"] or "never"],
                ["last status", last["status"] if last else ""],
                ["next execution", service["nextExecution"] or ""],
                ["recent errors", service["recentErrors"]],
                [
                    "executions",
                    f"{stats['totalExecutions']} ({stats['successfulExecutions']} ok, "
                    f"{stats['failedExecutions']} failed)",
                ],
                ["average time", seconds(stats["averageExecutionTime"])],
                ["migrations", stats["totalMigrations"]],
                ["instances processed", stats["totalInstancesProcessed"]],
            ],
        )
    )
    out.print()
    out.print(
        table(
            ["SETTING", "VALUE"],
            [
                ["provider", config["provider"]],
                ["interval", f"{config['intervalMinutes']} min"],
                ["job timeout", f"{config['jobTimeoutMs']} ms"],
                ["max concurrent", config["maxConcurrent"]],
                ["dry run", yes_no(config["dryRun"])],
                ["retry failed", yes_no(config["retryFailed"])],
                ["log level", config["logLevel"]],
            ],
        )
    )
    return 0
