"""Typed, validated settings read from CDK context.

All settings live under the ``spotguard`` key of ``cdk.json``'s context. Any single
value can be overridden on the command line with a dotted key, for example::

    cdk deploy -c spotguard.fleet.max_capacity=20 -c spotguard.staging.allow_test_events=true

A bad value fails synth with a message naming the setting, what is allowed and
what was given (``ConfigurationError``).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from spotguard_core import contracts, url_safety

CONTEXT_KEY = "spotguard"
#: Closing line of a configuration error, per front door (cdk.json or the construct's props).
CONTEXT_HINT = "Change these values in cdk.json (context 'spotguard') or the -c overrides."
PROPS_HINT = "Change these SpotWorkerFleet props (or the Settings passed as settings=)."

_FLEET_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\d[a-z0-9-]*\.[a-z0-9]+$")
_AMI_ID = re.compile(r"^ami-[0-9a-f]{8,17}$")
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")


class ConfigurationError(ValueError):
    """Invalid spotguard configuration (cdk.json context or ``SpotWorkerFleet`` props); the
    message names each bad setting and says what to change. (The control plane's runtime
    counterpart is ``spotguard_core.control_settings.SettingsError``.)"""


def _matching(pattern: re.Pattern[str], message: str) -> AfterValidator:
    """A string setting (unset allowed) that must match ``pattern``; else ``message``."""

    def check(value: str | None) -> str | None:
        if value is not None and not pattern.match(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _check_instance_types(value: list[str]) -> list[str]:
    bad = [t for t in value if not _INSTANCE_TYPE.match(t)]
    if bad:
        raise ValueError(f"not EC2 instance types: {', '.join(bad)} (expected e.g. m7i.large)")
    return value


def _check_public_url(value: str | None) -> str | None:
    # Secrets go there (a webhook signature, a Bearer key): https, a public host, no
    # userinfo (spotguard_core.url_safety).
    if value is not None:
        url_safety.check_outbound_url(value, allow_loopback=False)
    return value


def _within(bounds: tuple[int, int], default: int) -> Any:
    """An integer setting limited to the contracts' inclusive ``bounds``."""
    return Field(default=default, ge=bounds[0], le=bounds[1])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvironmentSettings(_Section):
    """Account, region and availability zones of the ready app's stack."""

    #: Leave both empty for an environment-agnostic template (the default).
    account: Annotated[str | None, _matching(_ACCOUNT, "must be a 12-digit AWS account id")] = None
    region: Annotated[str | None, _matching(_REGION, "must be an AWS region name such as eu-west-1")] = None
    #: With a region set, the AZs to use (so synth needs no AWS lookup).
    availability_zones: list[str] | None = None


class NetworkSettings(_Section):
    """The VPC: an existing one by id (looked up at synth, needs credentials) or a new one."""

    #: Use an existing VPC (its public subnets) instead of creating one.
    vpc_id: Annotated[str | None, _matching(_VPC_ID, "must look like vpc-0123456789abcdef0")] = None
    max_azs: int = Field(default=2, ge=1, le=6)


class WorkloadSettings(_Section):
    """The user's own code: a local directory shipped as an S3 asset next to the agent bundle.

    Python mode: ``fleet.handler = module:function`` importable from ``path``. Command mode:
    ``command`` is run per message in ``path`` (body on stdin). Exactly one of the two when
    ``path`` is set; without ``path`` the built-in sample handler runs.
    """

    #: Local directory (relative to where ``cdk`` runs): code, optional requirements.txt, wheelhouse/.
    path: str | None = None
    #: Command mode: a shell command line run in the workload directory for each message.
    command: str | None = None
    #: SIGTERM -> SIGKILL grace for a task the agent gives back (command mode and handlers).
    stop_grace_seconds: int = Field(default=contracts.DEFAULT_STOP_GRACE_SECONDS, ge=1, le=110)
    #: Largest checkpoint a task may save; a bigger one is an error, never truncated.
    checkpoint_max_bytes: int = Field(default=contracts.DEFAULT_CHECKPOINT_MAX_BYTES, ge=1024, le=5 * 1024**3)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it unset for Python handler mode)")
        return value


