"""api λ through API-Gateway-shaped events, against tables on the moto server."""

from __future__ import annotations

import io
import json
import os
import zipfile
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from spotguard_core import contracts
from spotguard_core.contracts import BootstrapStatus, EndReason, Env, FleetRecord, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import JobRecord, JobStatus, JobSummary, JobTrigger
from spotguard_core.migration.store import JobStore
from spotguard_functions import api
from spotguard_tools.novita_contract_server import NovitaState, novita_instance, running_novita_server

from tests.integration.ops_fixtures import (
    FakeLambdaContext,
    create_tables,
    reconciler_runs_inline,
    rest_event,
)
from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX

pytestmark = pytest.mark.integration


@pytest.fixture
def tables(moto_server, monkeypatch):
    create_tables(monkeypatch)
    monkeypatch.setenv(Env.FLEET_NAME.value, "workers")
    monkeypatch.delenv(Env.RECONCILER_FUNCTION.value, raising=False)
    return moto_server


def call(event):
    response = api.handler(event, FakeLambdaContext())
    return response["statusCode"], json.loads(response["body"])


def get_instance(instance_id):
    """``GET /fleet/{instanceId}`` as API Gateway routes it (resource and path parameter)."""
    return call(
        rest_event(
            "GET",
            f"/fleet/{instance_id}",
            resource="/fleet/{instanceId}",
            path_parameters={"instanceId": instance_id},
        )
    )


def put_record(instance_id, state, bootstrap_status, **fields):
    """A record of this test's fleet ("workers") in the fleet table."""
    FleetStore().put(
        FleetRecord(
            instance_id=instance_id, fleet="workers", state=state, bootstrap_status=bootstrap_status, **fields
        )
    )


def finished_job(
    job_id, *, status=JobStatus.COMPLETED, trigger=JobTrigger.SCHEDULED, minutes_ago=0, errors=0, migrated=0
):
    started = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    job = JobRecord(
        job_id=job_id,
        trigger=trigger,
        provider="aws",
        dry_run=False,
        status=status,
        started_at=started,
        ended_at=started + timedelta(seconds=3),
        duration_ms=3000,
        summary=JobSummary(
            total_instances=4, eligible_instances=migrated, migrated_instances=migrated, error_count=errors
        ),
        errors=[f"e{n}" for n in range(errors)],
    )
    JobStore().record_finished(job)
    return job


def test_health_before_any_job(tables):
    status, body = call(rest_event("GET", "/health"))
    assert status == 200
    assert body["status"] == "healthy" and body["fleet"] == "workers"
    assert body["migrationService"] == {
        "enabled": True,
        "lastExecution": None,
        "nextExecution": None,
        "status": "healthy",
        "recentErrors": 0,
    }


def test_health_reports_last_and_next_execution_and_recent_errors(tables, monkeypatch):
    monkeypatch.setenv("MIGRATION_INTERVAL_MINUTES", "15")
    first = finished_job("migration-job-1", minutes_ago=20, errors=2)
    last = finished_job("migration-job-2", minutes_ago=5, status=JobStatus.FAILED, errors=1)
    status, body = call(rest_event("GET", "/health"))
    service = body["migrationService"]
    assert status == 200 and first.job_id
    assert datetime.fromisoformat(service["lastExecution"]) == last.started_at
    assert datetime.fromisoformat(service["nextExecution"]) == last.started_at + timedelta(minutes=15)
    assert service["recentErrors"] == 3
    assert service["status"] == "degraded" and body["status"] == "degraded"

    monkeypatch.setenv("MIGRATION_ENABLED", "false")
    service = call(rest_event("GET", "/health"))[1]["migrationService"]
    assert (
        service["enabled"] is False and service["status"] == "disabled" and service["nextExecution"] is None
    )


