"""``spotguard send-test-event KIND --instance ID``: staging test events.

Puts an AWS-shaped event (the same builders the tests and the drill use) with source
``spotguard.test`` on the account's default bus. The stack's rules accept that source
only when ``staging.allow_test_events`` is on, so in production nothing happens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from spotguard_core import aws, contracts
from spotguard_core.contracts import TEST_EVENT_SOURCE

from spotguard_tools import events

STATE_CHOICES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")


def _builders(args: argparse.Namespace, account: str) -> dict[str, Callable[[], dict[str, Any]]]:
    common = {"account": account, "region": args.region, "source": TEST_EVENT_SOURCE}
    asg = args.asg or contracts.asg_name(args.fleet)
    return {
        "spot-interruption": lambda: events.spot_interruption_warning(
            args.instance, availability_zone=args.availability_zone, **common
        ),
        "capacity-reservation-interruption": lambda: events.capacity_reservation_interruption_warning(
            args.instance, **common
        ),
        "rebalance": lambda: events.rebalance_recommendation(args.instance, **common),
        "state-change": lambda: events.state_change(args.instance, args.state, **common),
        "lifecycle-launch": lambda: events.lifecycle_action(
            args.instance, transition="launch", asg_name=asg, hook_name=contracts.LAUNCH_HOOK_NAME, **common
        ),
        "lifecycle-terminate": lambda: events.lifecycle_action(
            args.instance,
            transition="terminate",
            asg_name=asg,
            hook_name=contracts.TERMINATE_HOOK_NAME,
            **common,
        ),
        "health": lambda: events.health_scheduled_change([args.instance], **common),
    }


KINDS = (
    "spot-interruption",
    "capacity-reservation-interruption",
    "rebalance",
    "state-change",
    "lifecycle-launch",
    "lifecycle-terminate",
    "health",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send-test-event",
        help="put a staging test event (source spotguard.test) on the default bus",
        description="Staging only: the stack's rules accept source spotguard.test when "
        "staging.allow_test_events is true, and the dispatcher rejects them unless "
        "SPOTGUARD_ALLOW_TEST_EVENTS is true (the stack sets it from the same setting). "
        "Lifecycle test events cannot be answered by the "
        "control plane (there is no real lifecycle action behind them).",
    )
    parser.add_argument("kind", choices=KINDS, help="which event to send")
    parser.add_argument("--instance", required=True, help="instance id the event is about (i-...)")
    parser.add_argument("--region", default=None, help="region of the bus (default: your AWS config)")
    parser.add_argument("--bus", default="default", help="event bus name (default: default)")
    parser.add_argument("--state", default="stopping", choices=STATE_CHOICES, help="state for state-change")
    parser.add_argument("--fleet", default="default", help="fleet name (lifecycle events name its ASG)")
    parser.add_argument("--asg", help="ASG name for lifecycle events (default: spotguard-<fleet>)")
    parser.add_argument("--availability-zone", help="zone in the spot warning's resource ARN")
    parser.add_argument("--account", help="account id shown in the event (default: the caller's)")
    parser.add_argument("--dry-run", action="store_true", help="print the event, do not send it")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not re.fullmatch(contracts.INSTANCE_ID_PATTERN, args.instance):
        print(f"error: --instance must be an EC2 instance id (i-...), not {args.instance!r}", file=sys.stderr)
        return 2
    client_options = {"region_name": args.region} if args.region else {}
    if args.region is None:
        args.region = aws.client("events").meta.region_name
    account = args.account or (
        events.DEFAULT_ACCOUNT
        if args.dry_run
        else aws.client("sts", **client_options).get_caller_identity()["Account"]
    )
    event = _builders(args, account)[args.kind]()
    print(json.dumps(event, indent=2))
    if args.dry_run:
        return 0
    response = aws.client("events", **client_options).put_events(
        Entries=[events.to_put_events_entry(event, bus_name=args.bus)]
    )
    entry = response["Entries"][0]
    if int(response.get("FailedEntryCount", 0)) or "EventId" not in entry:
        print(
            f"error: PutEvents rejected the event: {entry.get('ErrorCode')} {entry.get('ErrorMessage')}",
            file=sys.stderr,
        )
        return 1
    print(f"sent to bus {args.bus} as event {entry['EventId']}", file=sys.stderr)
    return 0
