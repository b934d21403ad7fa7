"""Every runtime environment spotguard sets, built in one place.

The stack (``spotguard_cdk``), the local drill and the test environments all build the
control-plane functions' environment and the agent's configuration here, so a variable
is named, formatted and defaulted once. Values may be CDK tokens (strings) at synth or
real names on the emulator. Defaults come from ``contracts.DEFAULT_*``.

Standard library only: the drill and tests import it without CDK, the Lambda asset ships it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from spotguard_core import contracts
from spotguard_core.contracts import Env, RebalancePolicy


def flag(value: bool) -> str:
    """Booleans as the runtime parsers read them."""
    return "true" if value else "false"


@dataclass(frozen=True, slots=True)
class FleetResources:
    """Names of one fleet's AWS resources (CDK tokens at synth, real names on the emulator)."""

    fleet: str
    region: str
    work_queue_url: str
    work_dlq_url: str
    lease_table: str
    fleet_table: str
    asg_name: str = ""
    account_id: str = ""
    signal_queue_url: str = ""
    jobs_table: str = ""
    idempotency_table: str = ""
    notification_bus: str = ""
    #: ``contracts.instance_arn_prefix``: the stack passes it built from CDK tokens (partition
    #: included); the drill and tests get it from region and account (the region's partition).
    instance_arn_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.asg_name:
            object.__setattr__(self, "asg_name", contracts.asg_name(self.fleet))
        if not self.instance_arn_prefix and self.region and self.account_id:
            prefix = contracts.instance_arn_prefix(
                partition=contracts.partition_of_region(self.region),
                region=self.region,
                account_id=self.account_id,
            )
            object.__setattr__(self, "instance_arn_prefix", prefix)


@dataclass(frozen=True, slots=True)
class ControlOptions:
    """What the dispatcher and watchdog decide with (``control_settings.ControlSettings`` reads it)."""

    rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE
    early_replacement: bool = True
    heartbeat_stale_seconds: int = contracts.DEFAULT_HEARTBEAT_STALE_MINUTES * 60
    bootstrap_deadline_seconds: int = contracts.DEFAULT_BOOTSTRAP_DEADLINE_MINUTES * 60
    max_failures: int = contracts.DEFAULT_MAX_FAILURES
    requeue_enabled: bool = True
    #: Staging only: the dispatcher accepts ``spotguard.test`` events (else it rejects them).
    allow_test_events: bool = False
    #: Drain time of an instance replaced early; how long a detached instance waits for its
    #: replacement before it drains anyway.
    retire_drain_seconds: int = contracts.DEFAULT_RETIRE_DRAIN_SECONDS
    replacement_wait_seconds: int = contracts.DEFAULT_REPLACEMENT_WAIT_SECONDS


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """The auto-migration seed's settings (reconciler and api)."""

    enabled: bool = True
    interval_minutes: int = 15
    job_timeout_ms: int = 600_000
    max_concurrent: int = 5
    dry_run: bool = False
    retry_failed: bool = True
    log_level: str = "info"
    provider: str = "aws"
    novita_api_key_secret_arn: str | None = None
    novita_api_url: str | None = None
    #: Instance types the job may add to the ASG's pools when capacity is stuck.
    fallback_instance_types: tuple[str, ...] = ()


def control_plane_env(resources: FleetResources, options: ControlOptions) -> dict[str, str]:
    """Environment every control-plane function gets (dispatcher, watchdog, reconciler, api, notifier)."""
    env = {
        Env.FLEET_NAME: resources.fleet,
        Env.REGION: resources.region,
        Env.ACCOUNT_ID: resources.account_id,
        Env.WORK_QUEUE_URL: resources.work_queue_url,
        Env.WORK_DLQ_URL: resources.work_dlq_url,
        Env.SIGNAL_QUEUE_URL: resources.signal_queue_url,
        Env.LEASE_TABLE: resources.lease_table,
        Env.FLEET_TABLE: resources.fleet_table,
        Env.INSTANCE_ARN_PREFIX: resources.instance_arn_prefix,
        Env.JOBS_TABLE: resources.jobs_table,
        Env.IDEMPOTENCY_TABLE: resources.idempotency_table,
        Env.ASG_NAME: resources.asg_name,
        Env.NOTIFICATION_BUS: resources.notification_bus,
        Env.REBALANCE_POLICY: options.rebalance_policy.value,
        Env.EARLY_REPLACEMENT: flag(options.early_replacement),
        Env.HEARTBEAT_STALE_SECONDS: str(options.heartbeat_stale_seconds),
        Env.BOOTSTRAP_DEADLINE_SECONDS: str(options.bootstrap_deadline_seconds),
        Env.MAX_FAILURES: str(options.max_failures),
        Env.REQUEUE_ENABLED: flag(options.requeue_enabled),
        Env.ALLOW_TEST_EVENTS: flag(options.allow_test_events),
        Env.RETIRE_DRAIN_SECONDS: str(options.retire_drain_seconds),
        Env.REPLACEMENT_WAIT_SECONDS: str(options.replacement_wait_seconds),
    }
    return {str(key): value for key, value in env.items() if value != ""}


def migration_env(options: MigrationOptions) -> dict[str, str]:
    """The seed's settings, for the api (status) and the reconciler."""
    return {
        Env.MIGRATION_ENABLED.value: flag(options.enabled),
        Env.MIGRATION_INTERVAL_MINUTES.value: str(options.interval_minutes),
        Env.MIGRATION_JOB_TIMEOUT_MS.value: str(options.job_timeout_ms),
        Env.MIGRATION_MAX_CONCURRENT.value: str(options.max_concurrent),
        Env.MIGRATION_DRY_RUN.value: flag(options.dry_run),
        Env.MIGRATION_RETRY_FAILED.value: flag(options.retry_failed),
        Env.MIGRATION_LOG_LEVEL.value: options.log_level,
        Env.MIGRATION_PROVIDER.value: options.provider,
    }


