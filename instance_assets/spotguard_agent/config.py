"""Agent settings: one typed class, read from ``contracts.Env`` variables (the installer writes
them to ``/etc/spotguard/agent.env``), overridden by command-line flags.

Each field names its variable once (``env=``) and takes its default from ``contracts``
(``DEFAULT_*``), the same constants the CDK settings use, so the stack, the drill and an
agent started by hand agree. The agent stays standard library + boto3 (no pydantic on the
instance): parsing is driven by the field types, and a bad value raises ``ConfigError``
naming the variable and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from spotguard_core.contracts import (
    DEFAULT_CHECKPOINT_MAX_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_DRAIN_MARGIN_SECONDS,
    DEFAULT_HANDLER,
    DEFAULT_HEALTH_PORT,
    DEFAULT_IMDS_POLL_SECONDS,
    DEFAULT_MAX_FAILURES,
    DEFAULT_PREFETCH,
    DEFAULT_STOP_GRACE_SECONDS,
    DEFAULT_VISIBILITY_TIMEOUT_SECONDS,
    LAUNCH_HOOK_NAME,
    TERMINATE_HOOK_NAME,
    WORKLOAD_DIR,
    Env,
    RebalancePolicy,
    checked_instance_arn_prefix,
    instance_arn_prefix,
    partition_of_region,
)

from spotguard_agent.imds import DEFAULT_IMDS_URL, IDENTITY_DOCUMENT_PATH, ImdsClient, ImdsError

__all__ = ["DEFAULT_HANDLER", "AgentConfig", "ConfigError", "load_config", "with_instance_arn_prefix"]
PARTITION_PATH = "/latest/meta-data/services/partition"
#: SQS allows visibility timeouts up to 12 hours.
MAX_VISIBILITY_TIMEOUT_SECONDS = 43200


class ConfigError(ValueError):
    """Invalid agent configuration; the message says which variable to change."""


def _env(name: Env, default: Any, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    return field(default=default, metadata={"env": name, "min": minimum, "max": maximum})


def _flag(default: Any) -> Any:
    """A setting with no variable of its own (command-line flags and tests set it)."""
    return field(default=default, metadata={})


@dataclass(frozen=True)
class AgentConfig:
    fleet: str = _env(Env.FLEET_NAME, "")
    region: str = _env(Env.REGION, "")
    work_queue_url: str = _env(Env.WORK_QUEUE_URL, "")
    work_dlq_url: str = _env(Env.WORK_DLQ_URL, "")
    lease_table: str = _env(Env.LEASE_TABLE, "")
    fleet_table: str = _env(Env.FLEET_TABLE, "")
    #: Prefix of this instance's table keys (its ARN); empty: read from IMDS at start.
    instance_arn_prefix: str = _env(Env.INSTANCE_ARN_PREFIX, "")
    asg_name: str = _env(Env.ASG_NAME, "")
    launch_hook_name: str = _env(Env.LAUNCH_HOOK_NAME, LAUNCH_HOOK_NAME)
    terminate_hook_name: str = _env(Env.TERMINATE_HOOK_NAME, TERMINATE_HOOK_NAME)
    handler: str = _env(Env.HANDLER, DEFAULT_HANDLER)
    #: Command mode (exclusive with an explicit handler): run in ``workload_dir`` per message.
    command: str = _env(Env.COMMAND, "")
    workload_dir: str = _env(Env.WORKLOAD_DIR, WORKLOAD_DIR)
    #: The workload venv's python; empty: the agent's own.
    workload_python: str = _env(Env.WORKLOAD_PYTHON, "")
    stop_grace_seconds: float = _env(Env.STOP_GRACE_SECONDS, float(DEFAULT_STOP_GRACE_SECONDS), minimum=0)
    checkpoint_bucket: str = _env(Env.CHECKPOINT_BUCKET, "")
    checkpoint_max_bytes: int = _env(Env.CHECKPOINT_MAX_BYTES, DEFAULT_CHECKPOINT_MAX_BYTES, minimum=0)
    log_group: str = _env(Env.LOG_GROUP, "")
    concurrency: int = _env(Env.CONCURRENCY, DEFAULT_CONCURRENCY, minimum=1, maximum=1000)
    #: Messages received ahead of the free task slots while tasks are short (0: none).
    prefetch: int = _env(Env.PREFETCH, DEFAULT_PREFETCH, minimum=0, maximum=100)
    visibility_timeout_seconds: int = _env(
        Env.VISIBILITY_TIMEOUT_SECONDS,
        DEFAULT_VISIBILITY_TIMEOUT_SECONDS,
        minimum=0,
        maximum=MAX_VISIBILITY_TIMEOUT_SECONDS,
    )
    imds_url: str = _env(Env.IMDS_URL, DEFAULT_IMDS_URL)
    imds_poll_seconds: float = _env(Env.IMDS_POLL_SECONDS, DEFAULT_IMDS_POLL_SECONDS, minimum=0.05)
    #: 0 picks a free port (tests, the drill).
    health_port: int = _env(Env.HEALTH_PORT, DEFAULT_HEALTH_PORT, minimum=0, maximum=65535)
    drain_margin_seconds: float = _env(
        Env.DRAIN_MARGIN_SECONDS, float(DEFAULT_DRAIN_MARGIN_SECONDS), minimum=0
    )
    requeue_enabled: bool = _env(Env.REQUEUE_ENABLED, True)
    max_failures: int = _env(Env.MAX_FAILURES, DEFAULT_MAX_FAILURES, minimum=1)
    rebalance_policy: RebalancePolicy = _env(Env.REBALANCE_POLICY, RebalancePolicy.REPLACE)  # noqa: RUF009 - a field()
    #: Long-poll wait per receive. Short, so a drain never waits long for a receive to return.
    receive_wait_seconds: int = _flag(1)
    #: First release delay after a failure; doubles per genuine failure, capped at 15 min.
    failure_backoff_seconds: float = _flag(10.0)
    #: Fleet record heartbeat, which also carries the control plane's drain order back.
    fleet_heartbeat_seconds: float = _flag(5.0)
    #: Scale-in protection is cleared only after this long without a lease (no flapping).
    protection_idle_seconds: float = _flag(10.0)
    #: Set on ``report``/``run`` from IMDS when not given.
    instance_id: str = _flag("")

    def with_overrides(self, **overrides: Any) -> AgentConfig:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in known and v is not None})

    def validate_worker(self) -> None:
        missing = [
            env.value
            for env, value in ((Env.WORK_QUEUE_URL, self.work_queue_url), (Env.LEASE_TABLE, self.lease_table))
            if not value
        ]
        if missing:
            raise ConfigError(
                f"set {', '.join(missing)} (in {Env.AGENT_CONFIG_PARAMETER} or the environment)"
            )
        if not self.command and ":" not in self.handler:
            raise ConfigError(f"{Env.HANDLER} must be 'module:function', got {self.handler!r}")
        for spec in fields(self):
            _check_range(spec.name, spec.metadata, getattr(self, spec.name))


def _check_range(name: str, metadata: Mapping[str, Any], value: Any) -> None:
    label = metadata["env"].value if metadata.get("env") else name
    low, high = metadata.get("min"), metadata.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{label} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{label} must be <= {high}, got {value}")


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("true or false")


def _parse_policy(raw: str) -> RebalancePolicy:
    try:
        return RebalancePolicy(raw.strip())
    except ValueError:
        raise ValueError("one of " + ", ".join(p.value for p in RebalancePolicy)) from None


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("a whole number") from None


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("a number") from None


#: Parsers by field annotation (``from __future__ import annotations``: they are strings).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "RebalancePolicy": _parse_policy,
}


def load_config(environ: Mapping[str, str] | None = None) -> AgentConfig:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in fields(AgentConfig):
        name: Env | None = spec.metadata.get("env")
        if name is None:
            continue
        raw = env.get(name.value, "")
        if raw == "":
            continue
        try:
            values[spec.name] = _PARSERS[str(spec.type)](raw)
        except ValueError as error:
            raise ConfigError(f"{name.value} must be {error}, got {raw!r}") from None
    if "region" not in values:
        values["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    if values.get("command") and values.get("handler"):
        raise ConfigError(f"set {Env.HANDLER.value} or {Env.COMMAND.value}, not both")
    config = AgentConfig(**values)
    for spec in fields(config):
        if spec.metadata.get("env") is not None:
            _check_range(spec.name, spec.metadata, getattr(config, spec.name))
    return config


def with_instance_arn_prefix(config: AgentConfig, imds: ImdsClient) -> AgentConfig:
    """``config`` with ``instance_arn_prefix`` set: the one built at synth (agent config), else
    from IMDS (identity document region and account, ``services/partition``; without that
    path, the partition of the region). The instance role allows lease and fleet-record
    writes only under this instance's ARN, so a wrong prefix fails fast here."""
    if not config.instance_arn_prefix:
        document = imds.get(IDENTITY_DOCUMENT_PATH)
        if not document.found:
            raise ImdsError("IMDS has no instance identity document")
        try:
            identity = document.json()
            region, account_id = str(identity["region"]), str(identity["accountId"])
        except (ValueError, KeyError, TypeError) as error:
            raise ImdsError(f"IMDS identity document unreadable: {error}") from error
        partition = imds.optional_text(PARTITION_PATH) or partition_of_region(region)
        config = replace(
            config,
            instance_arn_prefix=instance_arn_prefix(
                partition=partition, region=region, account_id=account_id
            ),
        )
    try:
        checked_instance_arn_prefix(config.instance_arn_prefix)
    except RuntimeError as error:
        raise ConfigError(str(error)) from None
    return config
