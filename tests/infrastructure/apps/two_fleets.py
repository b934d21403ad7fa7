#!/usr/bin/env python3
"""A user's own CDK app: two spotguard fleets on two of the user's queues in one stack.

It imports only ``spotguard_cdk`` (never this repository's ``app.py`` or ``stacks/``), so it
also runs from a virtual environment that has nothing but the spotguard wheel installed
(tests/infrastructure/test_packaging.py). Workload paths are relative to this file.
"""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
from aws_cdk import Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from cdk_nag import AwsSolutionsChecks
from spotguard_cdk import SpotWorkerFleet, Workload

HERE = Path(__file__).resolve().parent
STACK_NAME = "MediaPipeline"


def user_queue(stack: cdk.Stack, name: str, visibility_seconds: int) -> sqs.Queue:
    """How a team typically defines its queues: encrypted, TLS only, with a DLQ."""
    dlq = sqs.Queue(
        stack,
        f"{name}Dlq",
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        retention_period=Duration.days(14),
    )
    return sqs.Queue(
        stack,
        name,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        visibility_timeout=Duration.seconds(visibility_seconds),
        retention_period=Duration.days(7),
        dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=100),
    )


def build(app: cdk.App) -> cdk.Stack:
    stack = cdk.Stack(app, STACK_NAME)
    vpc = ec2.Vpc(
        stack,
        "Vpc",
        nat_gateways=0,
        max_azs=2,
        subnet_configuration=[ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC)],
    )
    vpc.add_flow_log(
        "FlowLog",
        destination=ec2.FlowLogDestination.to_cloud_watch_logs(
            logs.LogGroup(stack, "FlowLogs", retention=logs.RetentionDays.ONE_MONTH)
        ),
        traffic_type=ec2.FlowLogTrafficType.REJECT,
    )
    renders = user_queue(stack, "Renders", visibility_seconds=300)
    encodes = user_queue(stack, "Encodes", visibility_seconds=180)

    SpotWorkerFleet(
        stack,
        "RenderFleet",
        queue=renders,
        workload=Workload.python(HERE / "render_worker", handler="tasks:handle"),
        vpc=vpc,
        instance_types=["c6i.large", "c5.large", "m6i.large"],
        min_capacity=0,
        max_capacity=20,
    )
    SpotWorkerFleet(
        stack,
        "EncodeFleet",
        queue=encodes,
        workload=Workload.command(HERE / "encode_worker", command="./encode.sh", stop_grace_seconds=20),
        vpc=vpc,
        instance_types=["m7i.large", "m6i.large"],
        max_capacity=5,
        rebalance_policy="drain",
    )
    return stack


def main() -> None:
    app = cdk.App()
    build(app)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    app.synth()


if __name__ == "__main__":
    main()
