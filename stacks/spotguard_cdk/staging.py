"""Staging: an AWS FIS experiment template that sends real spot interruptions.

It targets spot instances that carry BOTH this fleet's tag and the FIS target tag
(``fleet.fis_target`` sets it), one instance per run, and stops when the work DLQ alarm
fires (work was lost: the drill has found a bug). Run it with
``aws fis start-experiment --experiment-template-id <output>``.
"""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_fis as fis
from aws_cdk import aws_iam as iam
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.nag import acknowledge, iam5_resource
from spotguard_cdk.permissions import instance_arn_pattern
from spotguard_cdk.settings import Settings


class SpotInterruptionExperiment(Construct):
    """AWS FIS template: a spot interruption for one tagged fleet instance."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: Settings, stop_alarm: cloudwatch.IAlarm
    ) -> None:
        super().__init__(scope, construct_id)
        fleet = settings.fleet.name
        target_tags = {contracts.FLEET_TAG_KEY: fleet, contracts.FIS_TARGET_TAG_KEY: "true"}
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal(
                "fis.amazonaws.com",
                conditions={"StringEquals": {"aws:SourceAccount": Stack.of(self).account}},
            ),
            description=f"AWS FIS spot interruption drill for spotguard {fleet}",
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="InterruptTaggedFleetInstancesOnly",
                actions=["ec2:SendSpotInstanceInterruptions"],
                resources=[instance_arn_pattern(self)],
                conditions={
                    "StringEquals": {f"aws:ResourceTag/{key}": value for key, value in target_tags.items()}
                },
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(sid="ResolveTargets", actions=["ec2:DescribeInstances"], resources=["*"])
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::*]",
            "ec2:DescribeInstances has no resource-level permissions; FIS needs it to resolve targets.",
        )
        acknowledge(
            self.role,
            iam5_resource(self.role, instance_arn_pattern(self)),
            "Interruptions are limited by condition to instances tagged with this fleet and the "
            "FIS target tag.",
        )
        self.template = fis.CfnExperimentTemplate(
            self,
            "Template",
            description=f"spotguard {fleet}: send a spot interruption to one tagged instance",
            role_arn=self.role.role_arn,
            targets={
                "FleetSpotInstances": fis.CfnExperimentTemplate.ExperimentTemplateTargetProperty(
                    resource_type="aws:ec2:spot-instance",
                    resource_tags=target_tags,
                    filters=[
                        fis.CfnExperimentTemplate.ExperimentTemplateTargetFilterProperty(
                            path="State.Name", values=["running"]
                        )
                    ],
                    selection_mode="COUNT(1)",
                )
            },
            actions={
                "InterruptSpotInstance": fis.CfnExperimentTemplate.ExperimentTemplateActionProperty(
                    action_id="aws:ec2:send-spot-instance-interruptions",
                    description="Two-minute spot interruption warning, then interruption",
                    parameters={"durationBeforeInterruption": "PT2M"},
                    targets={"SpotInstances": "FleetSpotInstances"},
                )
            },
            stop_conditions=[
                fis.CfnExperimentTemplate.ExperimentTemplateStopConditionProperty(
                    source="aws:cloudwatch:alarm", value=stop_alarm.alarm_arn
                )
            ],
            tags={"Name": f"spotguard-{fleet}-spot-interruption"},
        )
