"""Request and response models of the operations API (JSON shapes of the auto-migration
seed, camelCase). Strict: a request value is accepted only in its own JSON type —
``"yes"`` is not a boolean, ``true`` is not a number, ``" 5"`` and ``"1_000"`` are not
query integers — so what an operator sends is exactly what runs."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from spotguard_core import contracts
from spotguard_core.contracts import FleetRecord, InstanceState
from spotguard_core.migration.models import JobRecord

HISTORY_DEFAULT_LIMIT = 20
HISTORY_MAX_LIMIT = 100
HISTORY_MAX_OFFSET = 10_000
MAX_MIGRATIONS_LIMIT = 1_000
#: Jobs whose errors count toward ``recentErrors`` in the health block.
RECENT_JOBS = 10
#: Anchored form of ``contracts.INSTANCE_ID_PATTERN`` for path parameters.
INSTANCE_ID_PATTERN = rf"^{contracts.INSTANCE_ID_PATTERN}$"
#: Query integers: plain decimal digits, no sign, spaces, underscores or leading zeros.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,8}")


def _decimal_query_integer(value: object) -> object:
    """A query-string value is text; only canonical decimal digits become an int (the int
    bounds then apply). Anything else stays as given and fails the int check."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError("must be a whole number written in decimal digits")
        return int(value)
    return value


#: An integer query parameter (combine with ``Query(ge=…, le=…)``).
QueryInt = Annotated[int, BeforeValidator(_decimal_query_integer)]


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    """Body of every error answer: one message (naming every bad field on a 400), and the list."""

    message: str
    errors: list[ErrorDetail] = Field(default_factory=list)


class MigrationServiceHealth(_Camel):
    enabled: bool
    last_execution: datetime | None
    next_execution: datetime | None
    status: Literal["healthy", "degraded", "disabled"]
    recent_errors: int


class HealthResponse(_Camel):
    status: Literal["healthy", "degraded"]
    timestamp: datetime
    fleet: str
    migration_service: MigrationServiceHealth


class Statistics(_Camel):
    total_executions: int
    successful_executions: int
    failed_executions: int
    average_execution_time: int = Field(description="milliseconds")
    total_migrations: int
    total_instances_processed: int


class Configuration(_Camel):
    interval_minutes: int
    job_timeout_ms: int
    max_concurrent: int
    dry_run: bool
    retry_failed: bool
    log_level: str
    provider: str


class MigrationStatusResponse(_Camel):
    enabled: bool
    statistics: Statistics
    configuration: Configuration
    last_execution: JobRecord | None


class TriggerRequest(_Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)

    dry_run: bool = Field(default=False, description="list and select only; change nothing")
    max_migrations: int | None = Field(
        default=None, ge=1, le=MAX_MIGRATIONS_LIMIT, description="migrate at most this many instances"
    )


class TriggerResponse(_Camel):
    job_id: str = Field(description="the id the job is recorded under in the history")
    status: Literal["accepted"]
    dry_run: bool
    max_migrations: int | None


class HistoryResponse(_Camel):
    jobs: list[JobRecord]
    total: int
    limit: int
    offset: int


class FleetInstance(_Camel):
    instance_id: str
    fleet: str
    state: InstanceState
    bootstrap_status: str
    bootstrap_reason: str | None
    ec2_state: str | None
    instance_type: str | None
    availability_zone: str | None
    launched_at: datetime | None
    ready_at: datetime | None
    heartbeat_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    replaced_by: str | None
    last_signal: dict[str, str] | None

    @classmethod
    def from_record(cls, record: FleetRecord) -> FleetInstance:
        def at(value: float | None) -> datetime | None:
            return datetime.fromtimestamp(value, tz=UTC) if value is not None else None

        return cls(
            instance_id=record.instance_id,
            fleet=record.fleet,
            state=record.state,
            bootstrap_status=record.bootstrap_status.value,
            bootstrap_reason=record.bootstrap_reason,
            ec2_state=record.ec2_state,
            instance_type=record.instance_type,
            availability_zone=record.availability_zone,
            launched_at=at(record.launched_at),
            ready_at=at(record.ready_at),
            heartbeat_at=at(record.heartbeat_at),
            ended_at=at(record.ended_at),
            end_reason=record.end_reason.value if record.end_reason else None,
            replaced_by=record.replaced_by,
            last_signal=record.last_signal,
        )


class FleetResponse(_Camel):
    instances: list[FleetInstance]
    count: int
    skipped: int = Field(
        default=0, description="table items that could not be read (logged and counted, not shown)"
    )
