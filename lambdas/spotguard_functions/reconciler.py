"""reconciler λ: the scheduled (and on-demand) migration job.

Invoked by the schedule rule (an EventBridge "Scheduled Event") every
``MIGRATION_INTERVAL_MINUTES``, or asynchronously by the API's ``POST /migration/trigger``
with ``{"trigger": "manual", "jobId": …, "dryRun": …, "maxMigrations": …}``. A scheduled
run does nothing while ``MIGRATION_ENABLED`` is false; a manual trigger always runs.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from spotguard_core import aws
from spotguard_core.contracts import Env
from spotguard_core.migration.capacity import CapacityReconciler
from spotguard_core.migration.models import JobTrigger, MigrationJobSettings
from spotguard_core.migration.providers import provider_from_environment
from spotguard_core.migration.runner import MigrationJobRunner
from spotguard_core.migration.store import JobStore

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("reconciler")

#: Time kept back from the Lambda timeout to record the job after it stops.
FINISH_MARGIN_MS = 15_000
_POWERTOOLS_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}


class ManualTrigger(BaseModel):
    """Payload the API sends for ``POST /migration/trigger``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    trigger: JobTrigger = JobTrigger.MANUAL
    job_id: str | None = None
    dry_run: bool = False
    max_migrations: int | None = Field(default=None, ge=1)


def capacity_from_environment(settings: MigrationJobSettings) -> CapacityReconciler | None:
    """ASG fleets on AWS: the job also reconciles capacity the ASG cannot restore."""
    asg_name = os.environ.get(Env.ASG_NAME, "").strip()
    if settings.provider != "aws" or not asg_name:
        return None
    fallback = [t.strip() for t in os.environ.get(Env.FALLBACK_INSTANCE_TYPES, "").split(",") if t.strip()]
    return CapacityReconciler(
        asg_name=asg_name, autoscaling=aws.client("autoscaling"), fallback_instance_types=fallback
    )


def run_job(
    request: ManualTrigger | None,
    *,
    settings: MigrationJobSettings | None = None,
    timeout_ms: int | None = None,
) -> dict[str, Any]:
    """Run one job (``request`` None = scheduled) and return its record as JSON.
    Also used by the API to run a job inline when no reconciler function is configured."""
    settings = settings or MigrationJobSettings()
    logger.setLevel(_POWERTOOLS_LEVELS[settings.log_level])
    if request is None and not settings.enabled:
        logger.info("Migration disabled: scheduled run skipped")
        return {"skipped": True, "reason": "migration disabled (MIGRATION_ENABLED=false)"}
    runner = MigrationJobRunner(
        provider_from_environment(settings.provider),
        JobStore(),
        settings,
        metrics=metrics,
        logger=logger,
        capacity=capacity_from_environment(settings),
    )
    job = runner.run(
        trigger=request.trigger if request else JobTrigger.SCHEDULED,
        dry_run=request.dry_run if request else False,
        max_migrations=request.max_migrations if request else None,
        job_id=request.job_id if request else None,
        timeout_ms=timeout_ms,
    )
    return job.to_json()


@logger.inject_lambda_context(log_event=False)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    manual = isinstance(event, dict) and event.get("trigger") == JobTrigger.MANUAL.value
    request = ManualTrigger.model_validate(event) if manual else None
    remaining = context.get_remaining_time_in_millis() - FINISH_MARGIN_MS
    return run_job(request, timeout_ms=max(remaining, 1_000))
