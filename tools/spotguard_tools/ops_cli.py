"""Shared pieces of the commands that call the operations API (status, history, trigger).

Tables and the waiting spinner are rich's. ``--json`` prints the API's JSON on stdout and
nothing else (the spinner, like every message, goes to stderr), so it stays exactly
machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from spotguard_tools.api_client import ApiError, OpsApiClient

API_URL_ENV = "SPOTGUARD_API_URL"
#: Width used when stdout is not a terminal (a pipe, a file, a test): wide enough that job
#: ids and timestamps are never wrapped or cut, so the output can be read by a script.
PIPE_WIDTH = 240


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=os.environ.get(API_URL_ENV),
        help=f"the API stage URL from the stack outputs (default: ${API_URL_ENV})",
    )
    parser.add_argument("--region", help="region to sign for (default: from the URL or the AWS config)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def console() -> Console:
    """stdout, created per call (so redirections made after import are honoured)."""
    terminal = sys.stdout.isatty()
    # markup off: API values (error texts, names) are printed as they are, never as markup.
    return Console(file=sys.stdout, width=None if terminal else PIPE_WIDTH, highlight=False, markup=False)


def error_console() -> Console:
    return Console(file=sys.stderr, highlight=False, markup=False)


@contextmanager
def waiting(message: str) -> Iterator[None]:
    """A spinner on stderr while something is waited for (only on a terminal)."""
    errors = error_console()
    if not errors.is_terminal:
        yield
        return
    with errors.status(message, spinner="dots"):
        yield


def call_api(
    args: argparse.Namespace,
    action: Callable[[OpsApiClient], Any],
    *,
    message: str = "calling the operations API…",
) -> Any:
    """Run ``action`` with a client (a spinner saying ``message`` meanwhile); prints a clear
    error and returns None on failure."""
    if not args.api_url:
        print(f"error: --api-url is required (or set ${API_URL_ENV})", file=sys.stderr)
        return None
    try:
        with waiting(message):
            return action(OpsApiClient(args.api_url, region=args.region))
    except ApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> Table:
    """A rich table: header row, a rule, one line per row (cells never wrap)."""
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, title=title, title_justify="left", pad_edge=False)
    for header in headers:
        result.add_column(str(header), no_wrap=True)
    for row in rows:
        result.add_row(*("" if value is None else str(value) for value in row))
    return result


def seconds(milliseconds: Any) -> str:
    return "" if milliseconds is None else f"{int(milliseconds) / 1000:.1f}s"


def yes_no(value: Any) -> str:
    return "yes" if value else "no"
