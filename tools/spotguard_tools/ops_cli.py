"""Shared pieces of the commands that call the operations API (status, history, trigger)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from spotguard_tools.api_client import ApiError, OpsApiClient

API_URL_ENV = "SPOTGUARD_API_URL"


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=os.environ.get(API_URL_ENV),
        help=f"the API stage URL from the stack outputs (default: ${API_URL_ENV})",
    )
    parser.add_argument("--region", help="region to sign for (default: from the URL or the AWS config)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def call_api(args: argparse.Namespace, action: Callable[[OpsApiClient], Any]) -> Any:
    """Run ``action`` with a client; prints a clear error and returns None on failure."""
    if not args.api_url:
        print(f"error: --api-url is required (or set ${API_URL_ENV})", file=sys.stderr)
        return None
    try:
        return action(OpsApiClient(args.api_url, region=args.region))
    except ApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def seconds(milliseconds: Any) -> str:
    return "" if milliseconds is None else f"{int(milliseconds) / 1000:.1f}s"


def yes_no(value: Any) -> str:
    return "yes" if value else "no"
