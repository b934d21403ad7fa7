"""Network: a VPC without NAT gateways, or an existing VPC.

Instances live in public subnets with public IPs so they reach AWS APIs and package
repositories without a NAT gateway (the largest fixed cost of a small fleet). Their
security group has no ingress at all and allows only HTTPS out; S3 and DynamoDB are
reached through free gateway endpoints. Access for operators is SSM Session Manager.
"""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

from spotguard_cdk.common import cfn_lint_ignore, retention
from spotguard_cdk.nag import acknowledge
from spotguard_cdk.settings import EmulatorGap, Settings


class Network(Construct):
    """The VPC (the user's ``vpc``, a looked-up ``network.vpc_id``, or a new one) and the
    instances' security group."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc | None = None,
        vpc_subnets: ec2.SubnetSelection | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.vpc: ec2.IVpc
        if vpc is not None:
            # The user's own VPC (created or imported in their app): no lookup, no credentials.
            self.vpc = vpc
        elif settings.network.vpc_id:
            # Needs an explicit environment and AWS credentials at synth (the result is
            # cached in cdk.context.json); settings validation enforces the environment.
            # Needs AWS credentials at synth; pass vpc= (an ec2.IVpc) to SpotWorkerFleet instead
            # to synthesize offline.
            self.vpc = ec2.Vpc.from_lookup(self, "Vpc", vpc_id=settings.network.vpc_id)
        else:
            new_vpc = ec2.Vpc(
                self,
                "Vpc",
                ip_addresses=ec2.IpAddresses.cidr("10.40.0.0/16"),
                # Explicit AZs keep synth offline for an environment-specific stack; an
                # environment-agnostic stack uses two AZs chosen at deploy (Fn::GetAZs).
                max_azs=None if settings.environment.availability_zones else settings.network.max_azs,
                availability_zones=settings.environment.availability_zones,
                nat_gateways=0,
                restrict_default_security_group=settings.supports(
                    EmulatorGap.DEFAULT_SECURITY_GROUP_RESTRICTION
                ),
                subnet_configuration=[
                    ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=20)
                ],
                gateway_endpoints={
                    "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                    "DynamoDb": ec2.GatewayVpcEndpointOptions(
                        service=ec2.GatewayVpcEndpointAwsService.DYNAMODB
                    ),
                },
            )
            if settings.supports(EmulatorGap.VPC_FLOW_LOGS):
                flow_log_group = logs.LogGroup(
                    self,
                    "FlowLogs",
                    retention=retention(settings.control_plane.log_retention_days),
                )
                new_vpc.add_flow_log(
                    "FlowLog",
                    destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_log_group),
                    traffic_type=ec2.FlowLogTrafficType.REJECT,
                )
            else:
                acknowledge(new_vpc, "AwsSolutions-VPC7", "profile 'emulator': the emulator has no flow logs")
            self.vpc = new_vpc
            if settings.environment.availability_zones:
                self._accept_configured_azs(new_vpc)

        # Public subnets by default (no NAT gateway needed); a user's VPC may name others.
        self.subnets = vpc_subnets or ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)
        self.instance_security_group = ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=self.vpc,
            description="spotguard workers: no ingress (SSM for access), HTTPS egress only",
            allow_all_outbound=False,
        )
        self.instance_security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS to AWS APIs, S3 and package repositories"
        )

    @staticmethod
    def _accept_configured_azs(vpc: ec2.Vpc) -> None:
        reason = (
            "Availability zones are configured explicitly (environment.availability_zones) so that "
            "an environment-specific synth needs no AWS lookup."
        )
        acknowledge(vpc, "CloudFormation-Validate::W3010", reason)
        for subnet in vpc.public_subnets:
            cfn_subnet = subnet.node.default_child
            assert isinstance(cfn_subnet, ec2.CfnSubnet)
            cfn_lint_ignore(cfn_subnet, {"W3010": reason})
