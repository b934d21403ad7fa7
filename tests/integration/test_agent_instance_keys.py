"""The agent's instance key prefix (issue 13): from its config (built at synth), else from IMDS
(identity document region and account; ``services/partition``, or the region's partition
where IMDS has no such path), over HTTP against the IMDS emulator."""

from __future__ import annotations

import pytest
from spotguard_agent.config import AgentConfig, ConfigError, with_instance_arn_prefix
from spotguard_agent.imds import ImdsClient
from spotguard_tools.imds_emulator import running_imds

pytestmark = pytest.mark.integration


def test_the_prefix_comes_from_imds_when_the_config_has_none() -> None:
    with running_imds("i-0keys000000000001", region="eu-west-1", availability_zone="eu-west-1b") as imds:
        imds.state.account_id = "210987654321"
        config = with_instance_arn_prefix(AgentConfig(), ImdsClient(imds.url))
    assert config.instance_arn_prefix == "arn:aws:ec2:eu-west-1:210987654321:instance/"


def test_the_region_decides_the_partition_without_the_imds_path() -> None:
    with running_imds("i-0keys000000000002", region="cn-north-1", availability_zone="cn-north-1a") as imds:
        config = with_instance_arn_prefix(AgentConfig(), ImdsClient(imds.url))
    assert config.instance_arn_prefix.startswith("arn:aws-cn:ec2:cn-north-1:")


def test_the_configured_prefix_wins_and_a_bad_one_stops_the_agent() -> None:
    configured = "arn:aws-us-gov:ec2:us-gov-west-1:123456789012:instance/"
    with running_imds("i-0keys000000000003") as imds:
        client = ImdsClient(imds.url)
        assert with_instance_arn_prefix(AgentConfig(instance_arn_prefix=configured), client) == AgentConfig(
            instance_arn_prefix=configured
        )
        with pytest.raises(ConfigError, match="SPOTGUARD_INSTANCE_ARN_PREFIX"):
            with_instance_arn_prefix(AgentConfig(instance_arn_prefix="arn:aws:ec2:::instance/"), client)