def test_migration_status_has_the_seed_shape(tables, monkeypatch):
    monkeypatch.setenv("MIGRATION_MAX_CONCURRENT", "7")
    finished_job("migration-job-1", minutes_ago=10, migrated=2)
    finished_job("migration-job-2", minutes_ago=5, status=JobStatus.FAILED, errors=1)
    status, body = call(rest_event("GET", "/migration/status"))
    assert status == 200
    assert body["enabled"] is True
    assert body["statistics"] == {
        "totalExecutions": 2,
        "successfulExecutions": 1,
        "failedExecutions": 1,
        "averageExecutionTime": 3000,
        "totalMigrations": 2,
        "totalInstancesProcessed": 8,
    }
    assert body["configuration"] == {
        "intervalMinutes": 15,
        "jobTimeoutMs": 600000,
        "maxConcurrent": 7,
        "dryRun": False,
        "retryFailed": True,
        "logLevel": "info",
        "provider": "aws",
    }
    assert body["lastExecution"]["jobId"] == "migration-job-2"
    assert body["lastExecution"]["status"] == "failed"  # the seed's monitoring script reads this


def test_history_pages_and_bounds(tables):
    for n in range(5):
        finished_job(f"migration-job-{n}", minutes_ago=10 - n)
    status, body = call(rest_event("GET", "/migration/history", query={"limit": "2", "offset": "1"}))
    assert status == 200
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 1)
    assert [job["jobId"] for job in body["jobs"]] == ["migration-job-3", "migration-job-2"]
    assert set(body["jobs"][0]) >= {
        "jobId",
        "trigger",
        "startedAt",
        "endedAt",
        "durationMs",
        "status",
        "summary",
        "outcomes",
        "errors",
    }
    assert set(body["jobs"][0]["summary"]) == {
        "totalInstances",
        "eligibleInstances",
        "migratedInstances",
        "errorCount",
    }
    status, body = call(rest_event("GET", "/migration/history"))
    assert status == 200 and body["limit"] == 20 and len(body["jobs"]) == 5
    status, body = call(rest_event("GET", "/migration/history", query={"limit": "100", "offset": "10000"}))
    assert status == 200 and body["jobs"] == []


def test_trigger_hands_the_job_to_the_reconciler_which_records_it_under_the_answered_id(tables, monkeypatch):
    """The API only hands the job over (202 + id); the reconciler (run in-process here in
    place of Lambda's async invoke) records it under that id, visible in the history."""
    sent = reconciler_runs_inline(monkeypatch)
    with running_novita_server(NovitaState()) as novita:
        novita.state.add(novita_instance("inst-1"), novita_instance("inst-2"), novita_instance("inst-3"))
        secret = boto3.client("secretsmanager").create_secret(
            Name="novita", SecretString=novita.state.api_key
        )
        monkeypatch.setenv("MIGRATION_PROVIDER", "novita")
        monkeypatch.setenv(Env.NOVITA_API_URL.value, novita.url)
        monkeypatch.setenv(Env.NOVITA_API_KEY_SECRET_ARN.value, secret["ARN"])
        status, body = call(
            rest_event("POST", "/migration/trigger", body={"dryRun": False, "maxMigrations": 2})
        )
        assert status == 202
        assert body["status"] == "accepted" and body["jobId"].startswith("migration-job-")
        assert sent == [{"trigger": "manual", "jobId": body["jobId"], "dryRun": False, "maxMigrations": 2}]
        assert len(novita.state.migrated) == 2
        first = body["jobId"]

        status, body = call(rest_event("POST", "/migration/trigger", body={"dryRun": True}))
        assert status == 202 and body["dryRun"] is True and len(novita.state.migrated) == 2
    history = call(rest_event("GET", "/migration/history"))[1]
    assert history["total"] == 2
    by_id = {job["jobId"]: job for job in history["jobs"]}
    assert by_id[first]["summary"]["migratedInstances"] == 2 and by_id[first]["trigger"] == "manual"
    assert by_id[body["jobId"]]["dryRun"] is True


def test_trigger_without_a_reconciler_function_is_503(tables):
    status, body = call(rest_event("POST", "/migration/trigger", body={"dryRun": True}))
    assert status == 503 and Env.RECONCILER_FUNCTION.value in body["message"]


