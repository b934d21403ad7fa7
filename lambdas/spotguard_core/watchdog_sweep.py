"""The watchdog's sweep: turn deadlines that passed into signals, and release orphaned leases.

Runs every minute. Each finding becomes a ``Signal`` (source ``watchdog``) and goes through
the same ``ControlPlane.process`` path as EventBridge signals:

- ``BOOTSTRAP_DEADLINE``: not ended and no verified bootstrap past ``bootstrap_deadline_at``
  (or ``launched_at`` + the configured time), whatever its state: a lifecycle answer (anyone
  in the ASG may send one) never stands in for the instance's own bootstrap report;
- ``HEARTBEAT_STALE``: ready/draining and the agent silent: the agent is gone, the only case
  in which the watchdog takes a live record's tasks (requeue, terminate);
- ``REPLACEMENT_IN_SERVICE``: an instance replaced early whose replacement is in service (a
  ready record launched after the replacement was requested, not yet claimed by another),
  or that waited ``replacement_wait_seconds``, or whose drain deadline is near: the drain
  order (and ``instance.replaced`` once);
- ``DRAINED`` / ``DRAIN_DEADLINE``: a draining instance whose agent is alive and has
  finished its drain (``drained_at``), or is past its deadline: ended (terminated, only if
  it carries this fleet's tag) — never its tasks taken while the agent runs.

Only instances with a fleet record are considered, and the executor re-checks the fleet tag
before it terminates anything. One unreadable item (unknown state, a non-number, a missing
key) is skipped and counted (``UnreadableTableItems``); it never stops the sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from spotguard_core import dynamo
from spotguard_core.contracts import (
    FLEET_TABLE_PK,
    LEASE_TABLE_SK,
    BootstrapStatus,
    FleetRecord,
    InstanceState,
    Lease,
    Metric,
    Signal,
    SignalKind,
    SignalSource,
)
from spotguard_core.control_plane import (
    TRANSIENT_ERRORS,
    UNREADABLE_ITEM_ERRORS,
    ControlPlane,
)
from spotguard_core.control_settings import ControlSettings
from spotguard_core.decisions import counts_as_interruption
from spotguard_core.lease_store import lease_filter

#: How much earlier than the recorded request a replacement's launch may be dated. The ASG
#: launches it during the ``DetachInstances`` call, before the request time is written, and
#: the launch is dated by its lifecycle event, whose ``time`` has whole seconds only: read
#: strictly, the very replacement a request caused looks launched before it and is never
#: matched (the detached instance then waits ``replacement_wait_seconds``, or takes a later
#: instance's replacement and leaves that one running outside the ASG).
REPLACEMENT_LAUNCH_SLACK_SECONDS = 10.0


@dataclass(slots=True)
class SweepReport:
    fleet_size: int = 0
    signals: list[dict[str, Any]] = field(default_factory=list)
    orphan_leases_released: int = 0
    unreadable_items: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _alive(record: FleetRecord, now: float, heartbeat_stale_seconds: int) -> bool | None:
    last_alive = record.heartbeat_at or record.ready_at
    if last_alive is None:
        return None
    return now - last_alive <= heartbeat_stale_seconds


def in_service_replacements(
    records: Mapping[str, FleetRecord], *, now: float, heartbeat_stale_seconds: int, ended_within: float
) -> dict[str, str]:
    """Detached instance id → the id of its replacement, for those whose replacement is in
    service: a ready record (bootstrap verified, heartbeat fresh) launched after the
    replacement was requested (less ``REPLACEMENT_LAUNCH_SLACK_SECONDS``), that no other
    instance already counts as its replacement. Oldest requests are matched first, each
    replacement once. Instances that ended in the last ``ended_within`` seconds are matched
    too (a spot-warned one is usually gone first)."""
    claimed = {r.replaced_by for r in records.values() if r.replaced_by}
    candidates = sorted(
        (
            r
            for r in records.values()
            if r.state is InstanceState.READY
            and r.bootstrap_status is BootstrapStatus.READY
            and r.replacement_requested_at is None
            and r.instance_id not in claimed
            and _alive(r, now, heartbeat_stale_seconds)
        ),
        key=lambda r: r.launched_at or r.ready_at or 0.0,
    )
    waiting = sorted(
        (
            r
            for r in records.values()
            if r.replacement_requested_at is not None
            and r.replaced_by is None
            and (r.state is not InstanceState.ENDED or (r.ended_at or 0.0) >= now - ended_within)
        ),
        key=lambda r: r.replacement_requested_at or 0.0,
    )
    matched: dict[str, str] = {}
    for old in waiting:
        requested = (old.replacement_requested_at or 0.0) - REPLACEMENT_LAUNCH_SLACK_SECONDS
        for candidate in candidates:
            started = candidate.launched_at or candidate.ready_at or 0.0
            if candidate.instance_id not in matched.values() and started >= requested:
                matched[old.instance_id] = candidate.instance_id
                break
    return matched


def bootstrap_deadline(record: FleetRecord, settings: ControlSettings) -> float | None:
    """The record's bootstrap deadline; when the launch event that sets it never came (lost,
    or the record began with an agent's write), its launch time plus the configured time."""
    if record.bootstrap_deadline_at is not None:
        return record.bootstrap_deadline_at
    if record.launched_at is not None:
        return record.launched_at + settings.bootstrap_deadline_seconds
    return None


