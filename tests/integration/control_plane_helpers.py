"""Helpers of the control-plane integration tests: sample events, seeded records, handler calls, output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from spotguard_core.contracts import (
    LAUNCH_HOOK_NAME,
    TERMINATE_HOOK_NAME,
    BootstrapStatus,
    EndReason,
    FleetRecord,
    InstanceState,
    asg_name,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.local_context import LocalLambdaContext
from spotguard_tools import events

from tests.support import control_plane_env

SECOND_SAMPLE_INSTANCE = "i-0fedcba0987654321"
FLEET = control_plane_env.FLEET

#: Sample events by name, built by ``spotguard_tools.events`` (the one way to make events).
SAMPLES: dict[str, Callable[[str, str | None], dict[str, Any]]] = {
    "spot_interruption_warning": lambda i, _: events.spot_interruption_warning(i),
    "capacity_reservation_interruption": lambda i, _: events.capacity_reservation_interruption_warning(i),
    "rebalance_recommendation": lambda i, _: events.rebalance_recommendation(i),
    "state_change_terminated": lambda i, _: events.state_change(i, "terminated"),
    "lifecycle_launch": lambda i, _: events.lifecycle_action(
        i, transition="launch", asg_name=asg_name(FLEET), hook_name=LAUNCH_HOOK_NAME
    ),
    "lifecycle_terminate": lambda i, _: events.lifecycle_action(
        i, transition="terminate", asg_name=asg_name(FLEET), hook_name=TERMINATE_HOOK_NAME
    ),
    "health_scheduled_change": lambda i, second: events.health_scheduled_change(
        [i, *([second] if second else [])], use_arns=True, include_resources=False
    ),
}


def sample_event(
    name: str, instance_id: str, *, second_instance_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """A fresh event of kind ``name`` about ``instance_id`` (new id, ``time`` now)."""
    event = SAMPLES[name](instance_id, second_instance_id)
    event.update(overrides)
    return event


def seed_record(
    instance_id: str,
    state: InstanceState = InstanceState.READY,
    *,
    fleet: str = FLEET,
    **fields: Any,
) -> FleetRecord:
    """Write (and return) a fleet record as the system would have it in ``state``: a ready or
    draining instance bootstrapped ten minutes ago with a fresh heartbeat, a launching one
    launched now with the default bootstrap deadline. ``fields`` override any of it."""
    now = time.time()
    defaults: dict[str, Any] = {"launched_at": now - 600}
    if state is InstanceState.LAUNCHING:
        defaults = {"launched_at": now, "bootstrap_deadline_at": now + 1200}
    elif state in (InstanceState.READY, InstanceState.DRAINING):
        defaults |= {"bootstrap_status": BootstrapStatus.READY, "ready_at": now - 500, "heartbeat_at": now}
    elif state is InstanceState.ENDED:
        defaults |= {"end_reason": EndReason.TERMINATED, "ended_at": now - 60}
    record = FleetRecord(instance_id=instance_id, fleet=fleet, state=state, **(defaults | fields))
    FleetStore().put(record)
    return record


def busy_instance(cp: control_plane_env.ControlPlaneEnv, leases: int) -> str:
    """One instance launched in the fleet ASG, ready (``seed_record``), holding ``leases`` leased messages."""
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    cp.lease_messages(instance, leases)
    return instance


def fleet_record(instance_id: str) -> FleetRecord | None:
    return FleetStore().get(instance_id)


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
