"""What the operations API answers: health, migration status and history, fleet views and
the trigger. Plain functions over the stores; nothing here knows about Lambda or HTTP
(the api handler routes to these and turns the results into responses)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from spotguard_core.contracts import FLEET_TABLE_PK, FleetRecord, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import JobStatus, JobTrigger, MigrationJobSettings
from spotguard_core.migration.store import JobStore, new_job_id
from spotguard_core.ops_models import (
    RECENT_JOBS,
    Configuration,
    FleetInstance,
    FleetResponse,
    HealthResponse,
    HistoryResponse,
    MigrationServiceHealth,
    MigrationStatusResponse,
    Statistics,
    TriggerRequest,
    TriggerResponse,
)

_log = logging.getLogger(__name__)
#: Errors that mean "this table item is not a fleet record we can read" (not an outage).
UNREADABLE_ITEM_ERRORS: tuple[type[Exception], ...] = (KeyError, ValueError, TypeError, ArithmeticError)


def health(
    *, fleet: str, settings: MigrationJobSettings, store: JobStore, now: datetime | None = None
) -> HealthResponse:
    recent = store.latest(RECENT_JOBS)
    last = recent[0] if recent else None
    recent_errors = sum(job.summary.error_count for job in recent)
    service_status: Literal["healthy", "degraded", "disabled"]
    if not settings.enabled:
        service_status = "disabled"
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
        timestamp=now or datetime.now(UTC),
        fleet=fleet,
        migration_service=MigrationServiceHealth(
            enabled=settings.enabled,
            last_execution=last.started_at if last else None,
            next_execution=next_execution,
            status=service_status,
            recent_errors=recent_errors,
        ),
    )


def migration_status(*, settings: MigrationJobSettings, store: JobStore) -> MigrationStatusResponse:
    latest = store.latest(1)
    return MigrationStatusResponse(
        enabled=settings.enabled,
        statistics=Statistics.model_validate(store.statistics().to_json()),
        configuration=Configuration.model_validate(settings.describe()),
        last_execution=latest[0] if latest else None,
    )


def history(*, store: JobStore, limit: int, offset: int) -> HistoryResponse:
    page = store.history(limit=limit, offset=offset)
    return HistoryResponse(jobs=page.jobs, total=page.total, limit=page.limit, offset=page.offset)


# ------------------------------------------------------------------------------ trigger
#: Sends the reconciler its manual-trigger payload (asynchronously in production).
ReconcilerInvoker = Callable[[Mapping[str, Any]], None]


def trigger(request: TriggerRequest, invoke: ReconcilerInvoker) -> TriggerResponse:
    """Hand a manual job to the reconciler; the answer carries the id it will be recorded
    under (follow it in the history)."""
    job_id = new_job_id()
    # The reconciler reads this as its ManualTrigger (spotguard_functions.reconciler).
    invoke(
        {
            "trigger": JobTrigger.MANUAL.value,
            "jobId": job_id,
            "dryRun": request.dry_run,
            "maxMigrations": request.max_migrations,
        }
    )
    return TriggerResponse(
        job_id=job_id, status="accepted", dry_run=request.dry_run, max_migrations=request.max_migrations
    )


# ------------------------------------------------------------------------------ fleet
@dataclass(frozen=True, slots=True)
class Unreadable:
    """A fleet table item that is not a readable record (kept for the log line)."""

    key: str
    error: str


def _parse(item: Mapping[str, Any]) -> FleetRecord | Unreadable:
    try:
        return FleetRecord.from_item(item)
    except UNREADABLE_ITEM_ERRORS as exc:
        key = item.get(FLEET_TABLE_PK) if isinstance(item, Mapping) else None
        return Unreadable(key=str(key)[:64], error=f"{type(exc).__name__}: {exc}"[:200])


def _items(store: FleetStore, states: list[InstanceState] | None) -> Iterator[Mapping[str, Any]]:
    # FleetStore.scan parses as it goes and stops at the first bad item; the views read the
    # raw pages so one bad item costs one skipped row, not the whole answer.
    kwargs: dict[str, Any] = {}
    if states is not None:
        from boto3.dynamodb.conditions import Attr  # noqa: PLC0415 - only for a filtered scan

        kwargs["FilterExpression"] = Attr("state").is_in([s.value for s in states])
    while True:
        page = store.table.scan(**kwargs)
        yield from page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def fleet(
    *,
    store: FleetStore,
    state: InstanceState | None,
    on_unreadable: Callable[[Unreadable], None] | None = None,
) -> FleetResponse:
    instances: list[FleetInstance] = []
    skipped = 0
    for item in _items(store, [state] if state is not None else None):
        parsed = _parse(item)
        if isinstance(parsed, Unreadable):
            skipped += 1
            (on_unreadable or _log_unreadable)(parsed)
            continue
        instances.append(FleetInstance.from_record(parsed))
    instances.sort(key=lambda instance: instance.instance_id)
    return FleetResponse(instances=instances, count=len(instances), skipped=skipped)


class UnreadableRecordError(Exception):
    """The instance's fleet record exists but cannot be read."""

    def __init__(self, unreadable: Unreadable) -> None:
        super().__init__(f"the fleet record of {unreadable.key} cannot be read")
        self.unreadable = unreadable


def fleet_instance(*, store: FleetStore, instance_id: str) -> FleetInstance | None:
    """One instance; None when spotguard has no record of it; ``UnreadableRecordError``
    when the record is there but unreadable."""
    item = store.get_item(instance_id)
    if not item:
        return None
    parsed = _parse(item)
    if isinstance(parsed, Unreadable):
        raise UnreadableRecordError(parsed)
    return FleetInstance.from_record(parsed)


def _log_unreadable(unreadable: Unreadable) -> None:
    _log.warning("Unreadable fleet record skipped: %s (%s)", unreadable.key, unreadable.error)
