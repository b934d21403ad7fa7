"""Agent configuration: ``contracts.Env`` variables (the installer writes them to
``/etc/spotguard/agent.env``), overridden by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from spotguard_core.contracts import (
    LAUNCH_HOOK_NAME,
    TERMINATE_HOOK_NAME,
    Env,
    RebalancePolicy,
)

from spotguard_agent.imds import DEFAULT_IMDS_URL

DEFAULT_HANDLER = "spotguard_agent.sample_handler:handle"


class ConfigError(ValueError):
    """Invalid agent configuration; the message says which variable to change."""


@dataclass(frozen=True)
class AgentConfig:
    fleet: str = ""
    region: str = ""
    work_queue_url: str = ""
    work_dlq_url: str = ""
    lease_table: str = ""
    fleet_table: str = ""
    asg_name: str = ""
    launch_hook_name: str = LAUNCH_HOOK_NAME
    terminate_hook_name: str = TERMINATE_HOOK_NAME
    handler: str = DEFAULT_HANDLER
    concurrency: int = 1
    visibility_timeout_seconds: int = 60
    imds_url: str = DEFAULT_IMDS_URL
    imds_poll_seconds: float = 1.0
    health_port: int = 8080
    drain_margin_seconds: float = 10.0
    requeue_enabled: bool = True
    max_failures: int = 3
    rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE
    #: Long-poll wait per receive. Short, so a drain never waits long for a receive to return.
    receive_wait_seconds: int = 1
    #: First release delay after a failure; doubles per genuine failure, capped at 15 min.
    failure_backoff_seconds: float = 10.0
    fleet_heartbeat_seconds: float = 5.0
    #: Set on ``report``/``run`` from IMDS when not given.
    instance_id: str = ""

    def with_overrides(self, **overrides: Any) -> AgentConfig:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in known and v is not None})

    def validate_worker(self) -> None:
        missing = [
            env.value
            for env, value in (
                (Env.WORK_QUEUE_URL, self.work_queue_url),
                (Env.LEASE_TABLE, self.lease_table),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                f"set {', '.join(missing)} (in {Env.AGENT_CONFIG_PARAMETER} or the environment)"
            )
        if ":" not in self.handler:
            raise ConfigError(f"{Env.HANDLER} must be 'module:function', got {self.handler!r}")
        if self.concurrency < 1:
            raise ConfigError(f"{Env.CONCURRENCY} must be >= 1, got {self.concurrency}")
        if not 0 <= self.visibility_timeout_seconds <= 43200:
            raise ConfigError(f"{Env.VISIBILITY_TIMEOUT_SECONDS} must be 0..43200")


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def load_config(environ: Mapping[str, str] | None = None) -> AgentConfig:
    env = os.environ if environ is None else environ

    def text(name: Env, default: str) -> str:
        value = env.get(name.value, "")
        return value if value != "" else default

    def number(name: Env, default: float, kind: type = float) -> Any:
        raw = env.get(name.value, "")
        if raw == "":
            return default
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{name.value} must be a number, got {raw!r}") from None

    policy_raw = text(Env.REBALANCE_POLICY, RebalancePolicy.REPLACE.value)
    try:
        policy = RebalancePolicy(policy_raw)
    except ValueError:
        choices = ", ".join(p.value for p in RebalancePolicy)
        raise ConfigError(
            f"{Env.REBALANCE_POLICY.value} must be one of {choices}, got {policy_raw!r}"
        ) from None
    defaults = AgentConfig()
    return AgentConfig(
        fleet=text(Env.FLEET_NAME, ""),
        region=text(Env.REGION, env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""),
        work_queue_url=text(Env.WORK_QUEUE_URL, ""),
        work_dlq_url=text(Env.WORK_DLQ_URL, ""),
        lease_table=text(Env.LEASE_TABLE, ""),
        fleet_table=text(Env.FLEET_TABLE, ""),
        asg_name=text(Env.ASG_NAME, ""),
        launch_hook_name=text(Env.LAUNCH_HOOK_NAME, defaults.launch_hook_name),
        terminate_hook_name=text(Env.TERMINATE_HOOK_NAME, defaults.terminate_hook_name),
        handler=text(Env.HANDLER, defaults.handler),
        concurrency=number(Env.CONCURRENCY, defaults.concurrency, int),
        visibility_timeout_seconds=number(
            Env.VISIBILITY_TIMEOUT_SECONDS, defaults.visibility_timeout_seconds, int
        ),
        imds_url=text(Env.IMDS_URL, defaults.imds_url),
        imds_poll_seconds=number(Env.IMDS_POLL_SECONDS, defaults.imds_poll_seconds),
        health_port=number(Env.HEALTH_PORT, defaults.health_port, int),
        drain_margin_seconds=number(Env.DRAIN_MARGIN_SECONDS, defaults.drain_margin_seconds),
        requeue_enabled=_parse_bool(Env.REQUEUE_ENABLED.value, text(Env.REQUEUE_ENABLED, "true")),
        max_failures=number(Env.MAX_FAILURES, defaults.max_failures, int),
        rebalance_policy=policy,
    )
