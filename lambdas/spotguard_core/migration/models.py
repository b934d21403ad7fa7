"""Settings, job records and provider-facing types of the migration job.

The settings are the seed's (``MIGRATION_*`` environment variables, with its ranges from
``contracts``). Job records are what the jobs table stores and what the API returns; the
API's JSON uses the seed's camelCase names, so the models serialise by alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

from spotguard_core import contracts
from spotguard_core.contracts import Env

#: Attempts per instance within one job when ``retry_failed`` is on (1 when it is off).
MAX_ATTEMPTS_WITH_RETRY = 3
#: Back-off before the second attempt; doubled for each later one.
RETRY_BACKOFF_SECONDS = 0.5

LogLevel = Literal["debug", "info", "warn", "error"]
ProviderName = Literal["aws", "novita"]


def _env(name: Env, field_name: str) -> AliasChoices:
    # Read from the contract's environment variable, and accept the field name when built in code.
    return AliasChoices(name.value, field_name)


class MigrationJobSettings(BaseSettings):
    """Runtime settings of the migration job, read from the environment (seed names and ranges).

    (The CDK side's ``stacks.settings.MigrationSettings`` is the ``cdk.json`` section that the
    stack turns into these environment variables.)"""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    enabled: bool = Field(default=True, validation_alias=_env(Env.MIGRATION_ENABLED, "enabled"))
    interval_minutes: int = Field(
        default=15,
        ge=contracts.MIGRATION_INTERVAL_MINUTES_RANGE[0],
        le=contracts.MIGRATION_INTERVAL_MINUTES_RANGE[1],
        validation_alias=_env(Env.MIGRATION_INTERVAL_MINUTES, "interval_minutes"),
    )
    job_timeout_ms: int = Field(
        default=600_000,
        ge=contracts.MIGRATION_JOB_TIMEOUT_MS_RANGE[0],
        le=contracts.MIGRATION_JOB_TIMEOUT_MS_RANGE[1],
        validation_alias=_env(Env.MIGRATION_JOB_TIMEOUT_MS, "job_timeout_ms"),
    )
    max_concurrent: int = Field(
        default=5,
        ge=contracts.MIGRATION_MAX_CONCURRENT_RANGE[0],
        le=contracts.MIGRATION_MAX_CONCURRENT_RANGE[1],
        validation_alias=_env(Env.MIGRATION_MAX_CONCURRENT, "max_concurrent"),
    )
    dry_run: bool = Field(default=False, validation_alias=_env(Env.MIGRATION_DRY_RUN, "dry_run"))
    retry_failed: bool = Field(
        default=True, validation_alias=_env(Env.MIGRATION_RETRY_FAILED, "retry_failed")
    )
    log_level: LogLevel = Field(default="info", validation_alias=_env(Env.MIGRATION_LOG_LEVEL, "log_level"))
    provider: ProviderName = Field(default="aws", validation_alias=_env(Env.MIGRATION_PROVIDER, "provider"))

    @field_validator("log_level", "provider", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def max_attempts(self) -> int:
        return MAX_ATTEMPTS_WITH_RETRY if self.retry_failed else 1

    def describe(self) -> dict[str, Any]:
        """The ``configuration`` block of ``GET /migration/status``: every setting but
        ``enabled`` (the response says that on its own), by its camelCase name."""
        return {to_camel(name): value for name, value in self.model_dump(exclude={"enabled"}).items()}


class JobTrigger(StrEnum):
    SCHEDULED = "scheduled"
    MANUAL = "manual"


class JobStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


class OutcomeKind(StrEnum):
    MIGRATED = "migrated"
    WOULD_MIGRATE = "would_migrate"  # dry run
    FAILED = "failed"
    SKIPPED = "skipped"  # another job is migrating this instance right now
    NOT_STARTED = "not_started"  # the job timed out before this instance's turn
    TIMED_OUT = "timed_out"  # still in flight when the job timed out


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class InstanceOutcome(_CamelModel):
    """What the job did with one eligible instance."""

    instance_id: str
    outcome: OutcomeKind
    new_instance_id: str | None = None
    attempts: int = 0
    duration_ms: int = 0
    error: str | None = None
    details: dict[str, str] = Field(default_factory=dict)


class JobSummary(_CamelModel):
    """The seed's job summary counts."""

    total_instances: int = 0
    eligible_instances: int = 0
    migrated_instances: int = 0
    error_count: int = 0


class CapacityReport(_CamelModel):
    """ASG fleets: what the job found (and did) about capacity the ASG could not restore."""

    asg_name: str
    desired: int
    in_service: int
    #: Desired minus healthy InService instances.
    shortfall: int
    #: The shortfall was already there in the previous job: stuck, not a launch in progress.
    stuck: bool = False
    #: Instance types the job added to the ASG's pools (``SPOTGUARD_FALLBACK_INSTANCE_TYPES``).
    added_instance_types: list[str] = Field(default_factory=list)
    action: str = ""


class JobRecord(_CamelModel):
    """One migration job run: what the jobs table stores and the history API returns."""

    job_id: str
    trigger: JobTrigger
    provider: str
    dry_run: bool
    status: JobStatus = JobStatus.RUNNING
    started_at: datetime
    ended_at: datetime | None = None
    duration_ms: int | None = None
    max_migrations: int | None = None
    summary: JobSummary = Field(default_factory=JobSummary)
    outcomes: list[InstanceOutcome] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    capacity: CapacityReport | None = None

    @property
    def started_key(self) -> str:
        """Sort key: ISO start time first, so a descending Query returns the newest job first."""
        return f"{self.started_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}#{self.job_id}"


@dataclass(frozen=True, slots=True)
class CandidateInstance:
    """An instance as a provider sees it, with the provider's eligibility verdict."""

    instance_id: str
    status: str
    eligible: bool
    #: Why it is (or is not) eligible, for debug logs and dry-run output.
    reason: str
    name: str | None = None
    #: Provider specifics the migration needs (instance type, zone, subnet, raw fields …).
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A successful migration: the instance that now does the work, and provider details."""

    new_instance_id: str
    status: str = "running"
    details: dict[str, str] = field(default_factory=dict)


class MigrationError(Exception):
    """A migration attempt failed. ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def utc_now() -> datetime:
    return datetime.now(UTC)