#: The seed's log level names as Powertools spells them.
_POWERTOOLS_LOG_LEVEL = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}


def reconciler_env(options: MigrationOptions, *, launch_template_id: str, subnet_ids: str) -> dict[str, str]:
    """The reconciler's extras: migration settings, launch template, subnets, provider secrets."""
    env = {
        **migration_env(options),
        Env.LAUNCH_TEMPLATE_ID.value: launch_template_id,
        Env.SUBNET_IDS.value: subnet_ids,
        "POWERTOOLS_LOG_LEVEL": _POWERTOOLS_LOG_LEVEL.get(options.log_level, options.log_level.upper()),
    }
    if options.fallback_instance_types:
        env[Env.FALLBACK_INSTANCE_TYPES.value] = ",".join(options.fallback_instance_types)
    if options.novita_api_key_secret_arn:
        env[Env.NOVITA_API_KEY_SECRET_ARN.value] = options.novita_api_key_secret_arn
        env[Env.NOVITA_API_URL.value] = options.novita_api_url or ""
    return env


def notifier_env(*, webhook_url: str | None, webhook_secret_arn: str | None) -> dict[str, str]:
    if not (webhook_url and webhook_secret_arn):
        return {}
    return {Env.WEBHOOK_URL.value: webhook_url, Env.WEBHOOK_SECRET_ARN.value: webhook_secret_arn}


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """The agent's settings; defaults are the agent's own (``contracts.DEFAULT_*``)."""

    handler: str | None = contracts.DEFAULT_HANDLER
    command: str | None = None
    concurrency: int = contracts.DEFAULT_CONCURRENCY
    prefetch: int = contracts.DEFAULT_PREFETCH
    visibility_timeout_seconds: int = contracts.DEFAULT_VISIBILITY_TIMEOUT_SECONDS
    imds_poll_seconds: float = contracts.DEFAULT_IMDS_POLL_SECONDS
    health_port: int = contracts.DEFAULT_HEALTH_PORT
    bootstrap_deadline_seconds: int = contracts.DEFAULT_BOOTSTRAP_DEADLINE_MINUTES * 60
    rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE
    max_failures: int = contracts.DEFAULT_MAX_FAILURES
    drain_margin_seconds: int = contracts.DEFAULT_DRAIN_MARGIN_SECONDS
    stop_grace_seconds: int = contracts.DEFAULT_STOP_GRACE_SECONDS
    checkpoint_max_bytes: int = contracts.DEFAULT_CHECKPOINT_MAX_BYTES
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentResources:
    """Where the agent's data lives; the workload and checkpoint entries are optional."""

    fleet: FleetResources
    workload_url: str | None = None
    workload_sha256: str | None = None
    checkpoint_bucket: str | None = None
    log_group: str | None = None


def agent_config(resources: AgentResources, options: AgentOptions) -> dict[str, str]:
    """The agent's configuration (the SSM parameter the installer reads), by ``Env`` name.

    Exactly one of ``HANDLER`` (Python mode) and ``COMMAND`` (command mode) is present.
    """
    if (options.handler is None) == (options.command is None):
        raise ValueError("the agent runs exactly one of a handler and a command")
    fleet = resources.fleet
    env: dict[str, str | None] = {
        Env.FLEET_NAME: fleet.fleet,
        Env.REGION: fleet.region,
        Env.WORK_QUEUE_URL: fleet.work_queue_url,
        Env.WORK_DLQ_URL: fleet.work_dlq_url,
        Env.LEASE_TABLE: fleet.lease_table,
        Env.FLEET_TABLE: fleet.fleet_table,
        Env.INSTANCE_ARN_PREFIX: fleet.instance_arn_prefix or None,
        Env.ASG_NAME: fleet.asg_name,
        Env.LAUNCH_HOOK_NAME: contracts.LAUNCH_HOOK_NAME,
        Env.TERMINATE_HOOK_NAME: contracts.TERMINATE_HOOK_NAME,
        Env.HANDLER: options.handler,
        Env.COMMAND: options.command,
        Env.CONCURRENCY: str(options.concurrency),
        Env.PREFETCH: str(options.prefetch),
        Env.VISIBILITY_TIMEOUT_SECONDS: str(options.visibility_timeout_seconds),
        Env.IMDS_POLL_SECONDS: str(options.imds_poll_seconds),
        Env.HEALTH_PORT: str(options.health_port),
        Env.BOOTSTRAP_DEADLINE_SECONDS: str(options.bootstrap_deadline_seconds),
        Env.REBALANCE_POLICY: options.rebalance_policy.value,
        Env.MAX_FAILURES: str(options.max_failures),
        Env.DRAIN_MARGIN_SECONDS: str(options.drain_margin_seconds),
        Env.STOP_GRACE_SECONDS: str(options.stop_grace_seconds),
        Env.CHECKPOINT_MAX_BYTES: str(options.checkpoint_max_bytes),
        Env.WORKLOAD_URL: resources.workload_url,
        Env.WORKLOAD_SHA256: resources.workload_sha256,
        Env.CHECKPOINT_BUCKET: resources.checkpoint_bucket,
        Env.LOG_GROUP: resources.log_group,
    }
    result = {str(key): value for key, value in env.items() if value is not None}
    result.update(options.extra)
    return result
