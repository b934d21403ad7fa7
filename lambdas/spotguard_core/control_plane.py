"""The control plane's one path: signal → (record, managed?) → decide → execute.

The dispatcher (EventBridge signals) and the watchdog (deadline sweeps) both call
``ControlPlane.process``; ``spotguard explain`` calls only ``decide``. Every AWS call is
made through the adapters here (fleet store, lease store, requeuer, EC2, Auto Scaling,
notifications). Destructive EC2/ASG calls re-check the fleet tag first, so the code
refuses an instance that is not this fleet's before IAM has to (and a refused termination
stops the signal's remaining actions: nothing is recorded as ended that was not ended).

A fleet record that cannot be read (unknown state, not a number …) is counted
(``UnreadableTableItems``), logged, and treated as absent: the managed check then falls
back to the tag and the ASG, and requeueing a going-away instance still happens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from spotguard_core import aws, notifications
from spotguard_core.contracts import (
    FLEET_RECORD_RETENTION_SECONDS,
    FLEET_TAG_KEY,
    EndReason,
    FleetRecord,
    InstanceState,
    Metric,
    NotificationType,
    Signal,
    SignalKind,
    SignalSource,
)
from spotguard_core.control_settings import ControlSettings
from spotguard_core.decisions import (
    Action,
    CorrectEndReason,
    Notify,
    RecordDraining,
    RecordEnded,
    RecordLaunching,
    RecordReplacement,
    RequestReplacement,
    RequeueLeases,
    TerminateInstance,
    decide,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore
from spotguard_core.managed import ManagedCheck
from spotguard_core.ports import MetricsSink
from spotguard_core.requeue import RequeueIncompleteError, Requeuer

KIND_METRICS: Mapping[SignalKind, Metric] = {
    SignalKind.SPOT_INTERRUPTION: Metric.INTERRUPTION_WARNINGS,
    SignalKind.CAPACITY_RESERVATION_INTERRUPTION: Metric.INTERRUPTION_WARNINGS,
    SignalKind.REBALANCE: Metric.REBALANCE_RECOMMENDATIONS,
    SignalKind.HEALTH_SCHEDULED: Metric.HEALTH_SCHEDULED_CHANGES,
}

#: What an unparseable table item raises in ``FleetRecord.from_item`` / ``Lease.from_item``.
UNREADABLE_ITEM_ERRORS: tuple[type[Exception], ...] = (KeyError, ValueError, TypeError, ArithmeticError)
#: End reasons that are failed bootstraps (``BootstrapFailures`` counts every one of them).
BOOTSTRAP_FAILURE_REASONS = frozenset({EndReason.BOOTSTRAP_FAILED, EndReason.BOOTSTRAP_DEADLINE})

Publisher = Callable[[NotificationType, Mapping[str, Any]], bool]


class TransientActionError(RuntimeError):
    """An AWS write was left unfinished after its own retries (e.g. ``BatchWriteItem``
    unprocessed items): transient, the caller retries the signal."""


#: What a signal's actions may raise that a retry can fix: AWS errors, a requeue left
#: incomplete, a write left unfinished. The dispatcher reports these records back to SQS; the
#: watchdog's sweep logs them and goes on to the next instance.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    ClientError,
    BotoCoreError,
    RequeueIncompleteError,
    TransientActionError,
)


@dataclass(slots=True)
class Outcome:
    """What happened to one signal (logged by the handlers, printed by the drill)."""

    signal: Signal
    managed: bool
    actions: list[Action] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "signal": self.signal.to_json(),
            "managed": self.managed,
            "actions": [a.to_json() for a in self.actions],
            "results": self.results,
        }


class ControlPlane:
    def __init__(
        self,
        settings: ControlSettings,
        *,
        fleet_store: FleetStore,
        lease_store: LeaseStore,
        metrics: MetricsSink,
        ec2: Any,
        autoscaling: Any,
        sqs: Any,
        managed_check: ManagedCheck | None = None,
        publish: Publisher | None = None,
        logger: Any = None,
        clock: Callable[[], float] = time.time,
        requeue_executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.fleet_store = fleet_store
        self.lease_store = lease_store
        self.metrics = metrics
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.managed_check = managed_check or ManagedCheck(
            settings.fleet, ec2=ec2, autoscaling=autoscaling, asg_name=settings.asg_name
        )
        self.requeuer = Requeuer(
            lease_store=lease_store, sqs=sqs, metrics=metrics, clock=clock, executor=requeue_executor
        )
        self.publish: Publisher = publish or notifications.publish
        self.logger = logger or logging.getLogger(__name__)
        self.clock = clock

    @classmethod
    def from_env(
        cls,
        metrics: MetricsSink,
        *,
        logger: Any = None,
        managed_check: ManagedCheck | None = None,
        requeue_executor: Executor | None = None,
    ) -> ControlPlane:
        """From the environment. ``requeue_executor``: a pool shared by the requeues of every
        control plane of the process (the dispatcher's, one control plane per thread)."""
        settings = ControlSettings.from_env()
        ec2 = aws.client("ec2")
        return cls(
            settings,
            fleet_store=FleetStore(),
            lease_store=LeaseStore(),
            metrics=metrics,
            ec2=ec2,
            autoscaling=aws.client("autoscaling"),
            sqs=aws.client("sqs"),
            managed_check=managed_check,
            logger=logger,
            requeue_executor=requeue_executor,
        )

    # -- the path ------------------------------------------------------------------------
    def lookup(self, signal: Signal) -> tuple[FleetRecord | None, bool]:
        """The instance's fleet record and whether this fleet manages it."""
        try:
            record = self.fleet_store.get(signal.instance_id)
        except UNREADABLE_ITEM_ERRORS as error:
            self.unreadable_item(f"fleet record {signal.instance_id}", error)
            record = None
        return record, self.managed_check.is_managed(signal.instance_id, record)

    def unreadable_item(self, what: str, error: Exception) -> None:
        """Count and log one table item that cannot be parsed (it is skipped, never fatal)."""
        self.metrics.add_metric(Metric.UNREADABLE_TABLE_ITEMS, "Count", 1)
        self.logger.warning("unreadable table item skipped: %s: %s: %s", what, type(error).__name__, error)

    def process(self, signal: Signal, record: FleetRecord | None) -> Outcome:
        """Decide on a *managed* instance's signal and perform the actions."""
        if signal.kind in KIND_METRICS:
            self.metrics.add_metric(KIND_METRICS[signal.kind], "Count", 1)
        actions = decide(signal, record, self.settings)
        outcome = Outcome(signal=signal, managed=True, actions=actions)
        for action in actions:
            result = self.execute(signal, action)
            outcome.results.append(result)
            if result.get("refused"):
                # Never record an end (or anything after it) for an instance we refused to end.
                break
        return outcome

    # -- actions -------------------------------------------------------------------------
    def execute(self, signal: Signal, action: Action) -> dict[str, Any]:  # noqa: PLR0912 - one branch per action type
        """Perform one action. AWS errors propagate (transient: the caller retries the
        signal); notification failures do not (bookkeeping never blocks requeueing)."""
        result: dict[str, Any] = {"action": action.name}
        if isinstance(action, RequeueLeases):
            try:
                requeued = self.requeuer.requeue_instance(
                    action.instance_id,
                    event_time=signal.event_time or signal.received_at,
                    count_interruption=action.counts_as_interruption,
                )
            except RequeueIncompleteError:
                raise
            except RuntimeError as error:  # lease deletes left unprocessed after the store's retries
                raise TransientActionError(f"requeue of {action.instance_id}: {error}") from error
            result.update(requeued.to_json())
            result["counted_as_interruption"] = action.counts_as_interruption
        elif isinstance(action, RecordLaunching):
            result["applied"] = self.fleet_store.advance(
                action.instance_id,
                fleet=self.settings.fleet,
                state=InstanceState.LAUNCHING,
                fields={
                    "launched_at": action.launched_at,
                    "bootstrap_deadline_at": action.bootstrap_deadline_at,
                    "last_signal": self._last_signal(signal),
                },
            )
        elif isinstance(action, RecordDraining):
            fields: dict[str, Any] = {"last_signal": self._last_signal(signal)}
            if action.drain_deadline_at is not None:
                fields["drain_deadline_at"] = action.drain_deadline_at
            if action.interrupted_at is not None:
                fields["interrupted_at"] = action.interrupted_at
            if signal.attributes.get("availability_zone"):
                # The spot warning's ARN names the zone: pool memory for replacements.
                fields["availability_zone"] = signal.attributes["availability_zone"]
            result["applied"] = self.fleet_store.advance(
                action.instance_id, fleet=self.settings.fleet, state=InstanceState.DRAINING, fields=fields
            )
        elif isinstance(action, RecordEnded):
            fields = {
                "end_reason": action.end_reason,
                "ended_at": action.ended_at,
                "last_signal": self._last_signal(signal),
                "expires_at": int(action.ended_at + FLEET_RECORD_RETENTION_SECONDS),
            }
            if action.ec2_state:
                fields["ec2_state"] = action.ec2_state
            applied = self.fleet_store.advance(
                action.instance_id,
                fleet=self.settings.fleet,
                state=InstanceState.ENDED,
                fields=fields,
                allow_same_rank=False,
            )
            result["applied"] = applied
            if applied:
                self.metrics.add_metric(Metric.INSTANCES_ENDED, "Count", 1)
                if action.end_reason in BOOTSTRAP_FAILURE_REASONS:
                    self.metrics.add_metric(Metric.BOOTSTRAP_FAILURES, "Count", 1)
                if action.end_reason is EndReason.RETIRED:
                    self.metrics.add_metric(Metric.INSTANCES_RETIRED, "Count", 1)
        elif isinstance(action, CorrectEndReason):
            result["applied"] = self.fleet_store.update_fields(
                action.instance_id, {"end_reason": action.end_reason, "interrupted_at": action.interrupted_at}
            )
        elif isinstance(action, RequestReplacement):
            result.update(self._request_replacement(action))
        elif isinstance(action, RecordReplacement):
            result["applied"] = self.fleet_store.update_fields(
                action.instance_id, {"replaced_by": action.replaced_by}
            )
        elif isinstance(action, TerminateInstance):
            result.update(self._terminate(signal, action))
        elif isinstance(action, Notify):
            published = self._notify(action)
            result["published"] = published
            if published and action.sent_fact:
                self.fleet_store.update_fields(action.instance_id, {action.sent_fact: self.clock()})
        else:  # pragma: no cover - every Action subclass is handled above
            raise TypeError(f"unknown action {action!r}")
        return result

    @staticmethod
    def _last_signal(signal: Signal) -> dict[str, str]:
        return {
            "kind": signal.kind.value,
            "event_id": signal.event_id,
            "source": signal.source.value,
            "at": (signal.event_time or signal.received_at).isoformat(),
        }

    def _instance(self, instance_id: str) -> dict[str, Any] | None:
        try:
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id]).get("Reservations", [])
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return None
            raise
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    def _carries_fleet_tag(self, instance: Mapping[str, Any]) -> bool:
        return any(
            tag.get("Key") == FLEET_TAG_KEY and tag.get("Value") == self.settings.fleet
            for tag in instance.get("Tags", [])
        )

    def _request_replacement(self, action: RequestReplacement) -> dict[str, Any]:
        found = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[action.instance_id])
        groups = found.get("AutoScalingInstances", [])
        member = next((g for g in groups if g.get("AutoScalingGroupName") == action.asg_name), None)
        if member is None:
            return {"detached": False, "skipped": f"not in {action.asg_name}"}
        if member.get("LifecycleState") != "InService":
            return {"detached": False, "skipped": f"lifecycle state {member.get('LifecycleState')}"}
        # The time of the request, read before it: the ASG launches the replacement during the
        # call, and the watchdog recognises the replacement by a launch after this moment.
        requested_at = self.clock()
        self.autoscaling.detach_instances(
            AutoScalingGroupName=action.asg_name,
            InstanceIds=[action.instance_id],
            ShouldDecrementDesiredCapacity=False,
        )
        fields: dict[str, Any] = {"replacement_requested_at": requested_at}
        if action.drain_deadline_at is not None:
            fields["drain_deadline_at"] = action.drain_deadline_at
        self.fleet_store.update_fields(action.instance_id, fields)
        self.metrics.add_metric(Metric.REPLACEMENTS_REQUESTED, "Count", 1)
        return {"detached": True, "asg_name": action.asg_name}

    def _terminate(self, signal: Signal, action: TerminateInstance) -> dict[str, Any]:
        instance = self._instance(action.instance_id)
        if instance is None:
            return {"terminated": False, "skipped": "instance not found"}
        if not self._carries_fleet_tag(instance):
            self.logger.warning(
                "refusing to terminate %s: it does not carry %s=%s",
                action.instance_id,
                FLEET_TAG_KEY,
                self.settings.fleet,
            )
            return {"terminated": False, "refused": "no fleet tag"}
        state = instance.get("State", {}).get("Name")
        if state in ("shutting-down", "terminated"):
            return {"terminated": False, "skipped": f"already {state}"}
        self.ec2.terminate_instances(InstanceIds=[action.instance_id])
        if signal.source is SignalSource.WATCHDOG:
            self.metrics.add_metric(Metric.TERMINATED_BY_WATCHDOG, "Count", 1)
        return {"terminated": True, "reason": action.reason.value}

    def _notify(self, action: Notify) -> bool:
        try:
            return bool(self.publish(action.notification, action.detail))
        except (ClientError, BotoCoreError) as error:
            self.logger.warning("notification %s not published: %s", action.notification.value, error)
            return False
