"""Migration job with the AWS EC2 provider against the moto server (EC2, DynamoDB, ASG).

moto cannot set an instance's StateReason, so reclaimed instances are marked the way the
dispatcher marks them: a fleet record that ended with ``spot_reclaim``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from spotguard_core import contracts
from spotguard_core.contracts import EndReason, Env, FleetRecord, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import (
    CandidateInstance,
    JobRecord,
    JobStatus,
    JobTrigger,
    MigrationJobSettings,
    OutcomeKind,
)
from spotguard_core.migration.providers.aws_ec2 import AwsEc2Provider
from spotguard_core.migration.runner import MigrationJobRunner
from spotguard_core.migration.store import JobStore
from spotguard_functions import reconciler

from tests.integration.ops_fixtures import FakeLambdaContext, create_tables

pytestmark = pytest.mark.integration
FLEET = "workers"


@pytest.fixture
def ec2_fleet(moto_server, monkeypatch):
    create_tables(monkeypatch)
    ec2 = boto3.client("ec2")
    image = "ami-0123456789abcdef0"  # moto does not check image ids (listing its AMIs takes seconds)
    template = ec2.create_launch_template(
        LaunchTemplateName="spotguard-workers",
        LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    monkeypatch.setenv(Env.FLEET_NAME.value, FLEET)
    monkeypatch.setenv(Env.LAUNCH_TEMPLATE_ID.value, template)
    return ec2, image, template


def launch(ec2, image, *, managed=True, instance_type="m5.large", subnet=None):
    kwargs = {"ImageId": image, "MinCount": 1, "MaxCount": 1, "InstanceType": instance_type}
    if managed:
        kwargs["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": contracts.FLEET_TAG_KEY, "Value": FLEET}]}
        ]
    if subnet:
        kwargs["SubnetId"] = subnet
    return ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"]


def stop(ec2, instance_id, *, end_reason, **fields):
    """Stop the instance and record it ended for ``end_reason``; ``fields`` add to the record."""
    ec2.stop_instances(InstanceIds=[instance_id])
    FleetStore().put(
        FleetRecord(
            instance_id=instance_id,
            fleet=FLEET,
            state=InstanceState.ENDED,
            end_reason=end_reason,
            ec2_state="stopped",
            ended_at=contracts.now(),
            **fields,
        )
    )


def state_of(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"
    ]


def tags_of(ec2, instance_id):
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def run_job(**kwargs):
    runner = MigrationJobRunner(
        AwsEc2Provider.from_environment(), JobStore(), MigrationJobSettings(), publish=lambda k, d: True
    )
    return runner.run(trigger=JobTrigger.SCHEDULED, **kwargs)


def test_reclaimed_instances_are_replaced_and_retired(ec2_fleet):
    ec2, image, _ = ec2_fleet
    reclaimed = [launch(ec2, image) for _ in range(2)]
    stopped_otherwise = launch(ec2, image)
    running = launch(ec2, image)
    unmanaged = launch(ec2, image, managed=False)
    for instance_id in reclaimed:
        stop(ec2, instance_id, end_reason=EndReason.SPOT_RECLAIM)
    stop(ec2, stopped_otherwise, end_reason=EndReason.STOPPED)
    ec2.stop_instances(InstanceIds=[unmanaged])

    job = run_job()

    assert job.status is JobStatus.COMPLETED
    assert job.summary.total_instances == 4  # managed only: the unmanaged one is never listed
    assert job.summary.eligible_instances == 2 and job.summary.migrated_instances == 2
    store = FleetStore()
    for outcome in job.outcomes:
        assert outcome.outcome is OutcomeKind.MIGRATED
        old, new = outcome.instance_id, outcome.new_instance_id
        assert old in reclaimed and new and new != old
        assert state_of(ec2, old) == "terminated"
        assert state_of(ec2, new) in ("pending", "running")
        tags = tags_of(ec2, new)
        assert tags[contracts.FLEET_TAG_KEY] == FLEET and tags[contracts.REPLACES_TAG_KEY] == old
        old_record = store.get(old)
        assert old_record.state is InstanceState.ENDED
        assert old_record.end_reason is EndReason.MIGRATED and old_record.replaced_by == new
        assert store.get(new).state is InstanceState.LAUNCHING
    assert state_of(ec2, stopped_otherwise) == "stopped"
    assert state_of(ec2, running) == "running"
    assert state_of(ec2, unmanaged) == "stopped"

    again = run_job()  # nothing left to do: retired instances are not listed, none eligible
    assert again.summary.eligible_instances == 0 and again.outcomes == []


def test_dry_run_changes_nothing(ec2_fleet):
    ec2, image, _ = ec2_fleet
    instance_id = launch(ec2, image)
    stop(ec2, instance_id, end_reason=EndReason.SPOT_RECLAIM)
    before = ec2.describe_instances()["Reservations"]
    job = run_job(dry_run=True)
    assert [o.outcome for o in job.outcomes] == [OutcomeKind.WOULD_MIGRATE]
    assert state_of(ec2, instance_id) == "stopped"
    assert len(ec2.describe_instances()["Reservations"]) == len(before)
    assert FleetStore().get(instance_id).replaced_by is None


def two_pool_asg(ec2: Any, template: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], str, str]:
    """The fleet's ASG over two zones and two instance types (m5.large, c5.large): four
    pools. Returns the default subnet by zone and the two zones."""
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets}
    zone_a, zone_b = sorted(by_zone)[:2]
    boto3.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=contracts.asg_name(FLEET),
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=0,
        VPCZoneIdentifier=f"{by_zone[zone_a]},{by_zone[zone_b]}",
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template, "Version": "$Default"},
                "Overrides": [{"InstanceType": "m5.large"}, {"InstanceType": "c5.large"}],
            },
        },
    )
    monkeypatch.setenv(Env.ASG_NAME.value, contracts.asg_name(FLEET))
    return by_zone, zone_a, zone_b


def test_replacement_prefers_another_pool(ec2_fleet, monkeypatch):
    """With the fleet's ASG offering two types in two zones, the reclaimed pool comes last."""
    ec2, image, template = ec2_fleet
    by_zone, zone_a, zone_b = two_pool_asg(ec2, template, monkeypatch)
    old = launch(ec2, image, instance_type="m5.large", subnet=by_zone[zone_a])
    stop(ec2, old, end_reason=EndReason.SPOT_RECLAIM)

    provider = AwsEc2Provider.from_environment()
    candidate = next(c for c in provider.list_instances() if c.instance_id == old)
    pools = provider.pools_for(candidate)
    assert pools[0][0] == "c5.large" and pools[0][2] == zone_b  # other type and other zone first
    assert pools[-1][0] == "m5.large" and pools[-1][2] == zone_a  # the reclaimed pool last

    job = run_job()
    new = job.outcomes[0].new_instance_id
    instance = ec2.describe_instances(InstanceIds=[new])["Reservations"][0]["Instances"][0]
    assert instance["InstanceType"] == "c5.large"
    assert instance["Placement"]["AvailabilityZone"] == zone_b


