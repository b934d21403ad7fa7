"""What to do about one signal: one pure decision function per ``SignalKind``.

``decide(signal, record, settings)`` looks only at the signal, the instance's current
fleet record and the settings, and returns typed actions; ``ControlPlane.execute``
(``spotguard_core.control_plane``) performs them. Decisions go by *state*, not arrival
order: an ended record stays ended, duplicate and late events produce no new bookkeeping
(the fleet store's conditional writes enforce the same rule against races). Each action
is deduplicated on its own fact in the record (draining/``interrupted_at``,
``replacement_requested_at``, ``interruption_notified_at``, ``replaced_by``), so a signal
retried after a partial failure redoes only what did not happen.

Requeueing at the *warning* is deliberately absent: the agent decides what it can still
finish and releases the rest itself; taking running tasks away at the warning would
duplicate work. Whatever is still leased is requeued at the state change, or by the
watchdog once the agent is gone (stale heartbeat) — never while the agent is alive.

A drain decided by the control plane (Health change, rebalance with ``drain``, an early
replacement whose replacement is in service) is a *drain order* on the fleet record:
``state = draining`` with ``drain_deadline_at``; the agent reads it on its next heartbeat.
An instance replaced early always ends: the watchdog terminates it once it is drained or
at its drain deadline (instances interrupted by AWS and scale-ins are left to AWS and the
ASG, which end them themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from spotguard_core.contracts import (
    ENDING_EC2_STATES,
    INTERRUPTION_END_REASONS,
    BootstrapStatus,
    EndReason,
    FleetRecord,
    InstanceState,
    NotificationType,
    RebalancePolicy,
    Signal,
    SignalKind,
)
from spotguard_core.control_settings import ControlSettings


# --------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Action:
    instance_id: str

    @property
    def name(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, Any]:
        data = {
            key: (value.value if isinstance(value, Enum) else value) for key, value in asdict(self).items()
        }
        return {"action": self.name, **data}


@dataclass(frozen=True, slots=True)
class RequeueLeases(Action):
    """Make every message the instance still holds visible again, now.

    ``counts_as_interruption``: the poison rule (docs/control-plane.md) — True only when the
    instance went away for a reason other than running those messages."""

    reason: str = ""
    counts_as_interruption: bool = False


@dataclass(frozen=True, slots=True)
class RecordLaunching(Action):
    launched_at: float = 0.0
    bootstrap_deadline_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RecordDraining(Action):
    """The drain order: fleet record → draining (``drain_deadline_at``: when the instance goes
    away or must have finished, if known). The agent reads it on its next heartbeat."""

    drain_deadline_at: float | None = None
    interrupted_at: float | None = None


@dataclass(frozen=True, slots=True)
class RecordEnded(Action):
    end_reason: EndReason = EndReason.TERMINATED
    ec2_state: str | None = None
    ended_at: float = 0.0


@dataclass(frozen=True, slots=True)
class CorrectEndReason(Action):
    """A spot warning that arrives after the state change: the end was a spot reclaim."""

    end_reason: EndReason = EndReason.SPOT_RECLAIM
    interrupted_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RequestReplacement(Action):
    """Detach from the fleet ASG without decrementing desired capacity (only if InService).

    ``drain_deadline_at``: the latest time the detached instance must drain by (a Health
    change's start), recorded with ``replacement_requested_at`` while it keeps working."""

    asg_name: str = ""
    drain_deadline_at: float | None = None


@dataclass(frozen=True, slots=True)
class RecordReplacement(Action):
    """The instance's replacement is in service: record it (``replaced_by``)."""

    replaced_by: str = ""


@dataclass(frozen=True, slots=True)
class TerminateInstance(Action):
    reason: EndReason = EndReason.TERMINATED


@dataclass(frozen=True, slots=True)
class Notify(Action):
    notification: NotificationType = NotificationType.INSTANCE_INTERRUPTED
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: Fleet-record field set to the publish time once published (the "notice sent" fact).
    sent_fact: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.name,
            "instance_id": self.instance_id,
            "notification": self.notification.value,
            "detail": dict(self.detail),
            "sent_fact": self.sent_fact,
        }


# --------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------
#: Which end an AWS interruption warning leads to.
_RECLAIM_REASONS: Mapping[SignalKind, EndReason] = {
    SignalKind.SPOT_INTERRUPTION: EndReason.SPOT_RECLAIM,
    SignalKind.CAPACITY_RESERVATION_INTERRUPTION: EndReason.CAPACITY_RESERVATION_RECLAIM,
}
#: IMDS scheduled-maintenance codes after which the instance is gone (the others reboot it).
MAINTENANCE_ENDING_CODES = frozenset({"instance-stop", "instance-retirement"})


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def _signal_time(signal: Signal) -> float:
    return (signal.event_time or signal.received_at).timestamp()


