"""api λ: the operations API behind API Gateway (IAM auth).

Routes (JSON shapes of the auto-migration seed, camelCase):

- ``GET  /health``                       service health with the ``migrationService`` block
- ``GET  /migration/status``             enabled, statistics, configuration, last execution
- ``POST /migration/trigger``            ``{"dryRun": bool, "maxMigrations": n}`` → 202 + job id
- ``GET  /migration/history``            ``?limit=1..100&offset=0..10000``
- ``GET  /fleet``, ``GET /fleet/{instanceId}``  fleet records (state, bootstrap, last signal)

Requests are validated by Powertools (pydantic); invalid input gets 400 with a message
naming each bad field. The OpenAPI document (docs/openapi.json) is generated from these
routes by ``openapi_json()``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from spotguard_core import aws
from spotguard_core.contracts import Env, FleetRecord, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import JobRecord, JobStatus, JobTrigger, MigrationJobSettings
from spotguard_core.migration.store import JobStore, new_job_id

from spotguard_functions.observability import powertools

logger, _metrics, tracer = powertools("api")
app = APIGatewayRestResolver(enable_validation=True)

API_TITLE = "spotguard operations API"
API_VERSION = "1.0.0"
HISTORY_MAX_LIMIT = 100
HISTORY_MAX_OFFSET = 10_000
MAX_MIGRATIONS_LIMIT = 1_000
#: Jobs whose errors count toward ``recentErrors`` in the health block.
RECENT_JOBS = 10
INSTANCE_ID_PATTERN = r"^i-[0-9a-f]{8,17}$"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# ------------------------------------------------------------------------------ models
class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    """Body of a 400 answer: one message naming every bad field, and the list."""

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
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    dry_run: bool = Field(default=False, description="list and select only; change nothing")
    max_migrations: int | None = Field(
        default=None, ge=1, le=MAX_MIGRATIONS_LIMIT, description="migrate at most this many instances"
    )


class TriggerResponse(_Camel):
    job_id: str
    status: Literal["accepted", "running", "completed", "failed", "timed_out"]
    dry_run: bool
    max_migrations: int | None
    job: JobRecord | None = Field(
        default=None, description="the finished job when it ran inline (no reconciler function)"
    )


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


# ------------------------------------------------------------------------------ errors
@app.exception_handler(RequestValidationError)
def _bad_request(error: RequestValidationError) -> Response[str]:
    problems = []
    for item in error.errors():
        location = ".".join(
            str(part) for part in item.get("loc", ()) if part != "body" or len(item["loc"]) == 1
        )
        problems.append({"field": location or "body", "message": item.get("msg", "invalid")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return Response(
        status_code=400,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps({"message": f"invalid request: {summary}", "errors": problems}),
    )


# ------------------------------------------------------------------------------ routes
@app.get("/health", summary="Service health, including the migration service block")
def get_health() -> HealthResponse:
    settings = MigrationJobSettings()
    recent = JobStore().latest(RECENT_JOBS)
    last = recent[0] if recent else None
    recent_errors = sum(job.summary.error_count for job in recent)
    if not settings.enabled:
        service_status: Literal["healthy", "degraded", "disabled"] = "disabled"
    elif last is not None and last.status in (JobStatus.FAILED, JobStatus.TIMED_OUT):
        service_status = "degraded"
    else:
        service_status = "healthy"
    last_scheduled = next((job for job in recent if job.trigger is JobTrigger.SCHEDULED), None)
    next_execution = (
        last_scheduled.started_at + timedelta(minutes=settings.interval_minutes)
        if settings.enabled and last_scheduled is not None
        else None
    )
    return HealthResponse(
        status="degraded" if service_status == "degraded" else "healthy",
        timestamp=datetime.now(UTC),
        fleet=os.environ.get(Env.FLEET_NAME, ""),
        migration_service=MigrationServiceHealth(
            enabled=settings.enabled,
            last_execution=last.started_at if last else None,
            next_execution=next_execution,
            status=service_status,
            recent_errors=recent_errors,
        ),
    )


@app.get("/migration/status", summary="Migration service status, statistics and configuration")
def get_migration_status() -> MigrationStatusResponse:
    settings = MigrationJobSettings()
    store = JobStore()
    stats = store.statistics()
    latest = store.latest(1)
    return MigrationStatusResponse(
        enabled=settings.enabled,
        statistics=Statistics.model_validate(stats.to_json()),
        configuration=Configuration.model_validate(settings.describe()),
        last_execution=latest[0] if latest else None,
    )


@app.post(
    "/migration/trigger",
    summary="Run a migration job now",
    responses={
        202: {
            "description": "accepted: the reconciler runs the job asynchronously",
            "content": {"application/json": {"model": TriggerResponse}},
        },
        200: {
            "description": "ran inline (no reconciler function configured): the finished job",
            "content": {"application/json": {"model": TriggerResponse}},
        },
    },
)
def post_migration_trigger(request: TriggerRequest) -> Response[TriggerResponse]:
    job_id = new_job_id()
    function = os.environ.get(Env.RECONCILER_FUNCTION)
    if function:
        payload = {
            "trigger": JobTrigger.MANUAL.value,
            "jobId": job_id,
            "dryRun": request.dry_run,
            "maxMigrations": request.max_migrations,
        }
        aws.client("lambda").invoke(
            FunctionName=function, InvocationType="Event", Payload=json.dumps(payload).encode()
        )
        logger.info("Migration job triggered", extra={"jobId": job_id, "function": function})
        body = TriggerResponse(
            job_id=job_id, status="accepted", dry_run=request.dry_run, max_migrations=request.max_migrations
        )
        return Response(status_code=202, content_type=content_types.APPLICATION_JSON, body=body)
    # No reconciler function configured (local runs): run the job here and return it.
    from spotguard_functions.reconciler import ManualTrigger, run_job  # noqa: PLC0415 - only on this path

    result = run_job(
        ManualTrigger(job_id=job_id, dry_run=request.dry_run, max_migrations=request.max_migrations)
    )
    job = JobRecord.model_validate(result)
    body = TriggerResponse(
        job_id=job_id,
        status=job.status.value,
        dry_run=job.dry_run,
        max_migrations=request.max_migrations,
        job=job,
    )
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=body)


@app.get("/migration/history", summary="Migration jobs, newest first")
def get_migration_history(
    limit: Annotated[int, Query(ge=1, le=HISTORY_MAX_LIMIT, description="jobs per page")] = 20,
    offset: Annotated[int, Query(ge=0, le=HISTORY_MAX_OFFSET, description="jobs to skip")] = 0,
) -> HistoryResponse:
    page = JobStore().history(limit=limit, offset=offset)
    return HistoryResponse(jobs=page.jobs, total=page.total, limit=page.limit, offset=page.offset)


@app.get("/fleet", summary="Fleet records of managed instances")
def get_fleet(
    state: Annotated[InstanceState | None, Query(description="only instances in this state")] = None,
) -> FleetResponse:
    records = FleetStore().scan([state] if state is not None else None)
    instances = sorted((FleetInstance.from_record(r) for r in records), key=lambda i: i.instance_id)
    return FleetResponse(instances=instances, count=len(instances))


@app.get("/fleet/<instanceId>", summary="One managed instance")
def get_fleet_instance(
    instanceId: Annotated[str, Path(pattern=INSTANCE_ID_PATTERN, description="EC2 instance id")],
) -> FleetInstance:
    record = FleetStore().get(instanceId)
    if record is None:
        raise NotFoundError(f"instance {instanceId} is not managed by spotguard")
    return FleetInstance.from_record(record)


def openapi_json() -> str:
    """The OpenAPI document of this API (committed as docs/openapi.json).

    Powertools documents request validation errors as 422; this API answers 400 with
    ``ErrorResponse`` (the exception handler above), so the document says so.
    """
    document = json.loads(
        app.get_openapi_json_schema(
            title=API_TITLE,
            version=API_VERSION,
            description="Operations API of spotguard. Every request must be signed with AWS SigV4 "
            "(API Gateway IAM authorization, service 'execute-api').",
        )
    )
    bad_request = {
        "description": "invalid request (the message names each bad field)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = bad_request
            if str(operation.get("operationId", "")).startswith("get_fleet_instance"):
                responses["404"] = {
                    "description": "instance not managed by spotguard",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                }
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


# No custom metrics here: API Gateway's own metrics (4xx, 5xx, latency) feed the dashboard.
@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)


if __name__ == "__main__":  # regenerate: python -m spotguard_functions.api > docs/openapi.json
    sys.stdout.write(openapi_json())
