"""What to do about one signal: one pure decision function per ``SignalKind``.

``decide(signal, record, settings)`` looks only at the signal, the instance's current
fleet record and the settings, and returns typed actions; ``executor.Executor`` performs
them. Decisions go by *state*, not arrival order: an ended record stays ended, duplicate
and late events produce no new bookkeeping (the fleet store's conditional writes enforce
the same rule against races).

Requeueing at the *warning* is deliberately absent: the agent decides what it can still
finish and releases the rest itself; taking running tasks away at the warning would
duplicate work. Whatever is still leased is requeued at the state change, or by the
watchdog at the drain deadline if no state change arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from spotguard_core.contracts import (
    ENDING_EC2_STATES,
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
    """Make every message the instance still holds visible again, now."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class RecordLaunching(Action):
    launched_at: float = 0.0
    bootstrap_deadline_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RecordDraining(Action):
    """Fleet record → draining (``drain_deadline_at`` when the instance goes away, if known)."""

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
    """Detach from the fleet ASG without decrementing desired capacity (only if InService)."""

    asg_name: str = ""


@dataclass(frozen=True, slots=True)
class TerminateInstance(Action):
    reason: EndReason = EndReason.TERMINATED


@dataclass(frozen=True, slots=True)
class Notify(Action):
    notification: NotificationType = NotificationType.INSTANCE_INTERRUPTED
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.name,
            "instance_id": self.instance_id,
            "notification": self.notification.value,
            "detail": dict(self.detail),
        }


# --------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------
def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def _signal_time(signal: Signal) -> float:
    return (signal.event_time or signal.received_at).timestamp()


def _ended(record: FleetRecord | None) -> bool:
    return record is not None and record.state is InstanceState.ENDED


def _requeue(signal: Signal, settings: ControlSettings, reason: str) -> list[Action]:
    return [RequeueLeases(signal.instance_id, reason=reason)] if settings.requeue_enabled else []


def _replacement(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    if record is not None and record.replacement_requested_at is not None:
        return []  # already asked once (duplicate or second notice)
    return [RequestReplacement(signal.instance_id, asg_name=settings.asg_name)]


def _notice(signal: Signal, notification: NotificationType, **extra: Any) -> Notify:
    detail = {
        "instance_id": signal.instance_id,
        "kind": signal.kind.value,
        "event_id": signal.event_id,
        "deadline": signal.deadline.isoformat() if signal.deadline else None,
        **extra,
    }
    return Notify(signal.instance_id, notification=notification, detail=detail)


def decide_spot_interruption(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    warned_at = _signal_time(signal)
    if _ended(record):
        assert record is not None
        if record.end_reason in (EndReason.STOPPED, EndReason.TERMINATED):
            # Out of order: the stop/termination arrived first; it was a spot reclaim.
            return [CorrectEndReason(signal.instance_id, interrupted_at=warned_at)]
        return []
    if record is not None and record.interrupted_at is not None:
        return []  # duplicate warning: already draining with this deadline
    actions: list[Action] = [
        RecordDraining(
            signal.instance_id, drain_deadline_at=_epoch(signal.deadline), interrupted_at=warned_at
        )
    ]
    if settings.early_replacement:
        actions += _replacement(signal, record, settings)
    actions.append(_notice(signal, NotificationType.INSTANCE_INTERRUPTED, action=signal.state))
    return actions


def decide_state_change(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    state = (signal.state or "").lower()
    if state not in ENDING_EC2_STATES:
        return []  # pending/running: nothing to do (the rule only forwards ending states anyway)
    # Requeue first and always (even for an ended record): leases may still be there, and
    # an empty query is cheap. Requeue is idempotent.
    actions = _requeue(signal, settings, reason=f"instance {state}")
    if _ended(record):
        return actions
    if record is not None and record.interrupted_at is not None:
        reason = EndReason.SPOT_RECLAIM
    elif (
        record is not None and record.last_signal and record.last_signal.get("kind") == "lifecycle_terminate"
    ):
        reason = EndReason.SCALE_IN
    elif state in ("stopping", "stopped"):
        reason = EndReason.STOPPED
    else:
        reason = EndReason.TERMINATED
    actions.append(
        RecordEnded(signal.instance_id, end_reason=reason, ec2_state=state, ended_at=_signal_time(signal))
    )
    return actions


def _rebalance_like(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    if _ended(record) or settings.rebalance_policy is RebalancePolicy.IGNORE:
        return []
    actions: list[Action] = []
    if settings.rebalance_policy is RebalancePolicy.DRAIN and (
        record is None or record.state is not InstanceState.DRAINING
    ):
        actions.append(RecordDraining(signal.instance_id, drain_deadline_at=_epoch(signal.deadline)))
    actions += _replacement(signal, record, settings)
    return actions


def decide_rebalance(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    return _rebalance_like(signal, record, settings)


def decide_health_scheduled(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    return _rebalance_like(signal, record, settings)


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
    if record is None or _ended(record) or record.bootstrap_status is BootstrapStatus.READY:
        return []
    if record.state is not InstanceState.LAUNCHING:
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
        *_requeue(signal, settings, reason="bootstrap deadline"),
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
    if record is None or _ended(record):
        return []
    return [
        *_requeue(signal, settings, reason="heartbeat stale"),
        TerminateInstance(signal.instance_id, reason=EndReason.HEARTBEAT_STALE),
        RecordEnded(signal.instance_id, end_reason=EndReason.HEARTBEAT_STALE, ended_at=_signal_time(signal)),
    ]


def decide_drain_deadline(
    signal: Signal, record: FleetRecord | None, settings: ControlSettings
) -> list[Action]:
    # The instance should be gone by now and no state change was seen: release its work.
    return _requeue(signal, settings, reason="drain deadline passed")


Decider = Callable[[Signal, FleetRecord | None, ControlSettings], list[Action]]

DECIDERS: Mapping[SignalKind, Decider] = {
    SignalKind.SPOT_INTERRUPTION: decide_spot_interruption,
    SignalKind.STATE_CHANGE: decide_state_change,
    SignalKind.REBALANCE: decide_rebalance,
    SignalKind.HEALTH_SCHEDULED: decide_health_scheduled,
    SignalKind.LIFECYCLE_LAUNCH: decide_lifecycle_launch,
    SignalKind.LIFECYCLE_TERMINATE: decide_lifecycle_terminate,
    SignalKind.BOOTSTRAP_DEADLINE: decide_bootstrap_deadline,
    SignalKind.HEARTBEAT_STALE: decide_heartbeat_stale,
    SignalKind.DRAIN_DEADLINE: decide_drain_deadline,
}


def decide(signal: Signal, record: FleetRecord | None, settings: ControlSettings) -> list[Action]:
    """The actions for ``signal`` given the instance's current record (pure)."""
    return DECIDERS[signal.kind](signal, record, settings)
