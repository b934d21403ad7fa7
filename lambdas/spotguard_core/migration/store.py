"""The jobs table: one item per migration job, plus one running-statistics item.

Items of a job kind share the partition ``job_kind`` and sort by ``started_key``
(``<ISO start>#<job id>``), so the history is a descending Query. The statistics the
status API shows (the seed's ``totalExecutions`` …) are kept as atomic counters in a
separate partition, updated when a job finishes: reading them never scans history.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from spotguard_core import contracts, dynamo
from spotguard_core.contracts import JOBS_TABLE_PK, JOBS_TABLE_SK, TTL_ATTRIBUTE, Env
from spotguard_core.migration.models import JobRecord, JobStatus

STATS_SORT_KEY = "all"


def new_job_id() -> str:
    return f"migration-job-{uuid.uuid4().hex[:12]}"


class JobStatistics(BaseModel):
    """The running counters of one job kind, read from its statistics item by attribute
    name (``record_finished`` writes them); the status API shows them as the seed's
    ``statistics`` block (``ops_models.Statistics``, built from these attributes)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    total_executions: int = 0
    successful_executions: int = 0
    failed_executions: int = 0
    total_duration_ms: int = 0
    total_migrations: int = 0
    total_instances_processed: int = Field(
        default=0, validation_alias=AliasChoices("total_instances", "total_instances_processed")
    )

    @property
    def average_execution_time(self) -> int:
        """Milliseconds per finished job."""
        return self.total_duration_ms // self.total_executions if self.total_executions else 0


@dataclass(frozen=True, slots=True)
class HistoryPage:
    jobs: list[JobRecord]
    total: int
    limit: int
    offset: int


class JobStore:
    """Jobs of one kind (``contracts.JOB_KIND_MIGRATION`` by default) in the jobs table."""

    def __init__(
        self, table_name: str | None = None, *, job_kind: str = contracts.JOB_KIND_MIGRATION
    ) -> None:
        self._table = dynamo.table(Env.JOBS_TABLE, table_name)
        self._kind = job_kind
        self._stats_kind = f"{job_kind}#stats"
        self._claim_kind = f"{job_kind}#claim"

    # ---------------------------------------------------------------- writes
    def save(self, job: JobRecord) -> None:
        """Create or overwrite the job's item (called when it starts and when it ends)."""
        item: dict[str, Any] = {
            JOBS_TABLE_PK: self._kind,
            JOBS_TABLE_SK: job.started_key,
            TTL_ATTRIBUTE: int(job.started_at.timestamp()) + contracts.JOB_RECORD_RETENTION_SECONDS,
            **job.to_json(),
        }
        self._table.put_item(Item=dynamo.to_dynamo(item))

    def record_finished(self, job: JobRecord) -> None:
        """Save the finished job and add it to the running statistics."""
        self.save(job)
        succeeded = job.status is JobStatus.COMPLETED
        self._table.update_item(
            Key={JOBS_TABLE_PK: self._stats_kind, JOBS_TABLE_SK: STATS_SORT_KEY},
            UpdateExpression=(
                "ADD total_executions :one, successful_executions :ok, failed_executions :bad, "
                "total_duration_ms :duration, total_migrations :migrated, total_instances :instances"
            ),
            ExpressionAttributeValues={
                ":one": 1,
                ":ok": 1 if succeeded else 0,
                ":bad": 0 if succeeded else 1,
                ":duration": job.duration_ms or 0,
                ":migrated": job.summary.migrated_instances,
                ":instances": job.summary.total_instances,
            },
        )

    def claim(self, instance_id: str, job_id: str, *, ttl_seconds: int) -> bool:
        """Take the right to migrate ``instance_id`` for ``ttl_seconds``.

        A scheduled and a manual job may overlap; without a claim both could replace the
        same reclaimed instance. The claim is a conditional put that only succeeds when no
        other job holds an unexpired claim (the same job may claim again: retries)."""
        now = int(contracts.now())
        try:
            self._table.put_item(
                Item={
                    JOBS_TABLE_PK: self._claim_kind,
                    JOBS_TABLE_SK: instance_id,
                    "jobId": job_id,
                    TTL_ATTRIBUTE: now + ttl_seconds,
                },
                ConditionExpression="attribute_not_exists(#pk) OR #expires < :now OR jobId = :job",
                ExpressionAttributeNames={"#pk": JOBS_TABLE_PK, "#expires": TTL_ATTRIBUTE},
                ExpressionAttributeValues={":now": now, ":job": job_id},
            )
        except ClientError as error:
            if dynamo.condition_failed(error):
                return False
            raise
        return True

    def end_abandoned(
        self, *, older_than_seconds: float, now: datetime, scan_latest: int = 50
    ) -> list[JobRecord]:
        """End as ``failed`` the recent jobs still ``running`` long after any job could run
        (their reconciler crashed or hit its Lambda timeout before recording the end)."""
        ended: list[JobRecord] = []
        for job in self.latest(scan_latest):
            age = (now - job.started_at).total_seconds()
            if job.status is not JobStatus.RUNNING or age <= older_than_seconds:
                continue
            job.status = JobStatus.FAILED
            job.ended_at = now
            job.duration_ms = int(age * 1000)
            job.errors.append(
                f"abandoned: still running {int(age)} s after it started (longer than any job may run): "
                "its reconciler stopped before recording the end; ended by the next job"
            )
            job.summary.error_count = len(job.errors)
            self.record_finished(job)
            ended.append(job)
        return ended

    def release(self, instance_id: str, job_id: str) -> None:
        """Give a claim back (after a failure, so the next job may try again)."""
        try:
            self._table.delete_item(
                Key={JOBS_TABLE_PK: self._claim_kind, JOBS_TABLE_SK: instance_id},
                ConditionExpression="jobId = :job",
                ExpressionAttributeValues={":job": job_id},
            )
        except ClientError as error:
            if not dynamo.condition_failed(error):
                raise

    # ---------------------------------------------------------------- reads
    def statistics(self) -> JobStatistics:
        item = self._table.get_item(Key={JOBS_TABLE_PK: self._stats_kind, JOBS_TABLE_SK: STATS_SORT_KEY}).get(
            "Item"
        )
        return JobStatistics.model_validate(item or {})

    def latest(self, count: int = 1) -> list[JobRecord]:
        return self.history(limit=count, offset=0, with_total=False).jobs

    def history(self, *, limit: int, offset: int, with_total: bool = True) -> HistoryPage:
        """Newest first. DynamoDB has no offset: read ``offset + limit`` items and slice
        (history is bounded by the record retention and the API bounds ``offset``)."""
        wanted = offset + limit
        newest_first = dynamo.items(
            self._table.query,
            KeyConditionExpression=Key(JOBS_TABLE_PK).eq(self._kind),
            ScanIndexForward=False,
            Limit=min(wanted, 1000),
        )
        items = list(itertools.islice(newest_first, wanted))
        jobs = [JobRecord.model_validate(item) for item in items[offset:wanted]]
        total = self.count() if with_total else len(items)
        return HistoryPage(jobs=jobs, total=total, limit=limit, offset=offset)

    def count(self) -> int:
        counted = dynamo.pages(
            self._table.query, KeyConditionExpression=Key(JOBS_TABLE_PK).eq(self._kind), Select="COUNT"
        )
        return sum(int(page.get("Count", 0)) for page in counted)
