"""What the agent tells the control plane (and hears back): fleet record, tags, lifecycle
answers, scale-in protection.

The fleet record goes through ``spotguard_core.fleet_store.FleetStore``, the same adapter
the control plane uses (monotonic state ranks, one place). The heartbeat returns the whole
record (``ReturnValues=ALL_NEW``), which is how the agent learns the control plane's drain
order without another call.

Every call here is best effort: a failed report is logged and the agent carries on (the
control plane's watchdog is the backstop).
"""

from __future__ import annotations

import logging
from typing import Any

from spotguard_core.aws import AWS_ERRORS, ClientFactory
from spotguard_core.contracts import (
    BOOTSTRAP_REASON_TAG_KEY,
    BOOTSTRAP_TAG_KEY,
    BootstrapStatus,
    FleetRecord,
    InstanceState,
    Signal,
    now,
)
from spotguard_core.fleet_store import FleetStore

LOG = logging.getLogger("spotguard.report")
#: EC2 tag values are limited to 256 characters.
MAX_TAG_VALUE = 256


def signal_summary(signal: Signal) -> dict[str, str]:
    """``FleetRecord.last_signal`` for a signal the agent saw itself."""
    return {
        "kind": signal.kind.value,
        "source": signal.source.value,
        "event_id": signal.event_id,
        "at": f"{now():.3f}",
        **({"state": signal.state} if signal.state else {}),
    }


class FleetReporter:
    def __init__(
        self,
        clients: ClientFactory,
        *,
        instance_id: str,
        fleet: str,
        fleet_table: str,
        arn_prefix: str | None = None,
    ) -> None:
        self.clients = clients
        self.instance_id = instance_id
        self.fleet = fleet
        # Its own record only: the key is this instance's ARN (the role allows nothing else).
        self.store = FleetStore(fleet_table, clients=clients, arn_prefix=arn_prefix) if fleet_table else None

    # ------------------------------------------------------------------ fleet record
    def _advance(self, state: InstanceState, fields: dict[str, Any]) -> bool:
        """Move the record to ``state`` (only forward) and set ``fields``; when the record is
        already further on, set the fields alone."""
        if self.store is None:
            return False
        try:
            if self.store.advance(self.instance_id, fleet=self.fleet, state=state, fields=fields):
                return True
            LOG.info("fleet record already past %s; updating without the state", state.value)
            return self.store.update_fields(self.instance_id, fields)
        except AWS_ERRORS as error:
            LOG.warning("fleet record update failed: %s", error)
            return False

    def _touch(self, fields: dict[str, Any]) -> FleetRecord | None:
        if self.store is None:
            return None
        try:
            return self.store.touch(self.instance_id, fleet=self.fleet, fields=fields)
        except AWS_ERRORS as error:
            LOG.warning("fleet record update failed: %s", error)
            return None

    def heartbeat(self) -> FleetRecord | None:
        """Refresh ``heartbeat_at``; the record as stored afterwards (None when it failed)."""
        return self._touch({"heartbeat_at": now()})

    def ready(self, *, instance_type: str | None = None, availability_zone: str | None = None) -> bool:
        at = now()
        fields: dict[str, Any] = {
            "bootstrap_status": BootstrapStatus.READY,
            "ready_at": at,
            "heartbeat_at": at,
        }
        if instance_type:
            fields["instance_type"] = instance_type
        if availability_zone:
            fields["availability_zone"] = availability_zone
        return self._advance(InstanceState.READY, fields)

    def failed(self, reason: str) -> bool:
        return (
            self._touch({"bootstrap_status": BootstrapStatus.FAILED, "bootstrap_reason": reason[:1000]})
            is not None
        )

    def draining(self, deadline_epoch: float | None, signal: Signal) -> bool:
        fields: dict[str, Any] = {"heartbeat_at": now(), "last_signal": signal_summary(signal)}
        if deadline_epoch is not None:
            fields["drain_deadline_at"] = deadline_epoch
        return self._advance(InstanceState.DRAINING, fields)

    def drained(self) -> bool:
        """The drain finished: nothing running, nothing leased (the watchdog may end it now)."""
        if self.store is None:
            return False
        try:
            return self.store.update_fields(self.instance_id, {"drained_at": now()})
        except AWS_ERRORS as error:
            LOG.warning("recording the end of the drain failed: %s", error)
            return False

    def notice(self, signal: Signal) -> bool:
        """Record a notice that does not drain (a scheduled reboot …) as the last signal."""
        return self._touch({"last_signal": signal_summary(signal)}) is not None

    # ------------------------------------------------------------------ tags
    def tag_bootstrap(self, status: BootstrapStatus, reason: str | None = None) -> bool:
        tags = [{"Key": BOOTSTRAP_TAG_KEY, "Value": status.value}]
        if reason:
            tags.append({"Key": BOOTSTRAP_REASON_TAG_KEY, "Value": reason[:MAX_TAG_VALUE]})
        try:
            self.clients.client("ec2").create_tags(Resources=[self.instance_id], Tags=tags)
            return True
        except AWS_ERRORS as error:
            LOG.warning("tagging %s failed: %s", self.instance_id, error)
            return False

    # ------------------------------------------------------------------ Auto Scaling
    def complete_lifecycle(self, asg_name: str, hook_name: str, result: str) -> bool:
        if not asg_name or not hook_name:
            LOG.info("no ASG/hook configured: lifecycle answer %s skipped", result)
            return False
        try:
            self.clients.client("autoscaling").complete_lifecycle_action(
                AutoScalingGroupName=asg_name,
                LifecycleHookName=hook_name,
                InstanceId=self.instance_id,
                LifecycleActionResult=result,
            )
            LOG.info("lifecycle hook %s answered %s", hook_name, result)
            return True
        except AWS_ERRORS as error:
            # Outside a lifecycle transition (or on moto) this fails; the hook's own
            # timeout and default result still apply, so log and go on.
            LOG.warning("CompleteLifecycleAction %s %s failed: %s", hook_name, result, error)
            return False

    def lifecycle_heartbeat(self, asg_name: str, hook_name: str) -> bool:
        if not asg_name or not hook_name:
            return False
        try:
            self.clients.client("autoscaling").record_lifecycle_action_heartbeat(
                AutoScalingGroupName=asg_name, LifecycleHookName=hook_name, InstanceId=self.instance_id
            )
            return True
        except AWS_ERRORS as error:
            LOG.warning("RecordLifecycleActionHeartbeat %s failed: %s", hook_name, error)
            return False

    def set_scale_in_protection(self, asg_name: str, protected: bool) -> bool:
        """``autoscaling:SetInstanceProtection`` on this instance (needs that permission on the
        fleet's ASG). False when it failed: protection is best effort, never a gate on work."""
        if not asg_name:
            return False
        try:
            self.clients.client("autoscaling").set_instance_protection(
                AutoScalingGroupName=asg_name, InstanceIds=[self.instance_id], ProtectedFromScaleIn=protected
            )
            LOG.info("scale-in protection %s", "set" if protected else "cleared")
            return True
        except AWS_ERRORS as error:
            LOG.warning("SetInstanceProtection(%s) failed: %s", protected, error)
            return False