def test_fleet_subnets_from_the_environment_are_used(ec2_fleet, monkeypatch):
    ec2, image, _ = ec2_fleet
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets}
    zone_a, zone_b = sorted(by_zone)[:2]
    monkeypatch.setenv(Env.SUBNET_IDS.value, f"{by_zone[zone_a]},{by_zone[zone_b]}")
    monkeypatch.delenv(Env.ASG_NAME.value, raising=False)
    old = launch(ec2, image, subnet=by_zone[zone_a])
    stop(ec2, old, end_reason=EndReason.SPOT_RECLAIM)
    job = run_job()
    new = job.outcomes[0].new_instance_id
    instance = ec2.describe_instances(InstanceIds=[new])["Reservations"][0]["Instances"][0]
    assert instance["Placement"]["AvailabilityZone"] == zone_b  # the other zone first
    assert job.outcomes[0].details["availabilityZone"] == zone_b


def test_already_replaced_instances_are_not_eligible(ec2_fleet):
    ec2, image, _ = ec2_fleet
    instance_id = launch(ec2, image)
    stop(ec2, instance_id, end_reason=EndReason.SPOT_RECLAIM, replaced_by="i-0123456789abcdef0")
    candidates = AwsEc2Provider.from_environment().list_instances()
    assert [c.eligible for c in candidates] == [False]
    assert "already replaced" in candidates[0].reason