class FleetSettings(_Section):
    """The worker fleet: name, instance types, capacity, image, workload and agent port."""

    name: Annotated[
        str,
        _matching(
            _FLEET_NAME,
            "must be 3-32 characters of lowercase letters, digits and '-', starting with a letter",
        ),
    ] = "default"
    #: Several types across families spread the fleet over more spot pools.
    instance_types: list[str] = Field(
        default_factory=lambda: ["m7i.large", "m6i.large", "m5.large", "c6i.large"]
    )
    min_capacity: int = Field(default=0, ge=0, le=1000)
    max_capacity: int = Field(default=10, ge=1, le=1000)
    #: Initial desired capacity; scaling on backlog adjusts it afterwards.
    desired_capacity: int | None = Field(default=None, ge=0, le=1000)
    on_demand_base_capacity: int = Field(default=0, ge=0, le=1000)
    #: Visible messages per instance the backlog scaling aims for.
    backlog_per_instance: int = Field(default=10, ge=1, le=10_000)
    #: Override the default Amazon Linux 2023 image (resolved from SSM at deploy time).
    ami_id: Annotated[str | None, _matching(_AMI_ID, "must look like ami-0123456789abcdef0")] = None
    root_volume_gb: int = Field(default=20, ge=8, le=16_384)
    #: Python mode: ``module:function`` the worker runs for each message, importable from
    #: ``workload.path``. Unset without a workload: the built-in sample handler.
    handler: Annotated[
        str | None, _matching(_HANDLER, "must be 'module:function', e.g. mypackage.tasks:handle")
    ] = None
    workload: WorkloadSettings = WorkloadSettings()
    concurrency: int = Field(default=contracts.DEFAULT_CONCURRENCY, ge=1, le=64)
    #: Port the bootstrap verifies is listening (the agent's own health endpoint by default;
    #: e.g. 8080 for the code-server box of the seed).
    health_port: int = Field(default=contracts.DEFAULT_HEALTH_PORT, ge=1, le=65_535)
    #: Tag instances for AWS FIS spot-interruption drills (staging).
    fis_target: bool = False
    #: Instance types the reconciler may add to the group's pools when capacity is stuck below
    #: desired (no spot capacity in the configured pools). Empty: it only reports.
    fallback_instance_types: Annotated[list[str], AfterValidator(_check_instance_types)] = Field(
        default_factory=list
    )

    @field_validator("instance_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        if not 1 <= len(value) <= 20:
            raise ValueError("must list between 1 and 20 instance types (several spread spot risk)")
        _check_instance_types(value)
        if len(set(value)) != len(value):
            raise ValueError("lists an instance type twice")
        return value

    @model_validator(mode="after")
    def _workload(self) -> FleetSettings:
        workload = self.workload
        if workload.path is None:
            if workload.command is not None:
                raise ValueError("workload.command needs workload.path (the directory the command runs in)")
            if self.handler not in (None, contracts.DEFAULT_HANDLER):
                raise ValueError(
                    f"handler {self.handler!r} needs workload.path: the directory that holds its "
                    "module (nothing else reaches the instance)"
                )
            return self
        directory = Path(workload.path)
        if not directory.is_dir():
            raise ValueError(
                f"workload.path {workload.path!r} is not a directory (resolved to {directory.resolve()})"
            )
        if (self.handler is None) == (workload.command is None):
            raise ValueError(
                "with workload.path set exactly one of handler (Python mode, module:function) and "
                "workload.command (command mode) must be set; "
                + ("both are" if self.handler is not None else "neither is")
            )
        if self.handler is not None:
            module = self.handler.split(":", 1)[0]
            relative = Path(*module.split("."))
            candidates = (directory / relative.with_suffix(".py"), directory / relative / "__init__.py")
            if not any(c.is_file() for c in candidates):
                raise ValueError(
                    f"handler module {module!r} is not in workload.path {workload.path!r} "
                    f"(expected {candidates[0].relative_to(directory)} or "
                    f"{candidates[1].relative_to(directory)})"
                )
        return self

    @property
    def effective_handler(self) -> str | None:
        """The agent's ``Env.HANDLER``: the user's handler, the sample handler without a workload,
        None in command mode."""
        if self.workload.command is not None:
            return None
        return self.handler or contracts.DEFAULT_HANDLER

    @model_validator(mode="after")
    def _capacity(self) -> FleetSettings:
        if self.min_capacity > self.max_capacity:
            raise ValueError(
                f"min_capacity ({self.min_capacity}) must not exceed max_capacity ({self.max_capacity})"
            )
        if self.desired_capacity is not None and not (
            self.min_capacity <= self.desired_capacity <= self.max_capacity
        ):
            raise ValueError(
                f"desired_capacity ({self.desired_capacity}) must be between min_capacity "
                f"({self.min_capacity}) and max_capacity ({self.max_capacity})"
            )
        if self.on_demand_base_capacity > self.max_capacity:
            raise ValueError("on_demand_base_capacity must not exceed max_capacity")
        return self


class QueueSettings(_Section):
    """The work queue the fleet creates (ready app) and the poison rule."""

    #: Initial visibility timeout; the worker extends it while a task runs.
    visibility_timeout_seconds: int = Field(
        default=contracts.DEFAULT_VISIBILITY_TIMEOUT_SECONDS, ge=30, le=43_200
    )
    retention_days: int = Field(default=4, ge=1, le=14)
    #: Genuine processing failures before a message goes to the DLQ (interruptions do not count).
    max_failures: int = Field(default=contracts.DEFAULT_MAX_FAILURES, ge=1, le=50)
    #: Alarm when the oldest visible work message is older than this.
    max_message_age_seconds: int = Field(default=900, ge=60, le=1_209_600)
    #: Keep the work queue and its DLQ (pending and dead-lettered tasks) on ``cdk destroy``.
    #: Set false to delete them with the stack (their messages are then lost).
    retain_on_delete: bool = True


class BootstrapSettings(_Section):
    """How long an instance may take to become ready."""

    #: An instance not ready this long after boot terminates itself (seed: 20 minutes).
    deadline_minutes: int = Field(default=contracts.DEFAULT_BOOTSTRAP_DEADLINE_MINUTES, ge=3, le=120)


class AgentSettings(_Section):
    """The instance agent's polling and drain margin."""

    imds_poll_seconds: float = Field(default=contracts.DEFAULT_IMDS_POLL_SECONDS, ge=0.2, le=30)
    #: Messages received ahead of free task slots while tasks are short (0 = none).
    prefetch: int = Field(default=contracts.DEFAULT_PREFETCH, ge=0, le=100)
    #: Tasks that cannot finish this long before the interruption deadline are released.
    drain_margin_seconds: int = Field(default=contracts.DEFAULT_DRAIN_MARGIN_SECONDS, ge=0, le=110)


class ControlPlaneSettings(_Section):
    """What the dispatcher and watchdog decide, and the functions' runtime."""

    rebalance_policy: contracts.RebalancePolicy = contracts.RebalancePolicy.REPLACE
    #: Detach an instance from its ASG at the spot warning (desired capacity kept), so the
    #: replacement launches at once instead of after the old instance is gone.
    early_replacement: bool = True
    #: Reserved concurrency of each function (the reconciler always has 1: one job at a time).
    reserved_concurrency: int = Field(default=5, ge=1, le=1000)
    #: The watchdog ends instances whose agent has not heartbeated for this long.
    heartbeat_stale_minutes: int = Field(default=contracts.DEFAULT_HEARTBEAT_STALE_MINUTES, ge=2, le=120)
    #: CloudWatch Logs retention of every function, in days.
    log_retention_days: Literal[1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365] = 30
    #: Version of the public Powertools for AWS Lambda (Python) v3 layer.
    powertools_layer_version: int = Field(default=27, ge=1, le=10_000)
    #: ``public``: the Powertools layer AWS publishes (``powertools_layer_version``).
    #: ``bundled``: a layer built at synth from ``requirements.lock`` (the tested pins; for
    #: partitions or regions without the public layer, and the local emulator), see
    #: ``spotguard_cdk/powertools_layer.py``.
    powertools_layer: Literal["public", "bundled"] = "public"


class MigrationSettings(_Section):
    """The auto-migration seed's settings, with its ranges."""

    enabled: bool = True
    interval_minutes: int = _within(contracts.MIGRATION_INTERVAL_MINUTES_RANGE, default=15)
    job_timeout_ms: int = _within(contracts.MIGRATION_JOB_TIMEOUT_MS_RANGE, default=600_000)
    max_concurrent: int = _within(contracts.MIGRATION_MAX_CONCURRENT_RANGE, default=5)
    dry_run: bool = False
    retry_failed: bool = True
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    provider: Literal["aws", "novita"] = "aws"
    #: Secrets Manager secret name holding the Novita API key (provider "novita" only).
    novita_api_key_secret_name: str | None = None
    #: Where the Bearer key goes: checked like ``notifications.webhook_url``.
    novita_api_url: Annotated[str, AfterValidator(_check_public_url)] = "https://api.novita.ai"

    @model_validator(mode="after")
    def _novita(self) -> MigrationSettings:
        if self.provider == "novita" and not self.novita_api_key_secret_name:
            raise ValueError(
                "provider 'novita' needs novita_api_key_secret_name "
                "(a Secrets Manager secret holding the key)"
            )
        return self


class NotificationSettings(_Section):
    """Signed webhooks."""

    #: HTTPS endpoint that receives signed webhooks; empty disables webhooks.
    webhook_url: Annotated[str | None, AfterValidator(_check_public_url)] = None


class ApiSettings(_Section):
    """The operations API: stage throttling and who may call it."""

    #: Steady-state requests per second for the whole stage, and the burst above it.
    throttle_rate_per_second: int = Field(default=10, ge=1, le=10_000)
    throttle_burst: int = Field(default=20, ge=1, le=5_000)
    #: IAM principal ARNs (roles, users) allowed to call the API. Empty: any IAM-authorised
    #: principal of this account (its identity policy must allow execute-api:Invoke).
    allowed_principal_arns: list[str] = Field(default_factory=list)

    @field_validator("allowed_principal_arns")
    @classmethod
    def _arns(cls, value: list[str]) -> list[str]:
        bad = [arn for arn in value if not re.match(r"^arn:aws[a-z-]*:(iam|sts)::\d{12}:\S+$", arn)]
        if bad:
            raise ValueError(
                f"not IAM principal ARNs: {', '.join(bad)} (e.g. arn:aws:iam::123456789012:role/ops)"
            )
        return value


class ObservabilitySettings(_Section):
    """Where alarms are sent."""

    #: Subscribed to the alarm topic when set.
    alarm_email: Annotated[str | None, _matching(_EMAIL, "must be an email address")] = None


class StagingSettings(_Section):
    """Test events and the AWS FIS experiment (staging only)."""

    #: Rules also accept source ``spotguard.test`` (``spotguard send-test-event``). Staging only.
    allow_test_events: bool = False
    #: Create the AWS FIS experiment template that interrupts the fleet's tagged instances.
    fis_experiment: bool = False


# --- emulator profile (e2e) -------------------------------------------------------------
class EmulatorGap(enum.StrEnum):
    """One thing a local CloudFormation emulator (MiniStack, ``make e2e``) cannot deploy. The
    ``emulator`` profile leaves out exactly these (``Settings.supports``) and nothing else;
    ``tests/infrastructure/test_emulator_profile.py`` lists the resulting template differences."""

    #: "Template format error: Unrecognized resource types: [AWS::EC2::FlowLog]".
    VPC_FLOW_LOGS = "vpc_flow_logs"
    #: "AWS::CloudWatch::Alarm Properties.Metrics (metric math) is not supported": every alarm
    #: on a metric-math expression (the two backlog step-scaling alarms with their step
    #: policies, which only they trigger; the unreadable-items and work-waiting alarms).
    #: Target tracking on backlog per instance and every plain-metric alarm stay.
    METRIC_MATH_ALARMS = "metric_math_alarms"
    #: CDK's ``Custom::VpcRestrictDefaultSG`` is a Node.js function calling
    #: ``@aws-sdk/client-ec2``, which the emulator has no stub for. Nothing uses the default
    #: security group (instances have their own, no ingress), so there is nothing to restrict.
    DEFAULT_SECURITY_GROUP_RESTRICTION = "default_security_group_restriction"
    #: "Template format error: Unrecognized resource types: [AWS::Events::EventBusPolicy]": the
    #: notification bus's deny-all-but-the-control-plane policy. The emulator evaluates no IAM
    #: (its AUTH mode is off), so there the policy would not be enforced anyway.
    EVENT_BUS_POLICY = "event_bus_policy"


EMULATOR_GAPS: frozenset[EmulatorGap] = frozenset(EmulatorGap)


# --- end emulator profile ---------------------------------------------------------------
class Settings(_Section):
    """Every spotguard setting, typed: cdk.json's ``spotguard`` context and the construct's props."""

    #: ``aws`` (default) or ``emulator``: a local CloudFormation emulator for ``make e2e``, which
    #: leaves out the ``EmulatorGap`` features and needs the bundled Powertools layer.
    profile: Literal["aws", "emulator"] = "aws"
    environment: EnvironmentSettings = EnvironmentSettings()
    network: NetworkSettings = NetworkSettings()
    fleet: FleetSettings = FleetSettings()
    queue: QueueSettings = QueueSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    agent: AgentSettings = AgentSettings()
    control_plane: ControlPlaneSettings = ControlPlaneSettings()
    migration: MigrationSettings = MigrationSettings()
    notifications: NotificationSettings = NotificationSettings()
    api: ApiSettings = ApiSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    staging: StagingSettings = StagingSettings()

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        if self.staging.fis_experiment and not self.fleet.fis_target:
            raise ValueError("staging.fis_experiment needs fleet.fis_target = true (FIS targets that tag)")
        if self.queue.visibility_timeout_seconds < self.agent.drain_margin_seconds:
            raise ValueError("queue.visibility_timeout_seconds must be at least agent.drain_margin_seconds")
        if self.network.vpc_id and not (self.environment.account and self.environment.region):
            raise ValueError(
                "network.vpc_id needs environment.account and environment.region (the VPC is looked up "
                "with AWS credentials at synth and cached in cdk.context.json)"
            )
        if self.environment.availability_zones and not self.environment.region:
            raise ValueError("environment.availability_zones needs environment.region")
        if self.profile == "emulator":
            if self.control_plane.powertools_layer != "bundled":
                raise ValueError(
                    "profile 'emulator' needs control_plane.powertools_layer = bundled "
                    "(the public Powertools layer does not exist in the emulator)"
                )
            if self.staging.fis_experiment:
                raise ValueError(
                    "profile 'emulator' cannot deploy AWS::FIS::ExperimentTemplate; set "
                    "staging.fis_experiment = false"
                )
        return self

    def supports(self, feature: EmulatorGap) -> bool:
        """False for a feature the deploy target cannot deploy (``profile = emulator``)."""
        return self.profile != "emulator" or feature not in EMULATOR_GAPS

    @property
    def stack_name(self) -> str:
        """The ready app's stack name, ``Spotguard-<fleet>``."""
        return f"Spotguard-{self.fleet.name}"

    @classmethod
    def from_context(cls, get_context: Any, overrides: Mapping[str, Any] | None = None) -> Settings:
        """Build from a CDK node (``node.try_get_context``) or any ``key -> value`` getter,
        then apply dotted ``overrides`` (see ``overrides_from_context``)."""
        base = get_context(CONTEXT_KEY) or {}
        if isinstance(base, str):  # -c spotguard='{"fleet": …}'
            base = _parse_json(CONTEXT_KEY, base)
        return cls.from_mapping(base, overrides)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *, hint: str = CONTEXT_HINT
    ) -> Settings:
        """Validate ``data`` with dotted ``overrides``; a bad value raises ConfigurationError."""
        merged = _deep_copy(data)
        for dotted, value in (overrides or {}).items():
            _set_dotted(merged, dotted, value)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc, hint)) from None


