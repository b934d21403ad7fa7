"""Settings: defaults, overrides and one bad value per settings family (no synth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from spotguard_cdk.settings import CONTEXT_KEY, ConfigurationError, Settings, overrides_from_context
from spotguard_core import contracts

CDK_JSON = Path(__file__).resolve().parents[2] / "cdk.json"


def settings_error(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_mapping(data, overrides)
    return str(caught.value)


def test_defaults_are_valid_and_match_cdk_json() -> None:
    """cdk.json documents every setting with its default; both must agree."""
    context = json.loads(CDK_JSON.read_text())["context"]
    from_cdk_json = Settings.from_context(context.get)
    assert from_cdk_json == Settings()
    assert json.loads(Settings().model_dump_json()) == context[CONTEXT_KEY]


def test_dotted_overrides_from_command_line_context() -> None:
    context = {
        "spotguard.fleet.max_capacity": "20",
        "spotguard.staging.allow_test_events": "true",
        "spotguard.fleet.instance_types": '["m7i.large", "m6a.large"]',
        "@aws-cdk/core:newStyleStackSynthesis": True,  # not ours: ignored
    }
    overrides = overrides_from_context(context)
    assert set(overrides) == {"fleet.max_capacity", "staging.allow_test_events", "fleet.instance_types"}
    settings = Settings.from_context({}.get, overrides)
    assert settings.fleet.max_capacity == 20
    assert settings.staging.allow_test_events is True
    assert settings.fleet.instance_types == ["m7i.large", "m6a.large"]
    assert settings.stack_name == "Spotguard-default"


def test_whole_object_as_json_string() -> None:
    settings = Settings.from_context({CONTEXT_KEY: json.dumps({"fleet": {"name": "batch"}})}.get)
    assert settings.stack_name == "Spotguard-batch"
    with pytest.raises(ConfigurationError, match="spotguard: not valid JSON"):
        Settings.from_context({CONTEXT_KEY: "{nope"}.get)


def test_unknown_setting_is_named() -> None:
    message = settings_error({"fleet": {"max_capcity": 3}})
    assert "spotguard.fleet.max_capcity: is not a known setting" in message


def test_environment_family() -> None:
    assert "spotguard.environment.account: must be a 12-digit AWS account id (got '12345')" in settings_error(
        {"environment": {"account": "12345"}}
    )
    assert "spotguard.environment.region: must be an AWS region name" in settings_error(
        {"environment": {"region": "Europe"}}
    )
    assert "availability_zones needs environment.region" in settings_error(
        {"environment": {"availability_zones": ["eu-west-1a"]}}
    )


def test_network_family() -> None:
    assert "spotguard.network.max_azs: must be between 1 and 6 (got 9)" in settings_error(
        {"network": {"max_azs": 9}}
    )
    assert "spotguard.network.vpc_id: must look like vpc-0123456789abcdef0" in settings_error(
        {"network": {"vpc_id": "vpc-xyz"}}
    )
    assert "network.vpc_id needs environment.account and environment.region" in settings_error(
        {"network": {"vpc_id": "vpc-0123456789abcdef0"}}
    )


def test_fleet_family() -> None:
    assert "spotguard.fleet.name: must be 3-32 characters" in settings_error({"fleet": {"name": "A"}})
    assert "not EC2 instance types: large" in settings_error({"fleet": {"instance_types": ["large"]}})
    assert "spotguard.fleet.max_capacity: must be between 1 and 1000 (got 0)" in settings_error(
        {"fleet": {"max_capacity": 0}}
    )
    assert "min_capacity (5) must not exceed max_capacity (2)" in settings_error(
        {"fleet": {"min_capacity": 5, "max_capacity": 2}}
    )
    assert "spotguard.fleet.ami_id: must look like ami-" in settings_error({"fleet": {"ami_id": "ubuntu"}})
    assert "spotguard.fleet.handler: must be 'module:function'" in settings_error(
        {"fleet": {"handler": "tasks.handle"}}
    )


def test_queue_family() -> None:
    assert (
        "spotguard.queue.visibility_timeout_seconds: must be between 30 and 43200 (got 5)"
        in settings_error({"queue": {"visibility_timeout_seconds": 5}})
    )
    assert "spotguard.queue.retention_days: must be between 1 and 14 (got 30)" in settings_error(
        {"queue": {"retention_days": 30}}
    )
    assert "spotguard.queue.max_failures: must be between 1 and 50" in settings_error(
        {"queue": {"max_failures": 0}}
    )


def test_bootstrap_family() -> None:
    assert "spotguard.bootstrap.deadline_minutes: must be between 3 and 120 (got 1)" in settings_error(
        {"bootstrap": {"deadline_minutes": 1}}
    )


def test_agent_family() -> None:
    assert "spotguard.agent.imds_poll_seconds: must be between 0.2 and 30" in settings_error(
        {"agent": {"imds_poll_seconds": 0.01}}
    )
    assert "visibility_timeout_seconds must be at least agent.drain_margin_seconds" in settings_error(
        {"agent": {"drain_margin_seconds": 100}, "queue": {"visibility_timeout_seconds": 60}}
    )


def test_control_plane_family() -> None:
    assert "spotguard.control_plane.rebalance_policy" in settings_error(
        {"control_plane": {"rebalance_policy": "panic"}}
    )
    assert "spotguard.control_plane.log_retention_days" in settings_error(
        {"control_plane": {"log_retention_days": 2}}
    )


def test_migration_family_uses_the_seed_ranges() -> None:
    low, high = contracts.MIGRATION_INTERVAL_MINUTES_RANGE
    assert (
        f"spotguard.migration.interval_minutes: must be between {low} and {high} (got '90')"
        in settings_error({}, {"migration.interval_minutes": "90"})
    )
    low, high = contracts.MIGRATION_MAX_CONCURRENT_RANGE
    assert f"spotguard.migration.max_concurrent: must be between {low} and {high} (got 21)" in settings_error(
        {"migration": {"max_concurrent": 21}}
    )
    assert "spotguard.migration.job_timeout_ms: must be between 60000 and 1800000" in settings_error(
        {"migration": {"job_timeout_ms": 1000}}
    )
    assert "provider 'novita' needs novita_api_key_secret_name" in settings_error(
        {"migration": {"provider": "novita"}}
    )


def test_notifications_family() -> None:
    assert "spotguard.notifications.webhook_url: must be an https:// URL" in settings_error(
        {"notifications": {"webhook_url": "http://example.com/hook"}}
    )


def test_observability_family() -> None:
    assert "spotguard.observability.alarm_email: must be an email address" in settings_error(
        {"observability": {"alarm_email": "ops"}}
    )


def test_staging_family() -> None:
    assert "staging.fis_experiment needs fleet.fis_target = true" in settings_error(
        {"staging": {"fis_experiment": True}}
    )
    assert "spotguard.staging.allow_test_events" in settings_error(
        {"staging": {"allow_test_events": "maybe"}}
    )


def test_message_says_where_to_change() -> None:
    assert "Change these values in cdk.json (context 'spotguard') or the -c overrides." in settings_error(
        {"fleet": {"max_capacity": 0}}
    )
