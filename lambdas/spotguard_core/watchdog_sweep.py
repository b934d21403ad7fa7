"""The watchdog's sweep: turn deadlines that passed into signals, and release orphaned leases.

Runs every minute. Each finding becomes a ``Signal`` of kind ``BOOTSTRAP_DEADLINE``,
``HEARTBEAT_STALE`` or ``DRAIN_DEADLINE`` (source ``watchdog``) and goes through the same
``ControlPlane.process`` path as EventBridge signals. Only instances with a fleet record
are considered, and the executor re-checks the fleet tag before it terminates anything,
so an instance without the tag is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from spotguard_core.contracts import (
    BootstrapStatus,
    FleetRecord,
    InstanceState,
    Lease,
    Metric,
    Signal,
    SignalKind,
    SignalSource,
)
from spotguard_core.control_plane import ControlPlane
from spotguard_core.requeue import RequeueIncompleteError


@dataclass(slots=True)
class SweepReport:
    fleet_size: int = 0
    signals: list[dict[str, Any]] = field(default_factory=list)
    orphan_leases_released: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "fleet_size": self.fleet_size,
            "signals": self.signals,
            "orphan_leases_released": self.orphan_leases_released,
            "errors": self.errors,
        }


def findings(record: FleetRecord, *, now: float, heartbeat_stale_seconds: int) -> list[SignalKind]:
    """Which watchdog signal kinds an (active) record calls for at ``now``."""
    kinds: list[SignalKind] = []
    if record.state is InstanceState.LAUNCHING:
        if (
            record.bootstrap_status is not BootstrapStatus.READY
            and record.bootstrap_deadline_at is not None
            and now > record.bootstrap_deadline_at
        ):
            kinds.append(SignalKind.BOOTSTRAP_DEADLINE)
        return kinds
    if record.state in (InstanceState.READY, InstanceState.DRAINING):
        last_alive = record.heartbeat_at or record.ready_at
        if last_alive is not None and now - last_alive > heartbeat_stale_seconds:
            kinds.append(SignalKind.HEARTBEAT_STALE)
        elif (
            record.state is InstanceState.DRAINING
            and record.drain_deadline_at is not None
            and now > record.drain_deadline_at
        ):
            kinds.append(SignalKind.DRAIN_DEADLINE)
    return kinds


class WatchdogSweep:
    def __init__(
        self, control_plane: ControlPlane, *, clock: Callable[[], float] | None = None, logger: Any = None
    ) -> None:
        self.control_plane = control_plane
        self.clock = clock or control_plane.clock
        self.logger = logger or logging.getLogger(__name__)

    def run(self) -> SweepReport:
        now = self.clock()
        started = datetime.fromtimestamp(now, tz=UTC)
        settings = self.control_plane.settings
        metrics = self.control_plane.metrics
        report = SweepReport()
        metrics.add_metric(Metric.WATCHDOG_HEARTBEAT, "Count", 1)
        records = {r.instance_id: r for r in self.control_plane.fleet_store.scan()}
        active = {i: r for i, r in records.items() if r.state is not InstanceState.ENDED}
        report.fleet_size = len(active)
        metrics.add_metric(Metric.FLEET_SIZE, "Count", len(active))

        for record in active.values():
            for kind in findings(record, now=now, heartbeat_stale_seconds=settings.heartbeat_stale_seconds):
                signal = Signal(
                    instance_id=record.instance_id,
                    kind=kind,
                    source=SignalSource.WATCHDOG,
                    event_id=f"watchdog:{kind.value}:{record.instance_id}:{int(now) // 60}",
                    received_at=started,
                    event_time=started,
                    deadline=_deadline(record, kind),
                    account=settings.account_id,
                    region=settings.region,
                )
                try:
                    outcome = self.control_plane.process(signal, record)
                except (ClientError, BotoCoreError, RequeueIncompleteError) as error:
                    # One instance's trouble must not stop the sweep; next minute retries.
                    report.errors.append(f"{record.instance_id} {kind.value}: {error}")
                    self.logger.warning(
                        "watchdog %s for %s failed: %s", kind.value, record.instance_id, error
                    )
                    continue
                report.signals.append(outcome.to_json())
                self.logger.info("watchdog %s for %s", kind.value, record.instance_id)

        if settings.requeue_enabled:  # the drill's baseline mode leaves leases to the visibility timeout
            report.orphan_leases_released = self._sweep_orphans(records, now, started, report)
        if report.orphan_leases_released:
            metrics.add_metric(Metric.ORPHAN_LEASES_SWEPT, "Count", report.orphan_leases_released)
        return report

    def _sweep_orphans(
        self, records: dict[str, FleetRecord], now: float, started: datetime, report: SweepReport
    ) -> int:
        """Release leases whose instance ended, has no record, or whose record was just ended
        by this sweep. Leases of live instances are left to their agent."""
        stale_before = now - self.control_plane.settings.heartbeat_stale_seconds
        orphans: dict[str, list[Lease]] = {}
        for lease in self.control_plane.lease_store.scan_leases():
            record = records.get(lease.instance_id)
            ended = record is None or record.state is InstanceState.ENDED
            if ended and (record is not None or lease.heartbeat_at < stale_before):
                orphans.setdefault(lease.instance_id, []).append(lease)
        released = 0
        for instance_id, leases in orphans.items():
            try:
                result = self.control_plane.requeuer.requeue_leases(instance_id, leases, event_time=started)
            except (ClientError, BotoCoreError, RequeueIncompleteError) as error:
                report.errors.append(f"{instance_id} orphan leases: {error}")
                continue
            released += result.requeued + result.already_gone
        return released


def _deadline(record: FleetRecord, kind: SignalKind) -> datetime | None:
    value = {
        SignalKind.BOOTSTRAP_DEADLINE: record.bootstrap_deadline_at,
        SignalKind.DRAIN_DEADLINE: record.drain_deadline_at,
    }.get(kind)
    return datetime.fromtimestamp(value, tz=UTC) if value is not None else None
