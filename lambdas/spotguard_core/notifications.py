"""Publish spotguard notifications on the fleet's EventBridge bus.

The notifier function turns them into signed webhooks; anything else can subscribe to
the bus with its own rule. Publishing is best effort for the caller: a failure is
returned, not raised, so that bookkeeping never blocks requeueing work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from spotguard_core import aws
from spotguard_core.contracts import NOTIFICATION_EVENT_SOURCE, Env, NotificationType


def publish(kind: NotificationType, detail: Mapping[str, Any], *, bus_name: str | None = None) -> bool:
    """Put one notification event on the bus. Returns False when it could not be published."""
    bus = bus_name or os.environ.get(Env.NOTIFICATION_BUS)
    if not bus:
        return False
    response = aws.client("events").put_events(
        Entries=[
            {
                "Source": NOTIFICATION_EVENT_SOURCE,
                "DetailType": kind.value,
                "Detail": json.dumps(dict(detail), default=str, sort_keys=True),
                "EventBusName": bus,
            }
        ]
    )
    return int(response.get("FailedEntryCount", 0)) == 0
