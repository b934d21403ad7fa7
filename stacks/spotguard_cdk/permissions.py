"""Least-privilege permissions: the worker instances' role and the control-plane roles
(one role per function; each feature construct applies its own functions' grants).

``Resource: *`` statements (X-Ray, describe calls) are acknowledged once per role in
``functions.ControlPlaneFunction`` (one finding id per role, one reason).

Destructive EC2/ASG actions carry the fleet tag condition
(``aws:ResourceTag/spotguard:fleet = <fleet>``): even a bug that picks a foreign instance
id cannot terminate or detach it. No statement grants ``*`` or ``service:*`` actions;
``Resource: *`` appears only for describe calls that have no resource-level permissions.
"""

from __future__ import annotations

from aws_cdk import Aws, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct, IConstruct
from spotguard_core import contracts

from spotguard_cdk.nag import acknowledge, iam5_resource

#: The calling instance's ARN (present for instance-profile credentials).
OWN_INSTANCE_ARN = "${ec2:SourceInstanceARN}"
#: Every attribute a requeue counter request may name: the table's keys, the count, its TTL.
REQUEUE_COUNTER_ATTRIBUTES = (
    contracts.LEASE_TABLE_PK,
    contracts.LEASE_TABLE_SK,
    contracts.REQUEUE_COUNTER_ATTRIBUTE,
    contracts.TTL_ATTRIBUTE,
)


def instance_arn_pattern(scope: IConstruct) -> str:
    """``arn:…:ec2:<region>:<account>:instance/*`` of the stack's environment."""
    return Stack.of(scope).format_arn(service="ec2", resource="instance", resource_name="*")


def asg_arn(scope: IConstruct, name: str) -> str:
    """ARN of an Auto Scaling group by name (its id part is a generated uuid)."""
    return (
        f"arn:{Aws.PARTITION}:autoscaling:{Aws.REGION}:{Aws.ACCOUNT_ID}:autoScalingGroup:*:"
        f"autoScalingGroupName/{name}"
    )