def findings(
    record: FleetRecord, *, now: float, settings: ControlSettings, replacement: str | None = None
) -> list[SignalKind]:
    """Which watchdog signal kinds an (active) record calls for at ``now``."""
    if record.state is not InstanceState.ENDED and record.bootstrap_status is not BootstrapStatus.READY:
        # Whatever answered its launch hook (AWS lets any instance of the ASG CONTINUE
        # another's), an instance is in service only once its own record shows a verified
        # bootstrap: past the deadline without one it is a failed bootstrap, launching or not.
        deadline = bootstrap_deadline(record, settings)
        if deadline is not None and now > deadline:
            return [SignalKind.BOOTSTRAP_DEADLINE]
    if record.state is InstanceState.LAUNCHING:
        return []
    if record.state not in (InstanceState.READY, InstanceState.DRAINING):
        return []
    if _alive(record, now, settings.heartbeat_stale_seconds) is False:
        return [SignalKind.HEARTBEAT_STALE]  # gone: its tasks are requeued
    kinds: list[SignalKind] = []
    if record.replacement_requested_at is not None:
        waited = now - record.replacement_requested_at >= settings.replacement_wait_seconds
        deadline_near = (
            record.drain_deadline_at is not None
            and record.state is InstanceState.READY
            and now >= record.drain_deadline_at - settings.retire_drain_seconds
        )
        if (replacement and record.replaced_by is None) or (
            record.state is InstanceState.READY and (waited or deadline_near)
        ):
            kinds.append(SignalKind.REPLACEMENT_IN_SERVICE)
    if record.state is InstanceState.DRAINING:
        if record.drained_at is not None:
            kinds.append(SignalKind.DRAINED)
        elif record.drain_deadline_at is not None and now > record.drain_deadline_at:
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
        records = self._records(report)
        active = {i: r for i, r in records.items() if r.state is not InstanceState.ENDED}
        report.fleet_size = len(active)
        metrics.add_metric(Metric.FLEET_SIZE, "Count", len(active))
        replacements = in_service_replacements(
            records,
            now=now,
            heartbeat_stale_seconds=settings.heartbeat_stale_seconds,
            ended_within=settings.replacement_wait_seconds,
        )
        for instance_id in sorted(replacements.keys() - active.keys()):
            # Ended before its replacement came into service: announce the replacement only.
            self._process(records[instance_id], SignalKind.REPLACEMENT_IN_SERVICE, replacements, now, report)

        for record in active.values():
            replacement = replacements.get(record.instance_id)
            for kind in findings(record, now=now, settings=settings, replacement=replacement):
                if not self._process(record, kind, replacements, now, report):
                    break

        if settings.requeue_enabled:  # the drill's baseline mode leaves leases to the visibility timeout
            report.orphan_leases_released = self._sweep_orphans(records, now, started, report)
        if report.orphan_leases_released:
            metrics.add_metric(Metric.ORPHAN_LEASES_SWEPT, "Count", report.orphan_leases_released)
        return report

    def _process(
        self,
        record: FleetRecord,
        kind: SignalKind,
        replacements: Mapping[str, str],
        now: float,
        report: SweepReport,
    ) -> bool:
        """One finding through the control plane; False when no further finding of this
        record applies this minute (it failed, or the record just ended)."""
        settings = self.control_plane.settings
        started = datetime.fromtimestamp(now, tz=UTC)
        replacement = replacements.get(record.instance_id)
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
            attributes={"replacement": replacement} if replacement else {},
        )
        try:
            outcome = self.control_plane.process(signal, record)
        except TRANSIENT_ERRORS as error:
            # One instance's trouble must not stop the sweep; next minute retries.
            report.errors.append(f"{record.instance_id} {kind.value}: {error}")
            self.logger.warning("watchdog %s for %s failed: %s", kind.value, record.instance_id, error)
            return False
        report.signals.append(outcome.to_json())
        self.logger.info("watchdog %s for %s", kind.value, record.instance_id)
        return not any(a.name == "TerminateInstance" for a in outcome.actions)

    def _records(self, report: SweepReport) -> dict[str, FleetRecord]:
        records: dict[str, FleetRecord] = {}
        for item in dynamo.items(self.control_plane.fleet_store.table.scan):
            try:
                record = FleetRecord.from_item(item)
            except UNREADABLE_ITEM_ERRORS as error:
                report.unreadable_items += 1
                self.control_plane.unreadable_item(f"fleet record {item.get(FLEET_TABLE_PK)!r}", error)
                continue
            records[record.instance_id] = record
        return records

    def _leases(self, report: SweepReport) -> Iterator[Lease]:
        table = self.control_plane.lease_store.table
        for item in dynamo.items(table.scan, FilterExpression=lease_filter()):
            try:
                yield Lease.from_item(item)
            except UNREADABLE_ITEM_ERRORS as error:
                report.unreadable_items += 1
                self.control_plane.unreadable_item(f"lease {item.get(LEASE_TABLE_SK)!r}", error)

    def _sweep_orphans(
        self, records: dict[str, FleetRecord], now: float, started: datetime, report: SweepReport
    ) -> int:
        """Release leases whose instance ended, or has no record and a stale lease heartbeat.
        Leases of live instances are left to their agent. A release counts as an interruption
        only if the instance ended for a reason other than its messages (poison rule)."""
        stale_before = now - self.control_plane.settings.heartbeat_stale_seconds
        orphans: dict[str, list[Lease]] = {}
        for lease in self._leases(report):
            record = records.get(lease.instance_id)
            ended = record is None or record.state is InstanceState.ENDED
            if ended and (record is not None or lease.heartbeat_at < stale_before):
                orphans.setdefault(lease.instance_id, []).append(lease)
        released = 0
        for instance_id, leases in orphans.items():
            try:
                result = self.control_plane.requeuer.requeue_leases(
                    instance_id,
                    leases,
                    event_time=started,
                    count_interruption=counts_as_interruption(records.get(instance_id)),
                )
            except RuntimeError as error:  # lease deletes left unprocessed, incomplete requeue
                report.errors.append(f"{instance_id} orphan leases: {error}")
                continue
            except TRANSIENT_ERRORS as error:
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
