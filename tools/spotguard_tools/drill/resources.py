"""Create the fleet's AWS resources in the emulator, from the same contracts the stack uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spotguard_core import contracts, runtime_env
from spotguard_core.contracts import Env

from spotguard_tools.local_tables import TableKind, create_table

#: A placeholder AMI that moto knows.
DRILL_AMI = "ami-12c6146b"
DRILL_INSTANCE_TYPE = "m5.large"
DRILL_ZONES = ("us-east-1a", "us-east-1b")
#: EventBridge's reserved input-template variable for the complete event.
WHOLE_EVENT_TEMPLATE = "<aws.events.event.json>"


@dataclass(frozen=True, slots=True)
class DrillResources:
    fleet: str
    work_queue_url: str
    work_dlq_url: str
    signal_queue_url: str
    signal_queue_arn: str
    lease_table: str
    fleet_table: str
    jobs_table: str
    idempotency_table: str
    notification_bus: str
    asg_name: str
    launch_template_id: str
    rule_names: tuple[str, ...]
    #: Where agents keep task checkpoints (``contracts.checkpoint_key``); None: not created.
    checkpoint_bucket: str | None = None


def work_queue_name(fleet: str) -> str:
    return f"spotguard-{fleet}-work"


def lease_table_name(fleet: str) -> str:
    return f"spotguard-{fleet}-leases"


def _queue(sqs: Any, name: str, attributes: dict[str, str]) -> tuple[str, str]:
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return str(url), str(arn)


def create_resources(
    *,
    fleet: str,
    desired_capacity: int,
    max_capacity: int,
    visibility_timeout_seconds: int,
    sqs: Any,
    dynamodb: Any,
    ec2: Any,
    autoscaling: Any,
    events: Any,
    s3: Any = None,
) -> DrillResources:
    """Queues, tables, launch template, ASG and EventBridge rules of one fleet (and, given
    an S3 client, its checkpoint bucket)."""
    prefix = f"spotguard-{fleet}"
    work_dlq_url, work_dlq_arn = _queue(sqs, f"{prefix}-work-dlq", {"MessageRetentionPeriod": "1209600"})
    work_queue_url, _ = _queue(
        sqs,
        work_queue_name(fleet),
        {
            "VisibilityTimeout": str(visibility_timeout_seconds),
            "RedrivePolicy": json.dumps(
                {
                    "deadLetterTargetArn": work_dlq_arn,
                    "maxReceiveCount": str(contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT),
                }
            ),
        },
    )
    _, signal_dlq_arn = _queue(sqs, f"{prefix}-signals-dlq", {})
    # A short visibility timeout: a batch item the dispatcher reports as failed is retried
    # within seconds of drill time.
    signal_queue_url, signal_queue_arn = _queue(
        sqs,
        f"{prefix}-signals",
        {
            "VisibilityTimeout": "5",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": signal_dlq_arn, "maxReceiveCount": "5"}),
        },
    )

    lease_table = lease_table_name(fleet)
    fleet_table = f"{prefix}-fleet"
    jobs_table = f"{prefix}-jobs"
    idempotency_table = f"{prefix}-idempotency"
    create_table(dynamodb, TableKind.LEASES, lease_table)
    create_table(dynamodb, TableKind.FLEET, fleet_table)
    create_table(dynamodb, TableKind.JOBS, jobs_table)
    create_table(dynamodb, TableKind.IDEMPOTENCY, idempotency_table)

    group = contracts.asg_name(fleet)
    fleet_tag = {"Key": contracts.FLEET_TAG_KEY, "Value": fleet}
    template = ec2.create_launch_template(
        LaunchTemplateName=f"{prefix}-lt",
        LaunchTemplateData={
            "ImageId": DRILL_AMI,
            "InstanceType": DRILL_INSTANCE_TYPE,
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [fleet_tag]}],
        },
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [fleet_tag]}],
    )["LaunchTemplate"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=group,
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplateId"], "Version": "$Latest"},
        MinSize=0,
        MaxSize=max_capacity,
        DesiredCapacity=desired_capacity,
        AvailabilityZones=list(DRILL_ZONES),
        Tags=[
            {
                **fleet_tag,
                "PropagateAtLaunch": True,
                "ResourceId": group,
                "ResourceType": "auto-scaling-group",
            }
        ],
    )

    notification_bus = f"{prefix}-bus"
    events.create_event_bus(Name=notification_bus)

    rule_names = []
    patterns = contracts.event_patterns(allow_test_events=False, asg_name=group)
    for name, pattern in patterns.items():
        rule = f"{prefix}-{name}"
        events.put_rule(Name=rule, EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(
            Rule=rule,
            Targets=[
                {
                    "Id": "signal-queue",
                    "Arn": signal_queue_arn,
                    # moto's default target input drops the event's "account"; AWS delivers
                    # the whole event. This template is the whole event, as AWS sends it.
                    "InputTransformer": {"InputPathsMap": {}, "InputTemplate": WHOLE_EVENT_TEMPLATE},
                }
            ],
        )
        rule_names.append(rule)

    checkpoint_bucket = None
    if s3 is not None:
        checkpoint_bucket = f"{prefix}-checkpoints"
        s3.create_bucket(Bucket=checkpoint_bucket)

    return DrillResources(
        fleet=fleet,
        work_queue_url=work_queue_url,
        work_dlq_url=work_dlq_url,
        signal_queue_url=signal_queue_url,
        signal_queue_arn=signal_queue_arn,
        lease_table=lease_table,
        fleet_table=fleet_table,
        jobs_table=jobs_table,
        idempotency_table=idempotency_table,
        notification_bus=notification_bus,
        asg_name=group,
        launch_template_id=str(template["LaunchTemplateId"]),
        rule_names=tuple(rule_names),
        checkpoint_bucket=checkpoint_bucket,
    )


def control_plane_environment(
    resources: DrillResources,
    *,
    requeue_enabled: bool,
    rebalance_policy: str,
    heartbeat_stale_seconds: int,
    bootstrap_deadline_seconds: int,
    account_id: str,
    region: str,
) -> dict[str, str]:
    """The Lambda functions' environment, built where the stack builds it (``runtime_env``)."""
    fleet = runtime_env.FleetResources(
        fleet=resources.fleet,
        region=region,
        account_id=account_id,
        work_queue_url=resources.work_queue_url,
        work_dlq_url=resources.work_dlq_url,
        signal_queue_url=resources.signal_queue_url,
        lease_table=resources.lease_table,
        fleet_table=resources.fleet_table,
        jobs_table=resources.jobs_table,
        idempotency_table=resources.idempotency_table,
        asg_name=resources.asg_name,
        notification_bus=resources.notification_bus,
    )
    options = runtime_env.ControlOptions(
        rebalance_policy=contracts.RebalancePolicy(rebalance_policy),
        heartbeat_stale_seconds=heartbeat_stale_seconds,
        bootstrap_deadline_seconds=bootstrap_deadline_seconds,
        requeue_enabled=requeue_enabled,
    )
    return {
        **runtime_env.control_plane_env(fleet, options),
        Env.LAUNCH_TEMPLATE_ID.value: resources.launch_template_id,
    }
