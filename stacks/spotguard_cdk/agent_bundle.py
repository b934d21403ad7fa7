"""The agent bundle (an S3 asset), its configuration parameter and the tiny user data.

The user data is the stage-1 template from ``instance_assets/`` rendered with ``Fn::Sub``:
it only knows where the bundle is, its hash and what to answer on failure. Everything
else the agent needs is in one SSM parameter (a JSON object of ``contracts.Env`` names to
values) that the installer reads, so the user data stays far below the 16 KB limit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from aws_cdk import Aws, Fn, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_ssm as ssm
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.bundle import build_bundle, user_data_template
from spotguard_cdk.functions import instance_arn_prefix
from spotguard_cdk.settings import Settings


class AgentBundle(Construct):
    """The bundle asset and the user data that fetches and verifies it."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: Settings, fleet_table_name: str
    ) -> None:
        super().__init__(scope, construct_id)
        fleet = settings.fleet.name
        # A private directory per synth (parallel synths must not share the file), removed
        # at once: CDK stages (copies) the asset into the cloud assembly when it is created.
        with tempfile.TemporaryDirectory(prefix="spotguard-bundle-") as build_dir:
            bundle = build_bundle(Path(build_dir))
            self.asset = s3_assets.Asset(self, "Asset", path=str(bundle.path))
        self.bundle_sha256 = bundle.sha256
        self.bundle_size_bytes = bundle.size_bytes
        self.config_parameter_name = contracts.agent_config_parameter(fleet)
        placeholders: Mapping[str, str] = {
            "Fleet": fleet,
            "Region": Aws.REGION,
            "BundleUrl": self.asset.s3_object_url,
            "BundleSha256": bundle.sha256,
            "DeadlineSeconds": str(settings.bootstrap.deadline_minutes * 60),
            "FleetTable": fleet_table_name,
            "InstanceArnPrefix": instance_arn_prefix(self),
            "AsgName": contracts.asg_name(fleet),
            "LaunchHook": contracts.LAUNCH_HOOK_NAME,
            "ConfigParameter": self.config_parameter_name,
        }
        missing = set(contracts.BOOTSTRAP_PLACEHOLDERS) - set(placeholders)
        if missing:  # a contract change that this construct does not follow yet
            raise ValueError(f"no value for user data placeholders: {sorted(missing)}")
        self.user_data = ec2.UserData.custom(Fn.sub(user_data_template(), dict(placeholders)))


class AgentConfigParameter(Construct):
    """SSM parameter with the agent's configuration (read by the installer). The values come
    from ``spotguard_core.runtime_env.agent_config`` (the agent's own reader is
    ``spotguard_agent.config.AgentConfig``)."""

    def __init__(self, scope: Construct, construct_id: str, *, name: str, values: Mapping[str, str]) -> None:
        super().__init__(scope, construct_id)
        self.parameter = ssm.StringParameter(
            self,
            "Parameter",
            parameter_name=name,
            description="spotguard agent configuration (JSON object of environment variables)",
            string_value=Stack.of(self).to_json_string({str(key): value for key, value in values.items()}),
            tier=ssm.ParameterTier.STANDARD,
        )
