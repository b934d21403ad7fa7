"""``spotguard explain EVENT.json``: the normalised signals and the actions they would cause.

Nothing is done: decisions are pure. With AWS configured (``SPOTGUARD_FLEET_TABLE`` set)
each instance's fleet record is read so the actions match what the dispatcher would do
now; otherwise every instance is assumed managed with no record, and the output says so.
A malformed or unknown event prints its rejection reason and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from spotguard_core.contracts import Env, FleetRecord, instance_arn_prefix, partition_of_region
from spotguard_core.control_settings import ControlSettings, SettingsError
from spotguard_core.decisions import decide
from spotguard_core.signals import Rejection, parse_event

EXIT_REJECTED = 2
EXIT_USAGE = 64


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show the signal(s) an EventBridge event becomes and the actions it would cause",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("event", help="EventBridge event JSON file ('-' reads stdin)")
    parser.add_argument("--fleet", help=f"fleet name (default: ${Env.FLEET_NAME.value} or 'default')")
    parser.add_argument(
        "--offline", action="store_true", help="do not read fleet records even if AWS is configured"
    )
    parser.set_defaults(run=run)


def _settings(fleet: str | None) -> ControlSettings:
    env = dict(os.environ)
    if fleet:
        env[Env.FLEET_NAME.value] = fleet
    env.setdefault(Env.FLEET_NAME.value, "default")
    return ControlSettings.from_env(env)


def _arn_prefix(settings: ControlSettings) -> str | None:
    if not (settings.region and settings.account_id):
        return None  # FleetStore says which variable to set
    region = settings.region
    return instance_arn_prefix(
        partition=partition_of_region(region), region=region, account_id=settings.account_id
    )


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    return Path(path).read_text(encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    try:
        text = _read(args.event)
        settings = _settings(args.fleet)
    except (OSError, SettingsError) as error:
        print(json.dumps({"error": str(error)}), file=sys.stderr)
        return EXIT_USAGE
    parsed = parse_event(
        text,
        expected_account=settings.account_id,
        expected_region=settings.region,
        allow_test_events=settings.allow_test_events,
    )
    if isinstance(parsed, Rejection):
        print(json.dumps(parsed.to_json(), indent=2))
        print(f"rejected: {parsed.reason}", file=sys.stderr)
        return EXIT_REJECTED

    store = None
    notes: list[str] = []
    if not args.offline and os.environ.get(Env.FLEET_TABLE.value):
        from spotguard_core.fleet_store import FleetStore  # noqa: PLC0415 - only when AWS is configured

        # An operator's shell rarely has the functions' SPOTGUARD_INSTANCE_ARN_PREFIX: the
        # settings' account and region give the same instance keys.
        store = FleetStore(arn_prefix=os.environ.get(Env.INSTANCE_ARN_PREFIX.value) or _arn_prefix(settings))
    else:
        notes.append(
            f"fleet records not read ({Env.FLEET_TABLE.value} unset or --offline): "
            "every instance assumed managed, with no record"
        )

    signals: list[dict[str, Any]] = []
    actions: list[dict[str, Any]] = []
    for signal in parsed:
        record: FleetRecord | None = store.get(signal.instance_id) if store is not None else None
        entry = signal.to_json()
        entry["fleet_record"] = record.to_item() if record is not None else None
        signals.append(entry)
        actions.extend(action.to_json() for action in decide(signal, record, settings))
    print(json.dumps({"signals": signals, "actions": actions, "notes": notes}, indent=2, default=str))
    return 0
