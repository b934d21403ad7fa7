"""ASG fleets: reconcile what the Auto Scaling group cannot do on its own.

On AWS an ASG fleet's reclaimed spot instances are *terminated* and the ASG launches their
replacements itself; what it cannot do is find capacity in pools that have none. When every
pool of the group is out of spot capacity, the group stays below its desired capacity and
retries the same pools. Each scheduled job therefore:

1. measures the shortfall: desired capacity minus healthy ``InService`` instances, and
   publishes it as the ``CapacityShortfall`` metric and in the job record (``capacity``);
2. calls it *stuck* when the previous job saw a shortfall too (one interval later: not a
   launch still in progress);
3. when stuck and ``SPOTGUARD_FALLBACK_INSTANCE_TYPES`` names instance types the group does not
   use yet, adds them to the group's mixed instances policy (``UpdateAutoScalingGroup``), so
   the ASG's own allocation strategy can take capacity there. Nothing else is changed: no
   on-demand switch, no desired-capacity change, no instance launched outside the group.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from spotguard_core.migration.models import CapacityReport

logger = logging.getLogger("spotguard.migration")


class CapacityReconciler:
    def __init__(
        self, *, asg_name: str, autoscaling: Any, fallback_instance_types: list[str] | None = None
    ) -> None:
        self.asg_name = asg_name
        self.autoscaling = autoscaling
        self.fallback_instance_types = [t for t in (fallback_instance_types or []) if t]

    def reconcile(self, *, previous_shortfall: int = 0, dry_run: bool = False) -> CapacityReport | None:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg_name])
        if not groups.get("AutoScalingGroups"):
            return None
        group = groups["AutoScalingGroups"][0]
        desired = int(group.get("DesiredCapacity", 0))
        in_service = sum(
            1
            for instance in group.get("Instances", [])
            if instance.get("LifecycleState") == "InService" and instance.get("HealthStatus") == "Healthy"
        )
        shortfall = max(0, desired - in_service)
        report = CapacityReport(
            asg_name=self.asg_name,
            desired=desired,
            in_service=in_service,
            shortfall=shortfall,
            stuck=shortfall > 0 and previous_shortfall > 0,
        )
        if not shortfall:
            report.action = "none: at desired capacity"
        elif not report.stuck:
            report.action = "reported: below desired capacity (checked again by the next job)"
        else:
            report.action, report.added_instance_types = self._widen(group, dry_run=dry_run)
        return report

    def _widen(self, group: dict[str, Any], *, dry_run: bool) -> tuple[str, list[str]]:
        policy = group.get("MixedInstancesPolicy")
        if not policy:
            return "reported: stuck below desired; the group has no mixed instances policy to widen", []
        overrides = policy.get("LaunchTemplate", {}).get("Overrides", [])
        present = {o.get("InstanceType") for o in overrides}
        missing = [t for t in self.fallback_instance_types if t not in present]
        if not missing:
            return "reported: stuck below desired; no fallback instance type left to add", []
        if dry_run:
            return "dry run: would add fallback instance types", missing
        widened = copy.deepcopy(policy)
        widened.setdefault("LaunchTemplate", {})["Overrides"] = [
            *overrides,
            *({"InstanceType": t} for t in missing),
        ]
        spec = widened["LaunchTemplate"].get("LaunchTemplateSpecification", {})
        if spec.get("LaunchTemplateId"):
            spec.pop("LaunchTemplateName", None)  # described with both; an update takes one
        update = {"LaunchTemplate": widened["LaunchTemplate"]}
        if "InstancesDistribution" in widened:
            update["InstancesDistribution"] = widened["InstancesDistribution"]
        self.autoscaling.update_auto_scaling_group(
            AutoScalingGroupName=self.asg_name, MixedInstancesPolicy=update
        )
        logger.warning("Capacity stuck below desired: added instance types %s to %s", missing, self.asg_name)
        return "widened: added fallback instance types to the group's pools", missing