def fleet_tag_condition(fleet: str) -> dict[str, dict[str, str]]:
    """IAM condition: only resources carrying this fleet's tag."""
    return {"StringEquals": {f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}": fleet}}


def grant_decrypt_if_encrypted(queue: sqs.IQueue, role: iam.IRole) -> None:
    """A user's queue with a customer managed key needs kms:Decrypt/GenerateDataKey for its
    consumers and senders (SQS-managed SSE needs nothing)."""
    if queue.encryption_master_key is not None:
        queue.encryption_master_key.grant_encrypt_decrypt(role)


class InstanceRole(Construct):
    """Least-privilege role of one fleet's worker instances.

    Everything is pinned to this fleet: its work queue (and DLQ, for the poison rule), its
    lease and fleet tables, its ASG (lifecycle answers, scale-in protection of itself), its
    configuration parameter, its agent bundle and workload objects (by key, not by bucket),
    its checkpoint prefix and log group, and agent metrics only in
    ``contracts.AGENT_METRIC_NAMESPACE`` (so no worker can feed a control-plane alarm).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        fleet: str,
        work_queue: sqs.IQueue,
        work_dlq: sqs.IQueue,
        leases: dynamodb.ITable,
        fleet_table: dynamodb.ITable,
        config_parameter_name: str,
        assets: list[s3_assets.Asset],
        checkpoint_bucket: s3.IBucket,
        log_group: logs.ILogGroup,
    ) -> None:
        super().__init__(scope, construct_id)
        asg = contracts.asg_name(fleet)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"spotguard {fleet} worker instances",
        )
        role = self.role
        # SSM Session Manager instead of SSH, without AmazonSSMManagedInstanceCore: that policy
        # also grants ssm:GetParameter* on every parameter of the region (and documents,
        # associations, inventory). Session Manager needs only these; none of them supports
        # resource-level permissions.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="SessionManagerOnly",
                actions=[
                    "ssm:UpdateInstanceInformation",
                    "ssmmessages:CreateControlChannel",
                    "ssmmessages:CreateDataChannel",
                    "ssmmessages:OpenControlChannel",
                    "ssmmessages:OpenDataChannel",
                    "ec2messages:AcknowledgeMessage",
                    "ec2messages:DeleteMessage",
                    "ec2messages:FailMessage",
                    "ec2messages:GetEndpoint",
                    "ec2messages:GetMessages",
                    "ec2messages:SendReply",
                ],
                resources=["*"],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ConsumeWorkQueue",
                actions=[
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:ChangeMessageVisibility",
                    "sqs:GetQueueAttributes",
                    "sqs:GetQueueUrl",
                ],
                resources=[work_queue.queue_arn],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="MovePoisonMessagesToDlq",
                actions=["sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
                resources=[work_dlq.queue_arn],
            )
        )
        grant_decrypt_if_encrypted(work_queue, role)
        grant_decrypt_if_encrypted(work_dlq, role)
        # Its own leases and fleet record only: their partition key is the instance's ARN
        # (contracts.instance_key), which IAM knows as ${ec2:SourceInstanceARN} for
        # instance-profile credentials. ForAllValues holds for every key of a batch call too;
        # no Scan (a request without keys would satisfy ForAllValues vacuously).
        role.add_to_policy(
            iam.PolicyStatement(
                sid="OwnLeasesAndFleetRecord",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                    "dynamodb:Query",
                    "dynamodb:BatchWriteItem",
                ],
                resources=[leases.table_arn, fleet_table.table_arn],
                conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [OWN_INSTANCE_ARN]}},
            )
        )
        # The one shared item kind: a message's interruption requeue counter is counted by
        # whichever worker releases the message (its lease may be another instance's by then),
        # so no key can name one owner. Limited to the counter items (message#*), to their
        # attributes and to one item per call; nothing of a lease or record is readable.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="SharedRequeueCountersOnly",
                actions=["dynamodb:GetItem", "dynamodb:UpdateItem"],
                resources=[leases.table_arn],
                conditions={
                    "ForAllValues:StringLike": {
                        "dynamodb:LeadingKeys": [f"{contracts.REQUEUE_COUNTER_PK_PREFIX}*"],
                    },
                    "ForAllValues:StringEquals": {"dynamodb:Attributes": list(REQUEUE_COUNTER_ATTRIBUTES)},
                    "StringEqualsIfExists": {
                        "dynamodb:Select": "SPECIFIC_ATTRIBUTES",
                        "dynamodb:ReturnValues": ["NONE", "UPDATED_OLD", "UPDATED_NEW"],
                    },
                },
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="AnswerOwnLifecycleHooks",
                actions=["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"],
                resources=[asg_arn(self, asg)],
            )
        )
        # The agent protects its own instance from scale-in while it holds leases and
        # releases the protection when idle (the sqs-ec2-spot-asg pattern).
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ProtectSelfFromScaleInWhileBusy",
                actions=["autoscaling:SetInstanceProtection"],
                resources=[asg_arn(self, asg)],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="TagOwnBootstrapOutcome",
                actions=["ec2:CreateTags"],
                resources=[instance_arn_pattern(self)],
                conditions={
                    **fleet_tag_condition(fleet),
                    "ForAllValues:StringEquals": {
                        "aws:TagKeys": [contracts.BOOTSTRAP_TAG_KEY, contracts.BOOTSTRAP_REASON_TAG_KEY]
                    },
                },
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadAgentConfig",
                actions=["ssm:GetParameter"],
                resources=[
                    Stack.of(self).format_arn(
                        service="ssm", resource="parameter", resource_name=config_parameter_name.lstrip("/")
                    )
                ],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="PutAgentMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": contracts.AGENT_METRIC_NAMESPACE}},
            )
        )
        # The agent bundle and the workload: read by object key, not the whole asset bucket.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadAgentBundleAndWorkload",
                actions=["s3:GetObject"],
                resources=[asset.bucket.arn_for_objects(asset.s3_object_key) for asset in assets],
            )
        )
        checkpoint_prefix = f"{contracts.CHECKPOINT_KEY_PREFIX}{fleet}/"
        role.add_to_policy(
            iam.PolicyStatement(
                sid="OwnFleetCheckpoints",
                actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                resources=[checkpoint_bucket.arn_for_objects(f"{checkpoint_prefix}*")],
            )
        )
        # ListBucket only under the fleet's prefix: a missing checkpoint is then a 404, not a 403.
        role.add_to_policy(
            iam.PolicyStatement(
                sid="ListOwnFleetCheckpoints",
                actions=["s3:ListBucket"],
                resources=[checkpoint_bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{checkpoint_prefix}*"]}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="WriteFleetLogGroup",
                actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[log_group.log_group_arn, f"{log_group.log_group_arn}:log-stream:*"],
            )
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "cloudwatch:PutMetricData (limited by the cloudwatch:namespace condition to "
            f"{contracts.AGENT_METRIC_NAMESPACE}) and the Session Manager channel actions "
            "(ssmmessages, ec2messages, ssm:UpdateInstanceInformation) have no resource-level "
            "permissions.",
        )
        acknowledge(
            role,
            iam5_resource(role, instance_arn_pattern(role)),
            "ec2:CreateTags is limited by conditions to instances tagged with this fleet and to the "
            "bootstrap outcome tag keys; instance ids are not known in advance.",
        )
        acknowledge(
            role,
            iam5_resource(role, asg_arn(role, asg)),
            "Auto Scaling group ARNs contain a generated id; the ARN is pinned by the group name.",
        )
        acknowledge(
            role,
            iam5_resource(role, checkpoint_bucket.arn_for_objects(f"{checkpoint_prefix}*")),
            "Checkpoint objects are one per message id (not known in advance), under this fleet's "
            "own prefix of the checkpoint bucket only.",
        )
        acknowledge(
            role,
            iam5_resource(role, f"{log_group.log_group_arn}:log-stream:*"),
            "One log stream per instance (ids not known in advance), in this fleet's log group only.",
        )


_INSTANCE_REASON = (
    "Instance ids are not known in advance; every statement on instance/* is conditioned on "
    "aws:ResourceTag/spotguard:fleet (or ec2:CreateAction=RunInstances for launch tags)."
)
_ASG_REASON = "Auto Scaling group ARNs contain a generated id; the ARN is pinned by the group name."


def _lease_ops(role: iam.IRole, leases: dynamodb.ITable) -> None:
    """Read leases, delete them after requeue, update the interruption requeue counters."""
    role.add_to_principal_policy(
        iam.PolicyStatement(
            sid="LeasesReadDeleteRequeueCounter",
            actions=[
                "dynamodb:GetItem",
                "dynamodb:BatchGetItem",
                "dynamodb:Query",
                "dynamodb:Scan",
                "dynamodb:DeleteItem",
                "dynamodb:BatchWriteItem",
                "dynamodb:UpdateItem",
            ],
            resources=[leases.table_arn],
        )
    )


def _change_visibility(role: iam.IRole, work_queue: sqs.IQueue) -> None:
    role.add_to_principal_policy(
        iam.PolicyStatement(
            sid="RequeueWork",
            actions=["sqs:ChangeMessageVisibility"],  # also authorises ChangeMessageVisibilityBatch
            resources=[work_queue.queue_arn],
        )
    )


def grant_dispatcher(
    role: iam.Role,
    *,
    fleet: str,
    leases: dynamodb.ITable,
    fleet_table: dynamodb.ITable,
    idempotency: dynamodb.ITable,
    work_queue: sqs.IQueue,
    bus: events.IEventBus,
) -> None:
    """Requeue leases, record signals, detach its own fleet's instances, publish notices."""
    _lease_ops(role, leases)
    fleet_table.grant_read_write_data(role)
    idempotency.grant_read_write_data(role)
    _change_visibility(role, work_queue)
    asg = contracts.asg_name(fleet)
    role.add_to_policy(
        iam.PolicyStatement(
            sid="ManagedLookupFallback",
            actions=["ec2:DescribeTags", "ec2:DescribeInstances", "autoscaling:DescribeAutoScalingInstances"],
            resources=["*"],
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="EarlyReplacementDetachOwnFleetOnly",
            actions=["autoscaling:DetachInstances"],
            resources=[asg_arn(role, asg)],
            conditions=fleet_tag_condition(fleet),
        )
    )
    bus.grant_put_events_to(role)
    acknowledge(role, iam5_resource(role, asg_arn(role, asg)), _ASG_REASON)
    _acknowledge_table_grants(role, [fleet_table, idempotency])


def grant_watchdog(
    role: iam.Role,
    *,
    fleet: str,
    leases: dynamodb.ITable,
    fleet_table: dynamodb.ITable,
    work_queue: sqs.IQueue,
    bus: events.IEventBus,
) -> None:
    """Requeue leases, end its own fleet's instances, publish notices."""
    _lease_ops(role, leases)
    fleet_table.grant_read_write_data(role)
    _change_visibility(role, work_queue)
    role.add_to_policy(
        iam.PolicyStatement(
            sid="TerminateOwnFleetOnly",
            actions=["ec2:TerminateInstances"],
            resources=[instance_arn_pattern(role)],
            conditions=fleet_tag_condition(fleet),
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(sid="SeeInstanceStates", actions=["ec2:DescribeInstances"], resources=["*"])
    )
    bus.grant_put_events_to(role)
    acknowledge(role, iam5_resource(role, instance_arn_pattern(role)), _INSTANCE_REASON)
    _acknowledge_table_grants(role, [fleet_table])


def grant_reconciler(
    role: iam.Role,
    *,
    fleet: str,
    jobs: dynamodb.ITable,
    fleet_table: dynamodb.ITable,
    launch_template_id: str,
    instance_role: iam.IRole,
    bus: events.IEventBus,
    novita_secret: secretsmanager.ISecret | None,
    instance_types: list[str],
) -> None:
    """Job records, replacements through the fleet's template only, its own fleet's instances."""
    stack = Stack.of(role)
    jobs.grant_read_write_data(role)
    fleet_table.grant_read_write_data(role)
    template_arn = stack.format_arn(
        service="ec2", resource="launch-template", resource_name=launch_template_id
    )
    launched = [
        instance_arn_pattern(role),
        stack.format_arn(service="ec2", resource="volume", resource_name="*"),
        stack.format_arn(service="ec2", resource="network-interface", resource_name="*"),
        stack.format_arn(service="ec2", resource="subnet", resource_name="*"),
        stack.format_arn(service="ec2", resource="security-group", resource_name="*"),
        stack.format_arn(service="ec2", resource="image", resource_name="*", account=""),
        # Replacements are launched as Spot (InstanceMarketOptions).
        stack.format_arn(service="ec2", resource="spot-instances-request", resource_name="*"),
    ]
    role.add_to_policy(
        iam.PolicyStatement(
            sid="LaunchReplacementFromFleetTemplate",
            actions=["ec2:RunInstances"],
            resources=[template_arn],
        )
    )
    through_template = {"ArnLike": {"ec2:LaunchTemplate": template_arn}}
    # The instance itself: only through the fleet's template, only the fleet's instance
    # types, only with IMDSv2 required, so the role cannot launch anything else.
    role.add_to_policy(
        iam.PolicyStatement(
            sid="LaunchOnlyFleetInstances",
            actions=["ec2:RunInstances"],
            resources=launched[:1],
            conditions={
                **through_template,
                # (Not ec2:IsLaunchTemplateResource: the job passes the instance type and subnet
                # of the pool it picks, which overrides the template's.)
                "StringEquals": {
                    "ec2:InstanceType": list(instance_types),
                    "ec2:MetadataHttpTokens": "required",
                },
            },
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="LaunchOnlyThroughFleetTemplate",
            actions=["ec2:RunInstances"],
            resources=launched[1:],
            conditions=through_template,
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="TagAtLaunchOnly",
            actions=["ec2:CreateTags"],
            resources=launched[:3],
            conditions={"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="RetireOrRestartOwnFleetOnly",
            actions=["ec2:TerminateInstances", "ec2:StartInstances"],
            resources=[instance_arn_pattern(role)],
            conditions=fleet_tag_condition(fleet),
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="FindReclaimedInstances",
            actions=[
                "ec2:DescribeInstances",
                "ec2:DescribeInstanceStatus",
                "ec2:DescribeSubnets",
                "autoscaling:DescribeAutoScalingGroups",  # fleet pools when no subnet list is set
            ],
            resources=["*"],
        )
    )
    # Capacity stuck below desired: add the fallback instance types to its own group's pools.
    role.add_to_policy(
        iam.PolicyStatement(
            sid="WidenOwnFleetPools",
            actions=["autoscaling:UpdateAutoScalingGroup"],
            resources=[asg_arn(role, contracts.asg_name(fleet))],
            conditions=fleet_tag_condition(fleet),
        )
    )
    acknowledge(role, iam5_resource(role, asg_arn(role, contracts.asg_name(fleet))), _ASG_REASON)
    role.add_to_policy(
        iam.PolicyStatement(
            sid="PassInstanceRoleToEc2",
            actions=["iam:PassRole"],
            resources=[instance_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        )
    )
    bus.grant_put_events_to(role)
    if novita_secret is not None:
        novita_secret.grant_read(role)
        acknowledge(
            role,
            iam5_resource(role, f"{novita_secret.secret_arn}-??????"),
            "The Novita API key secret is referenced by name; Secrets Manager appends a random "
            "6-character suffix to secret ARNs.",
        )
    for finding in (iam5_resource(role, arn) for arn in launched):
        acknowledge(
            role,
            finding,
            "RunInstances needs these resource types; the statement is conditioned on "
            "ec2:LaunchTemplate being the fleet's template (tags at launch only with "
            "ec2:CreateAction=RunInstances; terminate/start only with the fleet tag).",
        )
    _acknowledge_table_grants(role, [jobs, fleet_table])


def grant_api(
    role: iam.Role,
    *,
    jobs: dynamodb.ITable,
    fleet_table: dynamodb.ITable,
    reconciler: lambda_.IFunction,
) -> None:
    """Read jobs and fleet records, trigger the reconciler."""
    jobs.grant_read_data(role)
    fleet_table.grant_read_data(role)
    reconciler.grant_invoke(role)
    _acknowledge_table_grants(role, [jobs, fleet_table])
    acknowledge(
        role,
        f"AwsSolutions-IAM5[Resource::<{_logical_ref(reconciler)}.Arn>:*]",
        "Granted by grant_invoke: the reconciler function and its versions/aliases only.",
    )


def grant_notifier(role: iam.IRole, *, webhook_secret: secretsmanager.ISecret | None) -> None:
    """Read the webhook signing secret (when a webhook is configured)."""
    if webhook_secret is not None:
        webhook_secret.grant_read(role)


def _acknowledge_table_grants(role: iam.IRole, tables: list[dynamodb.ITable]) -> None:
    """CDK table grants include ``<table>/index/*`` (the table's own indexes)."""
    for table in tables:
        acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::<{_logical_ref(table)}.Arn>/index/*]",
            "Granted by the CDK table grant: the table's own secondary indexes, same table only.",
        )


def _logical_ref(construct: IConstruct) -> str:
    """Logical id as cdk-nag prints it in IAM5 finding ids (``<LogicalId.Arn>``)."""
    default_child = construct.node.default_child
    target = default_child if default_child is not None else construct
    return Stack.of(construct).resolve(target.logical_id)  # type: ignore[attr-defined]