def overrides_from_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """``spotguard.<section>.<field>`` keys given with ``-c`` (values arrive as strings)."""
    prefix = CONTEXT_KEY + "."
    result: dict[str, Any] = {}
    for key, value in context.items():
        if key.startswith(prefix):
            result[key[len(prefix) :]] = _maybe_json(value)
    return result


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parse_json(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{name}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{name}: must be a JSON object")
    return value


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigurationError(f"{CONTEXT_KEY}.{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal", "greater_than", "less_than"})


def _allowed_range(loc: tuple[int | str, ...]) -> str | None:
    """'must be between 1 and 60' for a numeric field, from its declared bounds."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    info = model.model_fields.get(str(loc[-1]))
    if info is None:
        return None
    low = next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
    if low is None or high is None:
        return None
    return f"must be between {low} and {high}"


def _describe(exc: ValidationError, hint: str = CONTEXT_HINT) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        name = f"{CONTEXT_KEY}.{location}" if location else CONTEXT_KEY
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in _RANGE_ERRORS:
            message = _allowed_range(error["loc"]) or message
        if error["type"] == "extra_forbidden":
            message = "is not a known setting (check the spelling; see README 'Configuration')"
        given = error.get("input")
        shown = "" if error["type"] == "extra_forbidden" or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{name}: {message}{shown}")
    return "invalid spotguard configuration:\n  " + "\n  ".join(lines) + "\n" + hint
