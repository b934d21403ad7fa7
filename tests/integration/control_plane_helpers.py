"""Helpers of the control-plane integration tests: sample events, handler calls, output."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spotguard_core.local_context import LocalLambdaContext
from spotguard_tools import events

EVENTS_DIR = Path(__file__).resolve().parents[1] / "events"
SAMPLE_INSTANCE = "i-1234567890abcdef0"
SECOND_SAMPLE_INSTANCE = "i-0fedcba0987654321"


def sample_event(
    name: str, instance_id: str, *, second_instance_id: str | None = None, **overrides: Any
) -> dict:
    """tests/events/<name>.json with its instance ids replaced, a fresh id and ``time`` now."""
    text = (EVENTS_DIR / f"{name}.json").read_text()
    text = text.replace(SAMPLE_INSTANCE, instance_id)
    if second_instance_id:
        text = text.replace(SECOND_SAMPLE_INSTANCE, second_instance_id)
    event: dict[str, Any] = json.loads(text)
    event["id"] = str(uuid.uuid4())
    event["time"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event.update(overrides)
    return event


def dispatch(*bodies: Mapping[str, Any] | str) -> dict[str, Any]:
    from spotguard_functions import dispatcher  # noqa: PLC0415 - import after the env is set

    result: dict[str, Any] = dispatcher.handler(events.to_sqs_event(*bodies), LocalLambdaContext())
    return result


def run_watchdog() -> dict[str, Any]:
    from spotguard_functions import watchdog  # noqa: PLC0415

    result: dict[str, Any] = watchdog.handler(
        {"source": "aws.events", "detail-type": "Scheduled Event"}, LocalLambdaContext()
    )
    return result


class Output:
    """EMF metrics printed by Powertools on stdout (captured with capfd). Log lines are read
    with ``caplog``: Powertools' handler keeps the stdout of the first import."""

    def __init__(self, text: str) -> None:
        self.logs: list[dict[str, Any]] = []
        self.metrics: dict[str, float] = {}
        for raw_line in text.splitlines():
            line = raw_line.strip()
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "_aws" in doc:
                for definition in doc["_aws"]["CloudWatchMetrics"]:
                    for metric in definition["Metrics"]:
                        value = doc[metric["Name"]]
                        total = sum(value) if isinstance(value, list) else value
                        self.metrics[metric["Name"]] = self.metrics.get(metric["Name"], 0) + total
            else:
                self.logs.append(doc)

    def metric(self, name: str) -> float:
        return self.metrics.get(str(name), 0)
