"""Agent configuration: defaults, parsing, and errors that say what to change."""

from __future__ import annotations

import pytest
from spotguard_agent.config import DEFAULT_HANDLER, AgentConfig, ConfigError, load_config
from spotguard_core import contracts
from spotguard_core.contracts import Env, RebalancePolicy


def test_defaults_match_the_design():
    config = load_config({})
    assert config.imds_poll_seconds == 1.0
    assert config.handler == DEFAULT_HANDLER
    assert config.requeue_enabled is True
    assert config.rebalance_policy is RebalancePolicy.REPLACE
    # One default per value, the same constants the CDK settings use (they had drifted:
    # 8080 / 3 / 10 s / 60 s / 1 here against 9880 / 5 / 15 s / 120 s / 2 in the stack).
    assert config.health_port == contracts.DEFAULT_HEALTH_PORT == 9880
    assert config.max_failures == contracts.DEFAULT_MAX_FAILURES == 5
    assert config.drain_margin_seconds == contracts.DEFAULT_DRAIN_MARGIN_SECONDS == 15
    assert config.visibility_timeout_seconds == contracts.DEFAULT_VISIBILITY_TIMEOUT_SECONDS == 120
    assert config.concurrency == contracts.DEFAULT_CONCURRENCY == 2
    assert config.handler == contracts.DEFAULT_HANDLER
    assert AgentConfig() == config.with_overrides(region="")


def test_environment_is_parsed():
    config = load_config(
        {
            Env.WORK_QUEUE_URL.value: "http://q",
            Env.CONCURRENCY.value: "4",
            Env.IMDS_POLL_SECONDS.value: "0.5",
            Env.REQUEUE_ENABLED.value: "false",
            Env.REBALANCE_POLICY.value: "drain",
            Env.MAX_FAILURES.value: "5",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )
    assert (config.work_queue_url, config.concurrency, config.imds_poll_seconds) == ("http://q", 4, 0.5)
    assert config.requeue_enabled is False
    assert config.rebalance_policy is RebalancePolicy.DRAIN
    assert config.max_failures == 5
    assert config.region == "eu-west-1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (Env.CONCURRENCY, "many"),
        (Env.REQUEUE_ENABLED, "perhaps"),
        (Env.REBALANCE_POLICY, "panic"),
        (Env.IMDS_POLL_SECONDS, "1s"),
        (Env.CONCURRENCY, "0"),
        (Env.HEALTH_PORT, "70000"),
        (Env.MAX_FAILURES, "0"),
        (Env.VISIBILITY_TIMEOUT_SECONDS, "50000"),
        (Env.DRAIN_MARGIN_SECONDS, "-1"),
        (Env.PREFETCH, "-2"),
    ],
)
def test_bad_values_name_the_variable(name: Env, value: str):
    with pytest.raises(ConfigError, match=name.value):
        load_config({name.value: value})


def test_handler_and_command_are_exclusive():
    with pytest.raises(ConfigError, match=f"{Env.HANDLER.value} or {Env.COMMAND.value}"):
        load_config({Env.HANDLER.value: "m:f", Env.COMMAND.value: "./run.sh"})
    assert load_config({Env.COMMAND.value: "./run.sh"}).command == "./run.sh"


def test_worker_validation_names_what_is_missing():
    with pytest.raises(ConfigError, match=f"{Env.WORK_QUEUE_URL.value}, {Env.LEASE_TABLE.value}"):
        AgentConfig().validate_worker()
    with pytest.raises(ConfigError, match="module:function"):
        AgentConfig(work_queue_url="q", lease_table="t", handler="just_a_module").validate_worker()
    with pytest.raises(ConfigError, match=Env.CONCURRENCY.value):
        AgentConfig(work_queue_url="q", lease_table="t", concurrency=0).validate_worker()


def test_flags_override_only_what_is_given():
    config = AgentConfig(concurrency=2).with_overrides(concurrency=None, handler="m:f", unknown="x")
    assert (config.concurrency, config.handler) == (2, "m:f")
