"""The worker fleet: launch template, Auto Scaling group and its scaling (role: ``permissions``).

- Launch template: IMDSv2 required with hop limit 1 (containers on the host cannot reach
  IMDS), instance tags in metadata, encrypted gp3 root volume, no key pair (SSM Session
  Manager instead of SSH), shutdown behaviour *terminate* (a failed bootstrap shuts the
  instance down and that ends its billing without TerminateInstances permission).
- ASG: mixed instances over several types, spot with price-capacity-optimized allocation,
  on-demand only for the configured base, capacity rebalancing per ``capacity_rebalance``,
  a launch lifecycle hook the bootstrap answers (ABANDON by default: silence means failure)
  and a terminate hook that gives the agent time to drain on scale-in.
- Scaling on backlog per instance (see ``BacklogScaling``).
"""

from __future__ import annotations

from aws_cdk import Duration, Tags
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.agent_bundle import AgentBundle
from spotguard_cdk.nag import acknowledge
from spotguard_cdk.network import Network
from spotguard_cdk.observability import group_metric
from spotguard_cdk.settings import EmulatorGap, Settings

#: How long the ASG waits for the agent to drain on scale-in before terminating anyway.
#: The agent records heartbeats on the hook when it needs longer (up to 48 hours).
TERMINATE_HOOK_TIMEOUT_SECONDS = 900
#: Lifecycle hook heartbeat timeouts are limited to 30-7200 seconds.
MAX_HOOK_TIMEOUT_SECONDS = 7200
#: Margin over the bootstrap deadline before the ASG itself gives up on the launch hook.
LAUNCH_HOOK_MARGIN_SECONDS = 300


def capacity_rebalance(policy: contracts.RebalancePolicy) -> bool:
    """The ASG's own Capacity Rebalancing, from ``control_plane.rebalance_policy``.

    - ``ignore``: off. The user asked that a rebalance recommendation change nothing, and
      the ASG would otherwise launch a replacement and retire the instance on its own.
    - ``replace`` / ``drain``: off as well. spotguard's dispatcher is the one that replaces:
      it detaches the instance with desired capacity kept (the ASG launches exactly one
      replacement at once) and the old instance drains and ends. With the ASG's Capacity
      Rebalancing on as well, one recommendation would launch two replacements (the ASG's
      and the one the detach causes). One event, at most one replacement.
    """
    del policy  # every policy: see above
    return False


