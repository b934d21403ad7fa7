"""A control-plane environment on the moto server: the tables, queues, fleet ASG and env vars
the dispatcher and watchdog need, with key schemas mirroring the stack's (from contracts).

Used by the control-plane integration tests and the requeue benchmark.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
from spotguard_core import aws, runtime_env
from spotguard_core.contracts import (
    FLEET_TAG_KEY,
    Env,
    Lease,
    asg_name,
)
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.moto_server import MotoClients, restore_environ

FLEET = "render"
ACCOUNT_ID = "123456789012"
REGION = "us-east-1"


def create_tables(prefix: str) -> dict[Env, str]:
    ddb = boto3.client("dynamodb")
    names = {
        Env.FLEET_TABLE: f"{prefix}-fleet",
        Env.LEASE_TABLE: f"{prefix}-leases",
        Env.IDEMPOTENCY_TABLE: f"{prefix}-idempotency",
    }
    create_table(ddb, TableKind.FLEET, names[Env.FLEET_TABLE])
    create_table(ddb, TableKind.LEASES, names[Env.LEASE_TABLE])
    create_table(ddb, TableKind.IDEMPOTENCY, names[Env.IDEMPOTENCY_TABLE])
    return names


def lease_of(
    message: Mapping[str, Any],
    *,
    instance_id: str,
    queue_url: str,
    at: float,
    interruption_requeues: int | None = None,
) -> Lease:
    """The lease a worker on ``instance_id`` writes for a ``message`` it received at ``at``
    (``interruption_requeues``: the count it knows, 0 on a first receive; None: unknown)."""
    return Lease(
        instance_id=instance_id,
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        queue_url=queue_url,
        leased_at=at,
        heartbeat_at=at,
        interruption_requeues=interruption_requeues,
    )


@dataclass
class ControlPlaneEnv(MotoClients):
    """What a test gets: names, URLs and helpers to make instances and leases."""

    fleet: str
    work_queue_url: str
    signal_queue_url: str
    asg_name: str
    bus_name: str
    tables: dict[Env, str]
    env: dict[str, str] = field(default_factory=dict)

    def launch_in_asg(self, count: int = 1) -> list[str]:
        """Raise the fleet ASG's desired capacity; return the new instance ids (moto launches them)."""
        autoscaling = boto3.client("autoscaling")
        before = set(self.asg_instance_ids())
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg_name])
        desired = group["AutoScalingGroups"][0]["DesiredCapacity"] + count
        autoscaling.set_desired_capacity(AutoScalingGroupName=self.asg_name, DesiredCapacity=desired)
        return sorted(set(self.asg_instance_ids()) - before)

    def asg_instance_ids(self) -> list[str]:
        autoscaling = boto3.client("autoscaling")
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg_name])
        return [i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"]]

    def run_instance(self, *, tags: Mapping[str, str] | None = None) -> str:
        """A plain EC2 instance outside the ASG (tagged as given)."""
        kwargs: dict[str, Any] = {"ImageId": "ami-12c6146b", "MinCount": 1, "MaxCount": 1}
        if tags:
            kwargs["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ]
        return str(self.ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"])

    def instance_state(self, instance_id: str) -> str:
        reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return str(reservations[0]["Instances"][0]["State"]["Name"])

    def lease_messages(self, instance_id: str, count: int, *, visibility: int = 600) -> list[Lease]:
        """Send ``count`` messages, receive them as ``instance_id``'s worker would, write leases."""
        from spotguard_core.lease_store import LeaseStore  # noqa: PLC0415

        sqs = self.sqs
        for start in range(0, count, 10):
            entries = [
                {"Id": str(i), "MessageBody": f"task-{i}"} for i in range(start, min(count, start + 10))
            ]
            sqs.send_message_batch(QueueUrl=self.work_queue_url, Entries=entries)
        leases: list[Lease] = []
        while len(leases) < count:
            messages = sqs.receive_message(
                QueueUrl=self.work_queue_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=visibility,
                WaitTimeSeconds=0,
            ).get("Messages", [])
            if not messages:
                break
            now = time.time()
            leases.extend(
                lease_of(m, instance_id=instance_id, queue_url=self.work_queue_url, at=now) for m in messages
            )
        store = LeaseStore(self.tables[Env.LEASE_TABLE])
        with store.table.batch_writer() as writer:
            for lease in leases:
                writer.put_item(Item=lease.to_item(store.arn_prefix))
        return leases

    def bus_to_queue(self, queue_name: str, event_pattern: str) -> str:
        """A new queue that a rule on the notification bus fills with the events matching
        ``event_pattern`` (JSON), so a test can read what was published; its URL."""
        queue = self.sqs.create_queue(QueueName=queue_name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        events = boto3.client("events")
        events.put_rule(Name=queue_name, EventBusName=self.bus_name, EventPattern=event_pattern)
        events.put_targets(Rule=queue_name, EventBusName=self.bus_name, Targets=[{"Id": "q", "Arn": arn}])
        return queue

    def receive_all(self, *, max_rounds: int = 200) -> list[dict[str, Any]]:
        """Everything receivable from the work queue right now (as another consumer)."""
        received: list[dict[str, Any]] = []
        for _ in range(max_rounds):
            batch = self.sqs.receive_message(
                QueueUrl=self.work_queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600, WaitTimeSeconds=0
            ).get("Messages", [])
            if not batch:
                break
            received.extend(batch)
        return received


def build(
    *, fleet: str = FLEET, min_size: int = 0, extra_env: Mapping[str, str] | None = None
) -> ControlPlaneEnv:
    """Create everything on the current moto server and export the env vars (caller restores)."""
    prefix = f"sg-{uuid.uuid4().hex[:6]}"
    tables = create_tables(prefix)
    sqs = boto3.client("sqs")
    work = sqs.create_queue(QueueName=f"{prefix}-work", Attributes={"VisibilityTimeout": "600"})["QueueUrl"]
    signals = sqs.create_queue(QueueName=f"{prefix}-signals")["QueueUrl"]
    bus = boto3.client("events").create_event_bus(Name=f"{prefix}-bus")["EventBusArn"].split("/")[-1]
    ec2 = boto3.client("ec2")
    template = ec2.create_launch_template(
        LaunchTemplateName=f"{prefix}-lt",
        LaunchTemplateData={
            "ImageId": "ami-12c6146b",
            "InstanceType": "t3.micro",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": FLEET_TAG_KEY, "Value": fleet}]}
            ],
        },
    )["LaunchTemplate"]
    group = asg_name(fleet)
    boto3.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=group,
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplateId"], "Version": "$Latest"},
        MinSize=0,
        MaxSize=2000,
        DesiredCapacity=min_size,
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": FLEET_TAG_KEY, "Value": fleet, "PropagateAtLaunch": True}],
    )
    resources = runtime_env.FleetResources(
        fleet=fleet,
        region=REGION,
        account_id=ACCOUNT_ID,
        work_queue_url=work,
        work_dlq_url="",
        signal_queue_url=signals,
        lease_table=tables[Env.LEASE_TABLE],
        fleet_table=tables[Env.FLEET_TABLE],
        idempotency_table=tables[Env.IDEMPOTENCY_TABLE],
        asg_name=group,
        notification_bus=bus,
    )
    # As the stack builds it (runtime_env); a short heartbeat staleness keeps tests quick.
    options = runtime_env.ControlOptions(heartbeat_stale_seconds=180)
    env = {
        **runtime_env.control_plane_env(resources, options),
        "POWERTOOLS_SERVICE_NAME": "spotguard-test",
        **(extra_env or {}),
    }
    os.environ.update(env)
    aws.reset_clients()
    return ControlPlaneEnv(
        fleet=fleet,
        work_queue_url=work,
        signal_queue_url=signals,
        asg_name=group,
        bus_name=bus,
        tables=tables,
        env=env,
    )


def restore_environment(saved: Mapping[str, str | None]) -> None:
    restore_environ(saved)
    aws.reset_clients()


def environment_snapshot() -> dict[str, str | None]:
    keys = [e.value for e in Env] + ["POWERTOOLS_SERVICE_NAME"]
    return {key: os.environ.get(key) for key in keys}


def control_plane(**kwargs: Any) -> Iterator[ControlPlaneEnv]:
    """Generator for a pytest fixture: build, yield, restore the environment."""
    saved = environment_snapshot()
    try:
        yield build(**kwargs)
    finally:
        restore_environment(saved)