def test_state_reason_makes_an_enrolled_instance_eligible(ec2_fleet):
    """The StateReason path (real EC2), checked on the provider's verdict for a described instance.

    Stronger than before (issue 13): the instance must also be enrolled (a fleet record); its
    record says only ``stopped`` — the state reason is what makes it a spot reclaim."""
    FleetStore().put(
        FleetRecord(
            instance_id="i-0aaaaaaaaaaaaaaaa",
            fleet=FLEET,
            state=InstanceState.ENDED,
            end_reason=EndReason.STOPPED,
        )
    )
    provider = AwsEc2Provider.from_environment()
    described = {
        "InstanceId": "i-0aaaaaaaaaaaaaaaa",
        "State": {"Name": "stopped"},
        "StateReason": {
            "Code": "Server.SpotInstanceTermination",
            "Message": "Server.SpotInstanceTermination",
        },
        "InstanceType": "m5.large",
        "Placement": {"AvailabilityZone": "us-east-1a"},
    }
    verdict: CandidateInstance = provider._candidate(described)
    assert verdict.eligible and "Server.SpotInstanceTermination" in verdict.reason
    FleetStore().put(FleetRecord(instance_id="i-0aaaaaaaaaaaaaaaa", fleet="someone-else"))
    assert not provider._candidate(described).eligible


def test_stopped_by_reclaim_path_replaces_with_spot_and_records_a_bootstrap_deadline(ec2_fleet, monkeypatch):
    """The path for ``stop``-behaviour spot instances outside an ASG (issue 12)."""
    ec2, image, _ = ec2_fleet
    monkeypatch.setenv(Env.BOOTSTRAP_DEADLINE_SECONDS.value, "900")
    old = launch(ec2, image)
    stop(ec2, old, end_reason=EndReason.SPOT_RECLAIM)
    job = run_job()
    [outcome] = job.outcomes
    new = outcome.new_instance_id
    instance = ec2.describe_instances(InstanceIds=[new])["Reservations"][0]["Instances"][0]
    assert instance.get("InstanceLifecycle") == "spot"  # not on-demand
    record = FleetStore().get(new)
    assert record is not None and record.state is InstanceState.LAUNCHING
    assert record.bootstrap_deadline_at is not None and record.launched_at is not None
    assert record.bootstrap_deadline_at - record.launched_at == pytest.approx(900)


def test_tagged_but_unenrolled_asg_members_and_early_replacements_are_not_eligible(ec2_fleet):
    ec2, image, _ = ec2_fleet
    tagged_only = launch(ec2, image)
    ec2.stop_instances(InstanceIds=[tagged_only])  # a CreateTags alone: no fleet record
    in_asg = launch(ec2, image)
    ec2.create_tags(
        Resources=[in_asg], Tags=[{"Key": "aws:autoscaling:groupName", "Value": "spotguard-workers"}]
    )
    stop(ec2, in_asg, end_reason=EndReason.SPOT_RECLAIM)
    replaced_early = launch(ec2, image)
    stop(ec2, replaced_early, end_reason=EndReason.SPOT_RECLAIM)
    FleetStore().update_fields(replaced_early, {"replacement_requested_at": contracts.now() - 120})
    verdicts = {c.instance_id: c for c in AwsEc2Provider.from_environment().list_instances()}
    assert not any(c.eligible for c in verdicts.values())
    assert "no fleet record" in verdicts[tagged_only].reason
    assert "ASG" in verdicts[in_asg].reason
    assert "replaced early" in verdicts[replaced_early].reason  # one event, one replacement