class Fleet(Construct):
    """The fleet's launch template, Auto Scaling group, lifecycle hooks and backlog scaling."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        network: Network,
        bundle: AgentBundle,
        instance_role: iam.Role,
        work_queue: sqs.IQueue,
    ) -> None:
        super().__init__(scope, construct_id)
        fleet = settings.fleet
        self.asg_name = contracts.asg_name(fleet.name)
        machine_image: ec2.IMachineImage
        if fleet.ami_id:
            machine_image = _FixedImage(fleet.ami_id)
        else:
            # Resolved from the public SSM parameter at deploy time: no lookup at synth.
            machine_image = ec2.MachineImage.latest_amazon_linux2023()

        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=machine_image,
            user_data=bundle.user_data,
            role=instance_role,
            security_group=network.instance_security_group,
            require_imdsv2=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            instance_metadata_tags=True,
            instance_initiated_shutdown_behavior=ec2.InstanceInitiatedShutdownBehavior.TERMINATE,
            detailed_monitoring=False,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        fleet.root_volume_gb,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

        self.asg = autoscaling.AutoScalingGroup(
            self,
            "Group",
            auto_scaling_group_name=self.asg_name,
            vpc=network.vpc,
            vpc_subnets=network.subnets,
            min_capacity=fleet.min_capacity,
            max_capacity=fleet.max_capacity,
            desired_capacity=fleet.desired_capacity,
            capacity_rebalance=capacity_rebalance(settings.control_plane.rebalance_policy),
            group_metrics=[autoscaling.GroupMetrics.all()],
            mixed_instances_policy=autoscaling.MixedInstancesPolicy(
                launch_template=self.launch_template,
                launch_template_overrides=[
                    autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(t))
                    for t in fleet.instance_types
                ],
                instances_distribution=autoscaling.InstancesDistribution(
                    on_demand_base_capacity=fleet.on_demand_base_capacity,
                    on_demand_percentage_above_base_capacity=0,
                    spot_allocation_strategy=autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED,
                ),
            ),
        )
        acknowledge(
            self.asg,
            "AwsSolutions-EC26",
            "The root volume is encrypted in the launch template (BlockDeviceMappings Ebs.Encrypted); "
            "the rule does not follow a MixedInstancesPolicy to its launch template.",
        )
        acknowledge(
            self.asg,
            "AwsSolutions-AS3",
            "Scaling activity is observed through EventBridge lifecycle events and alarms (bootstrap "
            "failures, fleet below minimum); ASG SNS notifications to the KMS-encrypted alarm topic "
            "would need its key to trust the Auto Scaling service-linked role, which may not exist yet.",
        )
        Tags.of(self.asg).add(contracts.FLEET_TAG_KEY, fleet.name, apply_to_launched_instances=True)
        Tags.of(self.launch_template).add(contracts.FLEET_TAG_KEY, fleet.name)
        if fleet.fis_target:
            Tags.of(self.asg).add(contracts.FIS_TARGET_TAG_KEY, "true", apply_to_launched_instances=True)
            Tags.of(self.launch_template).add(contracts.FIS_TARGET_TAG_KEY, "true")
        self._add_lifecycle_hooks(settings)
        self.scaling = BacklogScaling(self, "Scaling", settings=settings, asg=self.asg, work_queue=work_queue)

    def _add_lifecycle_hooks(self, settings: Settings) -> None:
        """Hooks are declared on the group itself, not as separate resources, so that the
        very first instances (min capacity > 0) are already held by the launch hook."""
        deadline = settings.bootstrap.deadline_minutes * 60
        launch_timeout = min(deadline + LAUNCH_HOOK_MARGIN_SECONDS, MAX_HOOK_TIMEOUT_SECONDS)
        cfn_asg = self.asg.node.default_child
        assert isinstance(cfn_asg, autoscaling.CfnAutoScalingGroup)
        cfn_asg.lifecycle_hook_specification_list = [
            autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
                lifecycle_hook_name=contracts.LAUNCH_HOOK_NAME,
                lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
                default_result="ABANDON",
                heartbeat_timeout=launch_timeout,
            ),
            autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
                lifecycle_hook_name=contracts.TERMINATE_HOOK_NAME,
                lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
                default_result="CONTINUE",
                heartbeat_timeout=TERMINATE_HOOK_TIMEOUT_SECONDS,
            ),
        ]
        self.launch_hook_timeout_seconds = launch_timeout


class _FixedImage(ec2.GenericLinuxImage):
    """An AMI id that is the same in every region (settings.fleet.ami_id)."""

    def __init__(self, ami_id: str) -> None:
        super().__init__({})
        self._ami_id = ami_id

    def get_image(self, scope: Construct) -> ec2.MachineImageConfig:
        """The fixed AMI id as a Linux image."""
        return ec2.MachineImageConfig(
            image_id=self._ami_id, os_type=ec2.OperatingSystemType.LINUX, user_data=ec2.UserData.for_linux()
        )


class BacklogScaling(Construct):
    """Scale on work per instance, down to zero and back.

    - Target tracking on ``(visible + in flight) / max(InService, 1)`` (metric math) keeps the
      backlog per instance near ``fleet.backlog_per_instance`` while instances run.
    - Target tracking cannot start from zero instances (it scales proportionally to the
      current capacity), so a step policy sets the group to one instance (or the minimum)
      when its desired capacity is zero and work is waiting; target tracking takes over.
    - When nothing is visible or in flight for 15 minutes, a step policy sets the group to
      its minimum (zero by default): target tracking scales in cautiously and may keep
      an idle instance. In-flight messages count as backlog, so scale-in does not pick
      instances while they still hold work (and the terminate hook lets them drain).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        asg: autoscaling.AutoScalingGroup,
        work_queue: sqs.IQueue,
    ) -> None:
        super().__init__(scope, construct_id)
        period = Duration.minutes(1)
        visible = work_queue.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum")
        in_flight = work_queue.metric_approximate_number_of_messages_not_visible(
            period=period, statistic="Maximum"
        )
        in_service = group_metric(
            asg.auto_scaling_group_name, "GroupInServiceInstances", statistic="Average", period=period
        )
        self.backlog_per_instance = cloudwatch.MathExpression(
            expression="(visible + inflight) / MAX([inservice, 1])",
            using_metrics={"visible": visible, "inflight": in_flight, "inservice": in_service},
            label="Backlog per instance",
            period=period,
        )
        cfn_metrics = [
            autoscaling.CfnScalingPolicy.TargetTrackingMetricDataQueryProperty(
                id=query_id,
                metric_stat=autoscaling.CfnScalingPolicy.TargetTrackingMetricStatProperty(
                    metric=autoscaling.CfnScalingPolicy.MetricProperty(
                        metric_name=metric.metric_name,
                        namespace=metric.namespace,
                        dimensions=[
                            autoscaling.CfnScalingPolicy.MetricDimensionProperty(name=k, value=v)
                            for k, v in (metric.dimensions or {}).items()
                        ],
                    ),
                    stat=metric.statistic,
                ),
                return_data=False,
            )
            for query_id, metric in (("visible", visible), ("inflight", in_flight), ("inservice", in_service))
        ]
        cfn_metrics.append(
            autoscaling.CfnScalingPolicy.TargetTrackingMetricDataQueryProperty(
                id="backlog",
                expression="(visible + inflight) / MAX([inservice, 1])",
                label="Backlog per instance",
                return_data=True,
            )
        )
        # The L2 target tracking policy only accepts a single metric, not metric math.
        self.target_tracking = autoscaling.CfnScalingPolicy(
            self,
            "BacklogTargetTracking",
            auto_scaling_group_name=asg.auto_scaling_group_name,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=settings.bootstrap.deadline_minutes * 60 // 4,
            target_tracking_configuration=autoscaling.CfnScalingPolicy.TargetTrackingConfigurationProperty(
                target_value=float(settings.fleet.backlog_per_instance),
                customized_metric_specification=autoscaling.CfnScalingPolicy.CustomizedMetricSpecificationProperty(
                    metrics=cfn_metrics
                ),
            ),
        )

        if not settings.supports(EmulatorGap.METRIC_MATH_ALARMS):
            return

        desired = group_metric(
            asg.auto_scaling_group_name, "GroupDesiredCapacity", statistic="Maximum", period=period
        )
        # Desired (not in-service) capacity: a launched instance stays Pending:Wait in the
        # launch hook during its bootstrap and must not trigger a second launch.
        self._set_capacity_while(
            asg,
            "ScaleFromZero",
            "WorkWaitingWithNoInstance",
            description="Scaling: work is waiting and the fleet is at zero; start one instance.",
            capacity=max(1, settings.fleet.min_capacity),
            condition=cloudwatch.MathExpression(
                expression="IF(desired < 1 AND visible > 0, 1, 0)",
                using_metrics={"visible": visible, "desired": desired},
                label="Work waiting and desired capacity zero",
                period=period,
            ),
            evaluation_periods=1,
        )
        minimum = settings.fleet.min_capacity
        self._set_capacity_while(
            asg,
            "ScaleToMinimumWhenIdle",
            "IdleAboveMinimum",
            description="Scaling: no work visible or in flight for 15 minutes; back to the minimum.",
            capacity=minimum,
            condition=cloudwatch.MathExpression(
                expression=f"IF(visible + inflight == 0 AND desired > {minimum}, 1, 0)",
                using_metrics={
                    "visible": visible.with_(period=Duration.minutes(5)),
                    "inflight": in_flight.with_(period=Duration.minutes(5)),
                    "desired": desired.with_(period=Duration.minutes(5)),
                },
                label="Idle above minimum capacity",
                period=Duration.minutes(5),
            ),
            evaluation_periods=3,
        )

    def _set_capacity_while(
        self,
        asg: autoscaling.AutoScalingGroup,
        action_id: str,
        alarm_id: str,
        *,
        description: str,
        capacity: int,
        condition: cloudwatch.MathExpression,
        evaluation_periods: int,
    ) -> None:
        """Set the group's desired capacity to exactly ``capacity`` when ``condition`` (0 or 1)
        has been 1 for ``evaluation_periods``: an alarm driving a step scaling action."""
        action = autoscaling.StepScalingAction(
            self,
            action_id,
            auto_scaling_group=asg,
            adjustment_type=autoscaling.AdjustmentType.EXACT_CAPACITY,
            metric_aggregation_type=autoscaling.MetricAggregationType.MAXIMUM,
        )
        action.add_adjustment(adjustment=capacity, lower_bound=0)
        cloudwatch.Alarm(
            self,
            alarm_id,
            alarm_description=description,
            metric=condition,
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=evaluation_periods,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        ).add_alarm_action(cloudwatch_actions.AutoScalingAction(action))
