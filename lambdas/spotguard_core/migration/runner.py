"""The migration job: list, select, migrate (bounded concurrency), record, notify.

One run of the seed's scheduled job. It knows nothing about Lambda: the reconciler
function builds a provider, a store and the settings and calls ``run``.

- At most ``max_concurrent`` migrations are in flight at any moment (a thread pool of
  that size; providers are I/O bound).
- Dry run lists and selects but changes nothing (outcome ``would_migrate``). A trigger
  can ask for a dry run; it cannot turn a configured dry run off.
- With ``retry_failed`` a failed migration is retried within the job (bounded attempts,
  exponential back-off); a non-retryable error (e.g. bad credentials) is not. Instances
  that still fail stay eligible and are picked up again by the next job.
- The job stops at its timeout: instances not started are ``not_started``, migrations
  still in flight are ``timed_out`` and the job's status is ``timed_out``.
- A job whose reconciler crashed (or hit the Lambda timeout) stays ``running`` in the jobs
  table: every job first ends such records as ``failed`` with the reason, once they are
  older than any job may run (``job_timeout_ms`` plus a margin).
- ASG fleets: with a ``CapacityReconciler`` the job also reports (and, if stuck, widens)
  capacity the ASG could not restore (``migration.capacity``), in the job record's ``capacity``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from spotguard_core import notifications
from spotguard_core.contracts import EndReason, Metric, NotificationType
from spotguard_core.migration.capacity import CapacityReconciler
from spotguard_core.migration.models import (
    RETRY_BACKOFF_SECONDS,
    CandidateInstance,
    InstanceOutcome,
    JobRecord,
    JobStatus,
    JobSummary,
    JobTrigger,
    MigrationError,
    MigrationJobSettings,
    OutcomeKind,
    utc_now,
)
from spotguard_core.migration.providers import MigrationProvider
from spotguard_core.migration.store import JobStore, new_job_id
from spotguard_core.ports import MetricsSink

Publisher = Callable[[NotificationType, Mapping[str, Any]], bool]
#: A job record still ``running`` this long after its timeout has lost its reconciler.
ABANDONED_MARGIN_SECONDS = 300

_TRIGGERED_BY = {JobTrigger.SCHEDULED: "automatic_migration", JobTrigger.MANUAL: "manual_trigger"}


@dataclass(eq=False)
class MigrationJobRunner:
    """Runs jobs with these dependencies (the reconciler function builds them)."""

    provider: MigrationProvider
    store: JobStore
    settings: MigrationJobSettings
    _: KW_ONLY
    metrics: MetricsSink | None = None
    publish: Publisher = notifications.publish
    logger: Any = field(default_factory=lambda: logging.getLogger("spotguard.migration"))
    capacity: CapacityReconciler | None = None

    def run(
        self,
        *,
        trigger: JobTrigger,
        dry_run: bool = False,
        max_migrations: int | None = None,
        job_id: str | None = None,
        timeout_ms: int | None = None,
    ) -> JobRecord:
        """Run one job. ``timeout_ms`` may only shorten the configured job timeout (the
        reconciler passes the Lambda's remaining time)."""
        budget_ms = (
            self.settings.job_timeout_ms
            if timeout_ms is None
            else min(timeout_ms, self.settings.job_timeout_ms)
        )
        started = time.monotonic()
        deadline = started + budget_ms / 1000
        previous = self._end_abandoned_jobs()
        job = JobRecord(
            job_id=job_id or new_job_id(),
            trigger=trigger,
            provider=self.provider.name,
            dry_run=self.settings.dry_run or dry_run,
            started_at=utc_now(),
            max_migrations=max_migrations,
        )
        self.store.save(job)
        self.logger.info(
            "Migration job started",
            extra={"jobId": job.job_id, "trigger": trigger.value, "dryRun": job.dry_run},
        )

        try:
            instances = self.provider.list_instances()
        except Exception as exc:  # any provider failure fails the job, recorded with its reason
            self.logger.exception("Listing instances failed", extra={"jobId": job.job_id})
            job.errors.append(f"list instances: {exc}")
            job.status = JobStatus.FAILED
            return self._finish(job, started)

        if self.capacity is not None:
            try:
                job.capacity = self.capacity.reconcile(
                    previous_shortfall=previous.capacity.shortfall if previous and previous.capacity else 0,
                    dry_run=job.dry_run,
                )
            except Exception as exc:  # a capacity check failure is recorded, migrations go on
                self.logger.exception("Capacity check failed", extra={"jobId": job.job_id})
                job.errors.append(f"capacity check: {exc}")
            if job.capacity is not None and self.metrics is not None:
                self.metrics.add_metric(Metric.CAPACITY_SHORTFALL.value, "Count", job.capacity.shortfall)

        eligible = [instance for instance in instances if instance.eligible]
        for instance in instances:
            self.logger.debug(
                "Eligibility",
                extra={
                    "jobId": job.job_id,
                    "instanceId": instance.instance_id,
                    "eligible": instance.eligible,
                    "reason": instance.reason,
                },
            )
        selected = eligible[:max_migrations] if max_migrations else eligible
        job.summary = JobSummary(total_instances=len(instances), eligible_instances=len(eligible))

        if job.dry_run:
            job.outcomes = [
                InstanceOutcome(
                    instance_id=i.instance_id, outcome=OutcomeKind.WOULD_MIGRATE, details={"reason": i.reason}
                )
                for i in selected
            ]
        else:
            job.outcomes = self._migrate_all(job, selected, deadline)

        job.summary.migrated_instances = sum(o.outcome is OutcomeKind.MIGRATED for o in job.outcomes)
        failed = [o for o in job.outcomes if o.outcome is OutcomeKind.FAILED]
        job.errors.extend(f"{o.instance_id}: {o.error}" for o in failed)
        timed_out = any(o.outcome in (OutcomeKind.NOT_STARTED, OutcomeKind.TIMED_OUT) for o in job.outcomes)
        job.status = JobStatus.TIMED_OUT if timed_out else JobStatus.COMPLETED
        if timed_out:
            job.errors.append(f"job timeout after {budget_ms} ms")
        return self._finish(job, started)

    # ------------------------------------------------------------------ internals
    def _end_abandoned_jobs(self) -> JobRecord | None:
        """End jobs stuck ``running`` (crashed reconciler) as failed; return the latest job."""
        try:
            abandoned = self.store.end_abandoned(
                older_than_seconds=self.settings.job_timeout_ms / 1000 + ABANDONED_MARGIN_SECONDS,
                now=utc_now(),
            )
            for job in abandoned:
                self.logger.warning("Abandoned migration job ended as failed", extra={"jobId": job.job_id})
            if abandoned and self.metrics is not None:
                self.metrics.add_metric(Metric.MIGRATION_JOBS_ABANDONED.value, "Count", len(abandoned))
            latest = self.store.latest(1)
        except Exception:  # the sweep is housekeeping: never stops this job
            self.logger.exception("Sweeping abandoned jobs failed")
            return None
        return latest[0] if latest else None

    def _migrate_all(
        self, job: JobRecord, selected: list[CandidateInstance], deadline: float
    ) -> list[InstanceOutcome]:
        if not selected:
            return []
        executor = ThreadPoolExecutor(max_workers=self.settings.max_concurrent, thread_name_prefix="migrate")
        futures: dict[Future[InstanceOutcome], CandidateInstance] = {
            executor.submit(self._migrate_one, job, instance, deadline): instance for instance in selected
        }
        done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        # Whatever has not started by the deadline never starts; in-flight calls cannot be
        # interrupted and finish in the background (their result is not waited for).
        executor.shutdown(wait=False, cancel_futures=True)
        outcomes: list[InstanceOutcome] = []
        for future, instance in futures.items():
            if future in done:
                outcomes.append(future.result())
            elif future.cancelled():
                outcomes.append(
                    InstanceOutcome(instance_id=instance.instance_id, outcome=OutcomeKind.NOT_STARTED)
                )
            else:
                outcomes.append(
                    InstanceOutcome(
                        instance_id=instance.instance_id,
                        outcome=OutcomeKind.TIMED_OUT,
                        error="still in progress when the job timed out",
                    )
                )
        return outcomes

    def _migrate_one(self, job: JobRecord, instance: CandidateInstance, deadline: float) -> InstanceOutcome:
        if time.monotonic() >= deadline:
            return InstanceOutcome(instance_id=instance.instance_id, outcome=OutcomeKind.NOT_STARTED)
        # The claim outlives this job's budget, so an overlapping job cannot start on it.
        if not self.store.claim(
            instance.instance_id, job.job_id, ttl_seconds=self.settings.job_timeout_ms // 1000 + 60
        ):
            return InstanceOutcome(
                instance_id=instance.instance_id,
                outcome=OutcomeKind.SKIPPED,
                details={"reason": "another migration job is migrating this instance"},
            )
        outcome = self._attempt(job, instance, deadline)
        if outcome.outcome is not OutcomeKind.MIGRATED:
            self.store.release(instance.instance_id, job.job_id)
        return outcome

    def _attempt(self, job: JobRecord, instance: CandidateInstance, deadline: float) -> InstanceOutcome:
        started = time.monotonic()
        attempts = 0
        error = ""
        while attempts < self.settings.max_attempts:
            if time.monotonic() >= deadline:
                kind = OutcomeKind.NOT_STARTED if attempts == 0 else OutcomeKind.TIMED_OUT
                return InstanceOutcome(
                    instance_id=instance.instance_id, outcome=kind, attempts=attempts, error=error or None
                )
            attempts += 1
            try:
                result = self.provider.migrate(instance, job_id=job.job_id, attempt=attempts)
            except MigrationError as exc:
                error = str(exc)
                self.logger.warning(
                    "Migration attempt failed",
                    extra={
                        "jobId": job.job_id,
                        "instanceId": instance.instance_id,
                        "attempt": attempts,
                        "error": error,
                    },
                )
                if not exc.retryable:
                    break
                time.sleep(
                    min(RETRY_BACKOFF_SECONDS * 2 ** (attempts - 1), max(0.0, deadline - time.monotonic()))
                )
                continue
            except Exception as exc:  # an unexpected provider error fails this instance only
                self.logger.exception(
                    "Migration attempt crashed",
                    extra={"jobId": job.job_id, "instanceId": instance.instance_id},
                )
                error = f"{type(exc).__name__}: {exc}"
                break
            duration_ms = int((time.monotonic() - started) * 1000)
            self._notify_migrated(job, instance, result.new_instance_id, result.status, duration_ms)
            self.logger.info(
                "Instance migrated",
                extra={
                    "jobId": job.job_id,
                    "instanceId": instance.instance_id,
                    "newInstanceId": result.new_instance_id,
                },
            )
            return InstanceOutcome(
                instance_id=instance.instance_id,
                outcome=OutcomeKind.MIGRATED,
                new_instance_id=result.new_instance_id,
                attempts=attempts,
                duration_ms=duration_ms,
                details=result.details,
            )
        return InstanceOutcome(
            instance_id=instance.instance_id,
            outcome=OutcomeKind.FAILED,
            attempts=attempts,
            duration_ms=int((time.monotonic() - started) * 1000),
            error=error,
        )

    def _notify_migrated(
        self, job: JobRecord, instance: CandidateInstance, new_id: str, status: str, duration_ms: int
    ) -> None:
        detail = {
            "event": NotificationType.INSTANCE_MIGRATED.value,
            "instanceId": new_id,
            "originalInstanceId": instance.instance_id,
            "status": status,
            "timestamp": utc_now().isoformat(),
            "provider": job.provider,
            "jobId": job.job_id,
            "migration": {
                "reason": EndReason.SPOT_RECLAIM.value,
                "triggeredBy": _TRIGGERED_BY[job.trigger],
                "migrationTime": duration_ms,
            },
            "instance": {"id": new_id, "name": instance.name or new_id},
        }
        self._safe_publish(NotificationType.INSTANCE_MIGRATED, detail)

    def _finish(self, job: JobRecord, started: float) -> JobRecord:
        job.ended_at = utc_now()
        job.duration_ms = int((time.monotonic() - started) * 1000)
        job.summary.error_count = len(job.errors)
        self.store.record_finished(job)
        if self.metrics is not None:
            self.metrics.add_metric(Metric.MIGRATION_JOBS.value, "Count", 1)
            self.metrics.add_metric(Metric.MIGRATION_ELIGIBLE.value, "Count", job.summary.eligible_instances)
            self.metrics.add_metric(
                Metric.MIGRATIONS_SUCCEEDED.value, "Count", job.summary.migrated_instances
            )
            self.metrics.add_metric(
                Metric.MIGRATIONS_FAILED.value,
                "Count",
                sum(o.outcome in (OutcomeKind.FAILED, OutcomeKind.TIMED_OUT) for o in job.outcomes),
            )
        self._safe_publish(
            NotificationType.MIGRATION_JOB_COMPLETED,
            {
                "event": NotificationType.MIGRATION_JOB_COMPLETED.value,
                "timestamp": job.ended_at.isoformat(),
                "jobId": job.job_id,
                "trigger": job.trigger.value,
                "status": job.status.value,
                "dryRun": job.dry_run,
                "provider": job.provider,
                "duration": job.duration_ms,
                "summary": job.summary.to_json(),
                "errors": job.errors[:20],
            },
        )
        self.logger.info(
            "Migration job completed",
            extra={
                "jobId": job.job_id,
                "status": job.status.value,
                "duration": job.duration_ms,
                "summary": job.summary.to_json(),
            },
        )
        return job

    def _safe_publish(self, kind: NotificationType, detail: Mapping[str, Any]) -> None:
        # Notifications are best effort: a bus outage must not fail a migration.
        try:
            if not self.publish(kind, detail):
                self.logger.debug("Notification not published", extra={"kind": kind.value})
        except Exception:
            self.logger.exception("Publishing notification failed", extra={"kind": kind.value})