def _ended(record: FleetRecord | None) -> bool:
    return record is not None and record.state is InstanceState.ENDED


def _scale_in(record: FleetRecord | None) -> bool:
    return bool(record and record.last_signal and record.last_signal.get("kind") == "lifecycle_terminate")


def _reclaim_reason(record: FleetRecord | None) -> EndReason | None:
    """The AWS interruption this instance was warned of, if any."""
    if record is None or record.interrupted_at is None:
        return None
    kind = (record.last_signal or {}).get("kind")
    if kind == SignalKind.CAPACITY_RESERVATION_INTERRUPTION.value:
        return EndReason.CAPACITY_RESERVATION_RECLAIM
    return EndReason.SPOT_RECLAIM


def counts_as_interruption(record: FleetRecord | None) -> bool:
    """Poison rule: requeueing this instance's leases counts as an interruption (not a failure)
    only when the instance went away for a reason other than running those messages — a
    notice came first: spot or capacity-reservation warning, rebalance/Health drain order,
    scale-in, early replacement. A stale heartbeat, a failed or late bootstrap or a state
    change with no notice may have been caused by the message itself: not counted."""
    if record is None:
        return False
    if record.interrupted_at is not None or record.end_reason in INTERRUPTION_END_REASONS:
        return True
    return record.state is InstanceState.DRAINING


def _requeue(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings, reason: str
) -> list[Action]:
    if not settings.requeue_enabled:
        return []
    return [
        RequeueLeases(
            signal.instance_id, reason=reason, counts_as_interruption=counts_as_interruption(record)
        )
    ]


def _replacement(
    signal: Signal,
    record: FleetRecord | None,
    settings: ControlSettings,
    *,
    drain_deadline_at: float | None = None,
) -> list[Action]:
    if record is not None and record.replacement_requested_at is not None:
        return []  # already asked once (duplicate, retry, or a second notice): one replacement per instance
    return [
        RequestReplacement(
            signal.instance_id, asg_name=settings.asg_name, drain_deadline_at=drain_deadline_at
        )
    ]


def _notice(
    signal: Signal, notification: NotificationType, *, sent_fact: str | None = None, **extra: Any
) -> Notify:
    """A notification; payload fields in the seed's camelCase (as ``instance.migrated``)."""
    detail = {
        "event": notification.value,
        "instanceId": signal.instance_id,
        "kind": signal.kind.value,
        "eventId": signal.event_id,
        "deadline": signal.deadline.isoformat() if signal.deadline else None,
        "timestamp": (signal.event_time or signal.received_at).isoformat(),
        **extra,
    }
    return Notify(signal.instance_id, notification=notification, detail=detail, sent_fact=sent_fact)


