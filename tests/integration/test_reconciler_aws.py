"""Migration job with the AWS EC2 provider against the moto server (EC2, DynamoDB, ASG).

moto cannot set an instance's StateReason, so reclaimed instances are marked the way the
dispatcher marks them: a fleet record that ended with ``spot_reclaim``.
"""

from __future__ import annotations

import boto3
import pytest
from spotguard_core import contracts
from spotguard_core.contracts import EndReason, Env, FleetRecord, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import (
    CandidateInstance,
    JobStatus,
    JobTrigger,
    MigrationSettings,
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


def stop(ec2, instance_id, *, end_reason):
    ec2.stop_instances(InstanceIds=[instance_id])
    FleetStore().put(
        FleetRecord(
            instance_id=instance_id,
            fleet=FLEET,
            state=InstanceState.ENDED,
            end_reason=end_reason,
            ec2_state="stopped",
            ended_at=contracts.now(),
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
        AwsEc2Provider.from_environment(), JobStore(), MigrationSettings(), publish=lambda k, d: True
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


def test_replacement_prefers_another_pool(ec2_fleet, monkeypatch):
    """With the fleet's ASG offering two types in two zones, the reclaimed pool comes last."""
    ec2, image, template = ec2_fleet
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
    ec2.stop_instances(InstanceIds=[instance_id])
    FleetStore().put(
        FleetRecord(
            instance_id=instance_id,
            fleet=FLEET,
            state=InstanceState.ENDED,
            end_reason=EndReason.SPOT_RECLAIM,
            replaced_by="i-0123456789abcdef0",
        )
    )
    candidates = AwsEc2Provider.from_environment().list_instances()
    assert [c.eligible for c in candidates] == [False]
    assert "already replaced" in candidates[0].reason


def test_state_reason_alone_makes_an_instance_eligible(ec2_fleet):
    """The StateReason path (real EC2), checked on the provider's verdict for a described instance."""
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
