"""AWS EC2 provider: the stopped-by-reclaim path, for instances *outside* an ASG.

What happens on AWS: a spot instance in an Auto Scaling group is *terminated* on a reclaim
(the ASG replaces it; spotguard's dispatcher asks for that replacement at the warning), so
ASG instances are never eligible here — for ASG fleets the scheduled job reconciles what
the ASG cannot instead (``migration.capacity``). Instances are *stopped* by a reclaim only
when they are persistent spot instances with the ``stop`` interruption behaviour, launched
outside an ASG: that is what this provider launches as replacements, so a fleet that opts
into this path keeps its stop behaviour from one replacement to the next.

Eligible: enrolled in this fleet (the fleet tag *and* a fleet record: a tag alone never
enrols an instance), not in an ASG, in state ``stopped``, stopped by a spot reclaim (EC2
state reason ``Server.SpotInstanceTermination`` or a record that ended with
``spot_reclaim``), not replaced already — neither by this job (``replaced_by``) nor early by
the dispatcher (``replacement_requested_at``: one event, one replacement).

Pools are the fleet's subnets (``SPOTGUARD_SUBNET_IDS``, else the ASG's) times the
instance types of the ASG's mixed instances policy (else the reclaimed instance's type).
Pool memory: pools with a spot interruption in the last ``RECLAIMED_POOL_AVOID_SECONDS``
(from the fleet records, so it survives between jobs, plus this listing) are tried last.

Migration: RunInstances from the fleet's launch template as a *Spot* instance (persistent,
``stop`` behaviour) into the best pool that has capacity, tagged as the fleet's and with
the id it replaces, with a fleet record that carries its bootstrap deadline (so the
watchdog covers it like any launch); then the stopped instance is terminated and its record
ends as ``migrated`` with ``replaced_by``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from botocore.exceptions import ClientError

from spotguard_core import aws, contracts
from spotguard_core.contracts import (
    DEFAULT_BOOTSTRAP_DEADLINE_MINUTES,
    RECLAIMED_POOL_AVOID_SECONDS,
    EndReason,
    Env,
    InstanceState,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import CandidateInstance, MigrationError, MigrationResult

logger = logging.getLogger("spotguard.migration")

SPOT_RECLAIM_STATE_REASON = "Server.SpotInstanceTermination"
#: AWS's own tag on every instance of an Auto Scaling group.
ASG_MEMBER_TAG_KEY = "aws:autoscaling:groupName"
#: Replacements keep the stopped-by-reclaim behaviour (stop needs a persistent request).
SPOT_MARKET_OPTIONS: dict[str, Any] = {
    "MarketType": "spot",
    "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
}
LISTED_STATES = ("pending", "running", "stopping", "stopped")
#: RunInstances errors that mean "no capacity in this pool": try the next pool.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",
    }
)
#: Errors no retry can fix.
PERMANENT_ERRORS = frozenset(
    {
        "UnauthorizedOperation",
        "AuthFailure",
        "InvalidLaunchTemplateId.NotFound",
        "InvalidLaunchTemplateId.Malformed",
        "InvalidParameterValue",
    }
)


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class AwsEc2Provider:
    name = "aws"

    def __init__(
        self,
        *,
        fleet: str,
        launch_template_id: str,
        fleet_store: FleetStore,
        asg_name: str | None = None,
        subnet_ids: list[str] | None = None,
        bootstrap_deadline_seconds: int = DEFAULT_BOOTSTRAP_DEADLINE_MINUTES * 60,
    ) -> None:
        self._fleet = fleet
        self._template = launch_template_id
        self._store = fleet_store
        self._asg = asg_name
        self._subnets = list(subnet_ids or [])
        self._bootstrap_deadline_seconds = bootstrap_deadline_seconds
        self._ec2 = aws.client("ec2")
        #: (instance type, zone) pools reclaimed recently: this listing and the fleet records.
        self._reclaimed_pools: set[tuple[str, str]] = set()

    @classmethod
    def from_environment(cls) -> AwsEc2Provider:
        fleet = os.environ.get(Env.FLEET_NAME)
        template = os.environ.get(Env.LAUNCH_TEMPLATE_ID)
        if not fleet or not template:
            raise RuntimeError(
                f"provider 'aws' needs {Env.FLEET_NAME.value} and {Env.LAUNCH_TEMPLATE_ID.value}"
            )
        subnets = [s.strip() for s in os.environ.get(Env.SUBNET_IDS, "").split(",") if s.strip()]
        deadline = os.environ.get(Env.BOOTSTRAP_DEADLINE_SECONDS, "").strip()
        return cls(
            fleet=fleet,
            launch_template_id=template,
            fleet_store=FleetStore(),
            asg_name=os.environ.get(Env.ASG_NAME) or None,
            subnet_ids=subnets,
            bootstrap_deadline_seconds=int(deadline) if deadline else DEFAULT_BOOTSTRAP_DEADLINE_MINUTES * 60,
        )

    # ------------------------------------------------------------------ listing
    def list_instances(self) -> list[CandidateInstance]:
        candidates: list[CandidateInstance] = []
        reclaimed: set[tuple[str, str]] = set()
        paginator = self._ec2.get_paginator("describe_instances")
        pages = paginator.paginate(
            Filters=[
                {"Name": f"tag:{contracts.FLEET_TAG_KEY}", "Values": [self._fleet]},
                {"Name": "instance-state-name", "Values": list(LISTED_STATES)},
            ]
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    candidate = self._candidate(instance)
                    candidates.append(candidate)
                    if candidate.eligible:
                        pool = (candidate.attributes["instance_type"], candidate.attributes["zone"])
                        reclaimed.add(pool)
                        self._remember_pool(candidate.instance_id, pool)
        self._reclaimed_pools = reclaimed | self.recently_reclaimed_pools()
        return candidates

    def recently_reclaimed_pools(self, *, now: float | None = None) -> set[tuple[str, str]]:
        """Pools with a spot interruption in the last ``RECLAIMED_POOL_AVOID_SECONDS``, from
        the fleet records (stored: it holds across jobs, not only within one listing)."""
        since = (now or contracts.now()) - RECLAIMED_POOL_AVOID_SECONDS
        pools: set[tuple[str, str]] = set()
        try:
            for record in self._store.scan():
                # Migrated instances were reclaimed too: their end is the migration, minutes later.
                reclaimed_at = record.interrupted_at or (
                    record.ended_at
                    if record.end_reason in (EndReason.SPOT_RECLAIM, EndReason.MIGRATED)
                    else None
                )
                if reclaimed_at is None or reclaimed_at < since:
                    continue
                if record.instance_type and record.availability_zone:
                    pools.add((record.instance_type, record.availability_zone))
        except (KeyError, ValueError, TypeError, ArithmeticError) as error:
            # An unreadable record ends the scan early: the memory is partial, never fatal.
            logger.warning("Pool memory incomplete: unreadable fleet record (%s)", error)
        return pools

    def _remember_pool(self, instance_id: str, pool: tuple[str, str]) -> None:
        # The record keeps the pool of a reclaimed instance, for the pool memory of later jobs.
        record = self._store.get(instance_id)
        if record is not None and (record.instance_type, record.availability_zone) != pool:
            self._store.update_fields(instance_id, {"instance_type": pool[0], "availability_zone": pool[1]})

    def _candidate(self, instance: dict[str, Any]) -> CandidateInstance:  # noqa: PLR0911 - one return per verdict
        instance_id = str(instance["InstanceId"])
        state = str(instance.get("State", {}).get("Name", ""))
        reason_code = str(instance.get("StateReason", {}).get("Code", ""))
        attributes = {
            "instance_type": str(instance.get("InstanceType", "")),
            "zone": str(instance.get("Placement", {}).get("AvailabilityZone", "")),
            "subnet_id": str(instance.get("SubnetId", "")),
            "spot_request_id": str(instance.get("SpotInstanceRequestId", "")),
        }
        tags = {t.get("Key"): t.get("Value") for t in instance.get("Tags", [])}
        name = tags.get("Name")
        if state != "stopped":
            return CandidateInstance(
                instance_id, state, False, f"state is {state}, not stopped", name, attributes
            )
        if tags.get(ASG_MEMBER_TAG_KEY):
            return CandidateInstance(
                instance_id,
                state,
                False,
                f"in ASG {tags[ASG_MEMBER_TAG_KEY]}: the ASG replaces it",
                name,
                attributes,
            )
        record = self._store.get(instance_id)
        if record is None or record.fleet != self._fleet:
            return CandidateInstance(
                instance_id,
                state,
                False,
                "no fleet record: a tag alone does not enrol an instance",
                name,
                attributes,
            )
        if record.replaced_by:
            return CandidateInstance(
                instance_id, state, False, f"already replaced by {record.replaced_by}", name, attributes
            )
        if record.replacement_requested_at is not None:
            return CandidateInstance(
                instance_id, state, False, "replaced early at its interruption warning", name, attributes
            )
        if reason_code == SPOT_RECLAIM_STATE_REASON:
            return CandidateInstance(
                instance_id, state, True, f"state reason {reason_code}", name, attributes
            )
        if record.end_reason is EndReason.SPOT_RECLAIM:
            return CandidateInstance(
                instance_id, state, True, "fleet record ended by spot reclaim", name, attributes
            )
        return CandidateInstance(
            instance_id,
            state,
            False,
            f"stopped, but not by a spot reclaim ({reason_code or 'no reason'})",
            name,
            attributes,
        )

    # ------------------------------------------------------------------ migration
    def migrate(self, instance: CandidateInstance, *, job_id: str, attempt: int) -> MigrationResult:
        pools = self.pools_for(instance)
        # The same token on every attempt of this job: a retried RunInstances returns the
        # instance it already launched instead of a second one.
        token = hashlib.sha256(f"{job_id}:{instance.instance_id}".encode()).hexdigest()[:64]
        new_id: str | None = None
        chosen = ("", "")
        tried: list[str] = []
        for instance_type, subnet_id, zone in pools:
            tried.append(f"{instance_type}/{zone}")
            try:
                new_id = self._launch(instance, instance_type, subnet_id, f"{token[:48]}-{len(tried)}")
            except ClientError as error:
                code = _error_code(error)
                if code in CAPACITY_ERRORS:
                    continue
                raise MigrationError(
                    f"RunInstances failed: {code}: {error}", retryable=code not in PERMANENT_ERRORS
                ) from None
            chosen = (instance_type, zone)
            break
        if new_id is None:
            raise MigrationError(f"no capacity in any pool ({', '.join(tried)})", retryable=True)
        try:
            request_id = instance.attributes.get("spot_request_id")
            if request_id:
                # A persistent request relaunches a terminated instance: cancel it first.
                self._ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
            self._ec2.terminate_instances(InstanceIds=[instance.instance_id])
        except ClientError as error:
            # The replacement runs; the stopped instance costs only its volumes. Record it and
            # let the next attempt/job retire it (the record below marks it replaced).
            terminate_error = f"{_error_code(error)}"
        else:
            terminate_error = ""
        now = contracts.now()
        self._store.advance(
            instance.instance_id,
            fleet=self._fleet,
            state=InstanceState.ENDED,
            fields={
                "end_reason": EndReason.MIGRATED.value,
                "replaced_by": new_id,
                "ended_at": now,
                "ec2_state": "terminated" if not terminate_error else "stopped",
            },
        )
        self._store.advance(
            new_id,
            fleet=self._fleet,
            state=InstanceState.LAUNCHING,
            fields={
                "launched_at": now,
                # The watchdog ends it like any launch that does not bootstrap in time.
                "bootstrap_deadline_at": now + self._bootstrap_deadline_seconds,
                "instance_type": chosen[0],
                "availability_zone": chosen[1],
                "ec2_state": "pending",
            },
        )
        details = {"instanceType": chosen[0], "availabilityZone": chosen[1], "replaces": instance.instance_id}
        if terminate_error:
            details["terminateError"] = terminate_error
        return MigrationResult(new_instance_id=new_id, status="pending", details=details)

    def _launch(self, instance: CandidateInstance, instance_type: str, subnet_id: str, token: str) -> str:
        tags = [
            {"Key": contracts.FLEET_TAG_KEY, "Value": self._fleet},
            {"Key": contracts.REPLACES_TAG_KEY, "Value": instance.instance_id},
        ]
        kwargs: dict[str, Any] = {
            "LaunchTemplate": {"LaunchTemplateId": self._template, "Version": "$Default"},
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": token,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            "InstanceMarketOptions": SPOT_MARKET_OPTIONS,
        }
        if instance_type:
            kwargs["InstanceType"] = instance_type
        if subnet_id:
            kwargs["SubnetId"] = subnet_id
        response = self._ec2.run_instances(**kwargs)
        return str(response["Instances"][0]["InstanceId"])

    def pools_for(self, instance: CandidateInstance) -> list[tuple[str, str, str]]:
        """(instance type, subnet, zone) pools, best first: other type *and* other zone, then
        one of them different, then the pool that was just reclaimed."""
        old_type = str(instance.attributes.get("instance_type", ""))
        old_zone = str(instance.attributes.get("zone", ""))
        old_subnet = str(instance.attributes.get("subnet_id", ""))
        types, asg_subnets = self._fleet_pools()
        types = types or [old_type]
        subnets = self._subnets or asg_subnets or ([old_subnet] if old_subnet else [])
        zones = self._subnet_zones(subnets)
        if not subnets:
            subnets, zones = [""], {"": old_zone}

        def risk(pool: tuple[str, str, str]) -> tuple[int, int]:
            instance_type, _, zone = pool
            same = int(instance_type == old_type) + int(zone == old_zone)
            return (int((instance_type, zone) in self._reclaimed_pools), same)

        pools = [(t, s, zones.get(s, "")) for t in types for s in subnets]
        return sorted(pools, key=risk)

    def _fleet_pools(self) -> tuple[list[str], list[str]]:
        """Instance types and subnets of the fleet's ASG (mixed instances policy), if known."""
        if not self._asg:
            return [], []
        try:
            groups = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[self._asg])
        except ClientError as error:
            # Without the group's pools the replacement uses the reclaimed instance's type.
            logger.warning(
                "Cannot read the fleet's ASG pools (%s); using the instance's own", _error_code(error)
            )
            return [], []
        if not groups.get("AutoScalingGroups"):
            return [], []
        group = groups["AutoScalingGroups"][0]
        overrides = group.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {}).get("Overrides", [])
        types = [str(o["InstanceType"]) for o in overrides if o.get("InstanceType")]
        subnets = [s for s in str(group.get("VPCZoneIdentifier", "")).split(",") if s]
        return types, subnets

    def _subnet_zones(self, subnets: list[str]) -> dict[str, str]:
        if not subnets:
            return {}
        response = self._ec2.describe_subnets(SubnetIds=subnets)
        return {str(s["SubnetId"]): str(s["AvailabilityZone"]) for s in response.get("Subnets", [])}
