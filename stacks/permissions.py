"""Least-privilege policies of the control-plane roles (one role per function).

``Resource: *`` statements (X-Ray, describe calls) are acknowledged once per role in
``functions.ControlPlaneFunction`` (one finding id per role, one reason).

Destructive EC2/ASG actions carry the fleet tag condition
(``aws:ResourceTag/spotguard:fleet = <fleet>``): even a bug that picks a foreign instance
id cannot terminate or detach it. No statement grants ``*`` or ``service:*`` actions;
``Resource: *`` appears only for describe calls that have no resource-level permissions.
"""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import IConstruct
from spotguard_core import contracts

from stacks.fleet import asg_arn, fleet_tag_condition, instance_arn_pattern
from stacks.nag import acknowledge, iam5_resource

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
) -> None:
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
    ]
    role.add_to_policy(
        iam.PolicyStatement(
            sid="LaunchReplacementFromFleetTemplate",
            actions=["ec2:RunInstances"],
            resources=[template_arn],
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            sid="LaunchOnlyThroughFleetTemplate",
            actions=["ec2:RunInstances"],
            resources=launched,
            conditions={"ArnLike": {"ec2:LaunchTemplate": template_arn}},
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
    jobs.grant_read_data(role)
    fleet_table.grant_read_data(role)
    reconciler.grant_invoke(role)
    _acknowledge_table_grants(role, [jobs, fleet_table])
    acknowledge(
        role,
        f"AwsSolutions-IAM5[Resource::<{_logical_ref(reconciler)}.Arn>:*]",
        "Granted by grant_invoke: the reconciler function and its versions/aliases only.",
    )


def grant_notifier(role: iam.Role, *, webhook_secret: secretsmanager.ISecret | None) -> None:
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