def decide_interruption_warning(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    """Spot or capacity-reservation warning: drain order, one early replacement, one notice."""
    warned_at = _signal_time(signal)
    if _ended(record):
        assert record is not None
        if record.end_reason in (EndReason.STOPPED, EndReason.TERMINATED):
            # Out of order: the stop/termination arrived first; it was this reclaim.
            return [
                CorrectEndReason(
                    signal.instance_id, end_reason=_RECLAIM_REASONS[signal.kind], interrupted_at=warned_at
                )
            ]
        return []
    actions: list[Action] = []
    if record is None or record.interrupted_at is None:
        actions.append(
            RecordDraining(
                signal.instance_id, drain_deadline_at=_epoch(signal.deadline), interrupted_at=warned_at
            )
        )
    if settings.early_replacement:
        actions += _replacement(signal, record, settings)
    if record is None or record.interruption_notified_at is None:
        actions.append(
            _notice(
                signal,
                NotificationType.INSTANCE_INTERRUPTED,
                sent_fact="interruption_notified_at",
                action=signal.state,
            )
        )
    return actions


def decide_state_change(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    state = (signal.state or "").lower()
    if state not in ENDING_EC2_STATES:
        return []  # pending/running: nothing to do (the rule only forwards ending states anyway)
    # Requeue first and always (even for an ended record): leases may still be there, and
    # an empty query is cheap. Requeue is idempotent.
    actions = _requeue(signal, record, settings, reason=f"instance {state}")
    if _ended(record):
        return actions
    failed_bootstrap = record is not None and record.bootstrap_status is BootstrapStatus.FAILED
    reason = _reclaim_reason(record)
    if reason is None:
        if _scale_in(record):
            reason = EndReason.SCALE_IN
        elif failed_bootstrap:
            reason = EndReason.BOOTSTRAP_FAILED  # it recorded why and shut itself down
        elif (
            record is not None and record.state is InstanceState.DRAINING and record.replacement_requested_at
        ):
            reason = EndReason.RETIRED
        elif state in ("stopping", "stopped"):
            reason = EndReason.STOPPED
        else:
            reason = EndReason.TERMINATED
    actions.append(
        RecordEnded(signal.instance_id, end_reason=reason, ec2_state=state, ended_at=_signal_time(signal))
    )
    if reason is EndReason.BOOTSTRAP_FAILED:
        assert record is not None
        actions.append(
            _notice(
                signal,
                NotificationType.BOOTSTRAP_FAILED,
                reason=record.bootstrap_reason or "bootstrap failed; the instance shut itself down",
            )
        )
    return actions


def _drain_order(signal: Signal, record: FleetRecord | None, deadline: float) -> list[Action]:
    """The drain order by ``deadline``, unless the record has one at least as tight. An
    instance AWS reclaims or the ASG scales in keeps its own end (and the record of why)."""
    if record is not None:
        if record.interrupted_at is not None or _scale_in(record):
            return []
        if record.drain_deadline_at is not None:
            if record.state is InstanceState.DRAINING and record.drain_deadline_at <= deadline:
                return []
            deadline = min(deadline, record.drain_deadline_at)
    return [RecordDraining(signal.instance_id, drain_deadline_at=deadline)]


def _drain_policy(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    """Rebalance, Health scheduled change, IMDS stop/retirement: per ``rebalance_policy``.

    ``replace``: detach now (replacement requested), keep working; the watchdog sends the
    drain order once the replacement is in service (or by the event's deadline). An instance
    already replaced early (an earlier rebalance or notice) gets the drain order at once
    when this event has a deadline (a Health change's start): nothing else would end it then.
    ``drain``: drain order now (deadline: the event's, else ``retire_drain_seconds``; an
    earlier order is tightened, never loosened) and detach."""
    if _ended(record) or settings.rebalance_policy is RebalancePolicy.IGNORE:
        return []
    deadline = _epoch(signal.deadline)
    if settings.rebalance_policy is RebalancePolicy.DRAIN:
        if deadline is None:
            deadline = _signal_time(signal) + settings.retire_drain_seconds
        return _drain_order(signal, record, deadline) + _replacement(signal, record, settings)
    if record is not None and record.replacement_requested_at is not None:
        return [] if deadline is None else _drain_order(signal, record, deadline)
    return _replacement(signal, record, settings, drain_deadline_at=deadline)


def decide_rebalance(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    return _drain_policy(signal, record, settings)


def decide_health_scheduled(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    return _drain_policy(signal, record, settings)


def decide_maintenance_scheduled(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    """IMDS scheduled maintenance, by code: a stop/retirement ends the instance (like a Health
    change); a reboot or system maintenance does not (nothing to replace)."""
    code = (signal.attributes.get("code") or signal.state or "").lower()
    if code not in MAINTENANCE_ENDING_CODES:
        return []
    return _drain_policy(signal, record, settings)


def decide_lifecycle_launch(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    if record is not None and record.state is not InstanceState.LAUNCHING:
        return []  # already ready/draining/ended: a late launch event changes nothing
    launched_at = _signal_time(signal)
    if record is not None and record.launched_at is not None:
        launched_at = min(launched_at, record.launched_at)
    return [
        RecordLaunching(
            signal.instance_id,
            launched_at=launched_at,
            bootstrap_deadline_at=launched_at + settings.bootstrap_deadline_seconds,
        )
    ]


def decide_lifecycle_terminate(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    if _ended(record) or (record is not None and record.state is InstanceState.DRAINING):
        return []
    # The agent answers the hook after draining; leases left over are requeued at the
    # state change (or by the watchdog).
    return [RecordDraining(signal.instance_id)]


def decide_bootstrap_deadline(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    # Any state short of ended: an instance CONTINUEd into service (or given a drain order)
    # without its own bootstrap report is still a failed bootstrap.
    if record is None or _ended(record) or record.bootstrap_status is BootstrapStatus.READY:
        return []
    # An instance that reported a failed bootstrap should have shut itself down; if it is
    # still here at the deadline, the recorded reason stays what it reported.
    reason = (
        EndReason.BOOTSTRAP_FAILED
        if record.bootstrap_status is BootstrapStatus.FAILED
        else EndReason.BOOTSTRAP_DEADLINE
    )
    return [
        TerminateInstance(signal.instance_id, reason=reason),
        *_requeue(signal, record, settings, reason="bootstrap deadline"),
        RecordEnded(signal.instance_id, end_reason=reason, ended_at=_signal_time(signal)),
        _notice(
            signal,
            NotificationType.BOOTSTRAP_FAILED,
            reason=record.bootstrap_reason or "bootstrap not ready by its deadline",
        ),
    ]


def decide_heartbeat_stale(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    """The agent is gone: the only case where the watchdog takes a live record's tasks."""
    if record is None or _ended(record):
        return []
    reason = _reclaim_reason(record) or EndReason.HEARTBEAT_STALE
    return [
        *_requeue(signal, record, settings, reason="heartbeat stale"),
        TerminateInstance(signal.instance_id, reason=reason),
        RecordEnded(signal.instance_id, end_reason=reason, ended_at=_signal_time(signal)),
    ]


def _retire(signal: Signal, record: FleetRecord | None) -> list[Action]:
    """End a drained (or out-of-time) instance whose drain spotguard ordered. Its agent is
    alive, so nothing is requeued here: the agent releases what it holds when the instance
    shuts down, the state change requeues the rest, the orphan sweep is the backstop."""
    if record is None or record.state is not InstanceState.DRAINING:
        return []
    if record.interrupted_at is not None or _scale_in(record):
        return []  # AWS reclaims it / the ASG terminates it after the hook: not ours to end
    return [
        TerminateInstance(signal.instance_id, reason=EndReason.RETIRED),
        RecordEnded(signal.instance_id, end_reason=EndReason.RETIRED, ended_at=_signal_time(signal)),
    ]


def decide_drain_deadline(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    return _retire(signal, record)


def decide_drained(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    return _retire(signal, record)


def decide_replacement_in_service(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    """An instance replaced early: its replacement is in service (``attributes["replacement"]``),
    or it waited long enough. Record and announce the replacement once, and send the drain
    order (or tighten it) so it ends within ``retire_drain_seconds``. A spot-warned instance
    is usually gone before its replacement has bootstrapped: it is still announced."""
    if record is None:
        return []
    actions: list[Action] = []
    replacement = signal.attributes.get("replacement")
    if replacement and record.replaced_by is None:
        actions.append(RecordReplacement(signal.instance_id, replaced_by=replacement))
        actions.append(_notice(signal, NotificationType.INSTANCE_REPLACED, replacementInstanceId=replacement))
    if _ended(record) or record.interrupted_at is not None:
        return actions  # gone already / AWS ends it at its warning's deadline
    deadline = _signal_time(signal) + settings.retire_drain_seconds
    if record.drain_deadline_at is not None:
        deadline = min(deadline, record.drain_deadline_at)
    if record.state is not InstanceState.DRAINING or (
        record.drain_deadline_at is None or deadline < record.drain_deadline_at
    ):
        actions.append(RecordDraining(signal.instance_id, drain_deadline_at=deadline))
    return actions


Decider = Callable[[Signal, FleetRecord | None, ControlSettings], list[Action]]

DECIDERS: Mapping[SignalKind, Decider] = {
    SignalKind.SPOT_INTERRUPTION: decide_interruption_warning,
    SignalKind.CAPACITY_RESERVATION_INTERRUPTION: decide_interruption_warning,
    SignalKind.STATE_CHANGE: decide_state_change,
    SignalKind.REBALANCE: decide_rebalance,
    SignalKind.HEALTH_SCHEDULED: decide_health_scheduled,
    SignalKind.MAINTENANCE_SCHEDULED: decide_maintenance_scheduled,
    SignalKind.LIFECYCLE_LAUNCH: decide_lifecycle_launch,
    SignalKind.LIFECYCLE_TERMINATE: decide_lifecycle_terminate,
    SignalKind.BOOTSTRAP_DEADLINE: decide_bootstrap_deadline,
    SignalKind.HEARTBEAT_STALE: decide_heartbeat_stale,
    SignalKind.DRAIN_DEADLINE: decide_drain_deadline,
    SignalKind.DRAINED: decide_drained,
    SignalKind.REPLACEMENT_IN_SERVICE: decide_replacement_in_service,
}


def decide(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    """The actions for ``signal`` given the instance's current record (pure)."""
    return DECIDERS[signal.kind](signal, record, settings)