def test_trigger_invokes_the_reconciler_asynchronously(tables, monkeypatch):
    """With a reconciler function configured the API only invokes it (InvocationType=Event)
    and answers 202 with the job id the reconciler will use."""
    iam = boto3.client("iam")
    role = iam.create_role(
        RoleName="reconciler",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("index.py", "def handler(event, context):\n    return event\n")
    boto3.client("lambda").create_function(
        FunctionName="spotguard-reconciler",
        Runtime="python3.13",
        Role=role,
        Handler="index.handler",
        Code={"ZipFile": archive.getvalue()},
    )
    monkeypatch.setenv(Env.RECONCILER_FUNCTION.value, "spotguard-reconciler")
    status, body = call(rest_event("POST", "/migration/trigger", body={"dryRun": True, "maxMigrations": 3}))
    assert status == 202
    assert body["status"] == "accepted" and body["jobId"].startswith("migration-job-")
    assert body["dryRun"] is True and body["maxMigrations"] == 3 and "job" not in body


def test_fleet_views(tables):
    now = contracts.now()
    put_record(
        "i-0aaaaaaaaaaaaaaa1",
        InstanceState.READY,
        BootstrapStatus.READY,
        launched_at=now - 600,
        ready_at=now - 500,
        heartbeat_at=now - 5,
        instance_type="m7i.large",
        availability_zone="us-east-1a",
        last_signal={
            "kind": "rebalance",
            "event_id": "e-1",
            "source": "eventbridge",
            "at": "2026-01-15T10:00:00+00:00",
        },
    )
    put_record(
        "i-0aaaaaaaaaaaaaaa2",
        InstanceState.ENDED,
        BootstrapStatus.FAILED,
        bootstrap_reason="health port 9880 not listening",
        end_reason=EndReason.BOOTSTRAP_FAILED,
        ended_at=now,
    )
    status, body = call(rest_event("GET", "/fleet"))
    assert status == 200 and body["count"] == 2
    assert [i["instanceId"] for i in body["instances"]] == ["i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"]

    status, body = call(rest_event("GET", "/fleet", query={"state": "ended"}))
    assert status == 200 and [i["instanceId"] for i in body["instances"]] == ["i-0aaaaaaaaaaaaaaa2"]
    status, body = call(rest_event("GET", "/fleet", query={"state": "exploded"}))
    assert status == 400 and "state" in body["message"]

    status, body = get_instance("i-0aaaaaaaaaaaaaaa2")
    assert status == 200
    assert body["state"] == "ended" and body["bootstrapStatus"] == "failed"
    assert (
        body["bootstrapReason"] == "health port 9880 not listening"
        and body["endReason"] == "bootstrap_failed"
    )
    status, body = get_instance("i-0aaaaaaaaaaaaaaa1")
    assert body["lastSignal"]["kind"] == "rebalance" and body["state"] == "ready"


def test_unknown_instance_is_404(tables):
    status, body = get_instance("i-0bbbbbbbbbbbbbbbb")
    assert status == 404 and "not managed" in body["message"]


# ------------------------------------------------------------------ bad table items (issue 13)
def _put_raw(item):
    boto3.client("dynamodb").put_item(TableName=os.environ[Env.FLEET_TABLE.value], Item=item)


def test_fleet_view_skips_and_counts_unreadable_items(tables):
    put_record(
        "i-0aaaaaaaaaaaaaaa1",
        InstanceState.READY,
        BootstrapStatus.READY,
    )
    _put_raw({"pk": {"S": f"{MOTO_INSTANCE_ARN_PREFIX}i-0bad0000000000001"}, "state": {"S": "exploded"}})
    _put_raw(
        {"pk": {"S": f"{MOTO_INSTANCE_ARN_PREFIX}i-0bad0000000000002"}, "launched_at": {"S": "yesterday"}}
    )
    status, body = call(rest_event("GET", "/fleet"))
    assert status == 200
    assert [i["instanceId"] for i in body["instances"]] == ["i-0aaaaaaaaaaaaaaa1"]
    assert body["count"] == 1 and body["skipped"] == 2

    status, body = get_instance("i-0bad0000000000001")
    assert status == 500 and "i-0bad0000000000001 cannot be read" in body["message"]


def test_an_internal_error_is_a_500_with_a_generic_message(tables, monkeypatch):
    """A genuine failure (here: the jobs table does not exist) is logged and answered 500
    with a message, never an exception out of the handler (a bare 502 at API Gateway)."""
    monkeypatch.setenv(Env.JOBS_TABLE.value, "no-such-table")
    status, body = call(rest_event("GET", "/migration/history"))
    assert status == 500 and body["message"].startswith("internal error (logged)")
    assert "no-such-table" not in body["message"]  # nothing internal leaks to the caller
