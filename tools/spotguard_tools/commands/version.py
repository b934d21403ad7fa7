"""``spotguard version``: print the installed version."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("version", help="print the spotguard version")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(version("spotguard"))
    return 0
