"""Watchdog (scheduled every minute): deadlines that passed → signals → the same actions.

Terminates managed instances that missed the bootstrap deadline or whose agent stopped
heartbeating (requeueing their work), sends the drain order to instances replaced early once
their replacement is in service, ends drained or out-of-time drains (never taking a live
agent's tasks), releases orphaned leases, and emits ``WatchdogHeartbeat`` and ``FleetSize``
every run (the "watchdog silent" alarm watches the heartbeat) and ``UnreadableTableItems``
for items it had to skip.
"""

from __future__ import annotations

from typing import Any

from spotguard_core.control_plane import ControlPlane
from spotguard_core.watchdog_sweep import WatchdogSweep

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("watchdog")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    logger.set_correlation_id(getattr(context, "aws_request_id", None))
    control_plane = ControlPlane.from_env(metrics, logger=logger)
    report = WatchdogSweep(control_plane, logger=logger).run()
    logger.info("watchdog sweep done", extra={"report": report.to_json()})
    return report.to_json()