def test_pool_memory_holds_across_jobs(ec2_fleet, monkeypatch):
    """After a reclaim, later replacements avoid that pool for a while (stored, not per listing)."""
    ec2, image, template = ec2_fleet
    by_zone, zone_a, zone_b = two_pool_asg(ec2, template, monkeypatch)
    first = launch(ec2, image, instance_type="m5.large", subnet=by_zone[zone_a])
    stop(ec2, first, end_reason=EndReason.SPOT_RECLAIM)
    [done] = run_job().outcomes
    assert done.details["instanceType"] == "c5.large" and done.details["availabilityZone"] == zone_b
    # A later job: another instance, in c5.large/zone_b, is reclaimed. Without memory its
    # best pool would be m5.large/zone_a (other type and zone) — reclaimed minutes ago.
    second = launch(ec2, image, instance_type="c5.large", subnet=by_zone[zone_b])
    stop(ec2, second, end_reason=EndReason.SPOT_RECLAIM)
    [later] = run_job().outcomes
    assert later.instance_id == second
    assert (later.details["instanceType"], later.details["availabilityZone"]) not in {
        ("m5.large", zone_a),
        ("c5.large", zone_b),
    }


def test_a_crashed_job_stuck_running_is_ended_as_failed_by_the_next(ec2_fleet):
    store = JobStore()
    crashed = JobRecord(
        job_id="migration-job-crashed",
        trigger=JobTrigger.SCHEDULED,
        provider="aws",
        dry_run=False,
        started_at=datetime.now(UTC) - timedelta(hours=2),
    )
    store.save(crashed)  # its reconciler died before recording the end
    run_job()
    [ended] = [j for j in store.latest(5) if j.job_id == crashed.job_id]
    assert ended.status is JobStatus.FAILED and ended.ended_at is not None
    assert any("abandoned" in error for error in ended.errors)
    assert store.statistics().failed_executions == 1


def test_asg_fleet_capacity_stuck_below_desired_is_reported_then_widened(ec2_fleet, monkeypatch):
    """The ASG path: what the ASG cannot do (no spot capacity in its pools) is reported and, if
    stuck for two jobs, its pools are widened by the configured fallback types."""
    _, _, template = ec2_fleet
    autoscaling = boto3.client("autoscaling")
    name = contracts.asg_name(FLEET)
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=4,
        DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template, "Version": "$Default"},
                "Overrides": [{"InstanceType": "m5.large"}],
            },
        },
    )
    monkeypatch.setenv(Env.ASG_NAME.value, name)
    monkeypatch.setenv(Env.FALLBACK_INSTANCE_TYPES.value, "c5.large, m6i.large")
    monkeypatch.setenv("MIGRATION_PROVIDER", "aws")
    first_instance = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"
    ][0]["Instances"][0]["InstanceId"]
    # moto always finds capacity; an instance the ASG holds unhealthy and cannot replace stands
    # in for a pool without spot capacity: healthy InService stays below desired.
    autoscaling.set_instance_health(InstanceId=first_instance, HealthStatus="Unhealthy")

    first = reconciler.run_job(None)
    assert first["capacity"]["shortfall"] == 1 and first["capacity"]["stuck"] is False
    assert first["capacity"]["addedInstanceTypes"] == []

    second = reconciler.run_job(None)
    assert second["capacity"]["stuck"] is True
    assert second["capacity"]["addedInstanceTypes"] == ["c5.large", "m6i.large"]
    overrides = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][
        0
    ]["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
    assert [o["InstanceType"] for o in overrides] == ["m5.large", "c5.large", "m6i.large"]
    assert JobStore().latest(1)[0].capacity.shortfall == 1  # type: ignore[union-attr]


def test_reconciler_handler_runs_a_scheduled_job(ec2_fleet, monkeypatch):
    ec2, image, _ = ec2_fleet
    instance_id = launch(ec2, image)
    stop(ec2, instance_id, end_reason=EndReason.SPOT_RECLAIM)
    monkeypatch.setenv("MIGRATION_PROVIDER", "aws")
    scheduled = {
        "version": "0",
        "id": "e1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-01-01T00:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {},
    }
    result = reconciler.handler(scheduled, FakeLambdaContext())
    assert result["status"] == "completed" and result["trigger"] == "scheduled"
    assert result["summary"]["migratedInstances"] == 1
    assert state_of(ec2, instance_id) == "terminated"

    monkeypatch.setenv("MIGRATION_ENABLED", "false")
    assert reconciler.handler(scheduled, FakeLambdaContext())["skipped"] is True
    manual = reconciler.handler(
        {"trigger": "manual", "jobId": "migration-job-manual1", "dryRun": True}, FakeLambdaContext()
    )
    assert manual["jobId"] == "migration-job-manual1" and manual["dryRun"] is True
