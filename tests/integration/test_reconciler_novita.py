"""Migration job with the Novita provider, against the local Novita contract server and
the jobs table on moto."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError
from spotguard_core.migration.models import JobStatus, JobTrigger, MigrationJobSettings, OutcomeKind
from spotguard_core.migration.providers.novita import NovitaClient, NovitaProvider, eligibility
from spotguard_core.migration.runner import MigrationJobRunner
from spotguard_core.migration.store import JobStore
from spotguard_core.ports import RecordingMetrics
from spotguard_tools.novita_contract_server import NovitaState, novita_instance, running_novita_server

from tests.integration.ops_fixtures import create_tables

pytestmark = pytest.mark.integration


@pytest.fixture
def tables(moto_server, monkeypatch):
    create_tables(monkeypatch)
    return moto_server


@pytest.fixture
def novita():
    with running_novita_server(NovitaState()) as server:
        yield server


def runner_for(server, *, published=None, metrics=None, **settings):
    provider = NovitaProvider(NovitaClient(server.url, server.state.api_key))
    return MigrationJobRunner(
        provider,
        JobStore(),
        MigrationJobSettings(**settings),
        metrics=metrics,
        publish=(lambda kind, detail: published.append((kind, dict(detail))) or True)
        if published is not None
        else (lambda kind, detail: True),
    )


# ------------------------------------------------------------------ eligibility (the seed's rule)
@pytest.mark.parametrize(
    ("instance", "eligible"),
    [
        (novita_instance("a"), True),
        (novita_instance("b", status="running"), False),  # status not exited
        (novita_instance("c", spot_reclaim_time="0"), False),  # normal termination
        (novita_instance("d", spot_status=""), False),  # empty spotStatus: not a spot instance
        (novita_instance("e", spot_status=None), False),  # spotStatus absent
        (novita_instance("f", status="migrating"), False),
    ],
)
def test_eligibility_follows_the_seed(instance, eligible):
    assert eligibility(instance)[0] is eligible


def test_job_migrates_only_eligible_instances_and_records_the_run(tables, novita):
    novita.state.add(
        novita_instance("inst-reclaimed-1"),
        novita_instance("inst-reclaimed-2"),
        novita_instance("inst-running", status="running"),
        novita_instance("inst-normal-exit", spot_reclaim_time="0"),
        novita_instance("inst-on-demand", spot_status=""),
    )
    published: list = []
    metrics = RecordingMetrics()
    job = runner_for(novita, published=published, metrics=metrics).run(trigger=JobTrigger.SCHEDULED)

    assert job.status is JobStatus.COMPLETED
    assert sorted(novita.state.migrated) == ["inst-reclaimed-1", "inst-reclaimed-2"]
    assert job.summary.total_instances == 5
    assert job.summary.eligible_instances == 2
    assert job.summary.migrated_instances == 2
    assert job.summary.error_count == 0
    assert {o.instance_id for o in job.outcomes if o.outcome is OutcomeKind.MIGRATED} == {
        "inst-reclaimed-1",
        "inst-reclaimed-2",
    }
    # recorded in the jobs table, with statistics
    stored = JobStore().history(limit=10, offset=0)
    assert stored.total == 1 and stored.jobs[0].job_id == job.job_id
    assert stored.jobs[0].status is JobStatus.COMPLETED and stored.jobs[0].ended_at is not None
    stats = JobStore().statistics()
    assert (
        stats.total_executions,
        stats.successful_executions,
        stats.total_migrations,
        stats.total_instances_processed,
    ) == (1, 1, 2, 5)
    # notifications: one instance.migrated per success (seed payload), one job completed
    kinds = [kind.value for kind, _ in published]
    assert kinds.count("instance.migrated") == 2 and kinds[-1] == "migration.job.completed"
    migrated = next(d for k, d in published if k.value == "instance.migrated")
    assert migrated["originalInstanceId"] in {"inst-reclaimed-1", "inst-reclaimed-2"}
    assert migrated["migration"]["reason"] == "spot_reclaim"
    assert migrated["migration"]["triggeredBy"] == "automatic_migration"
    assert metrics.total("MigrationsSucceeded") == 2 and metrics.total("MigrationJobs") == 1


def test_listing_follows_pages(tables, novita):
    novita.state.add(*(novita_instance(f"inst-{n:03d}", status="running") for n in range(230)))
    job = runner_for(novita).run(trigger=JobTrigger.SCHEDULED)
    assert job.summary.total_instances == 230
    assert [call["pageNum"] for call in novita.state.list_calls] == ["1", "2", "3"]
    assert all(call["pageSize"] == "100" for call in novita.state.list_calls)


def test_dry_run_changes_nothing(tables, novita):
    novita.state.add(novita_instance("inst-1"), novita_instance("inst-2"))
    job = runner_for(novita).run(trigger=JobTrigger.MANUAL, dry_run=True)
    assert novita.state.migrate_calls == []
    assert all(i["status"] == "exited" for i in novita.state.instances.values())
    assert job.dry_run is True and job.status is JobStatus.COMPLETED
    assert [o.outcome for o in job.outcomes] == [OutcomeKind.WOULD_MIGRATE] * 2
    assert job.summary.migrated_instances == 0


def test_configured_dry_run_cannot_be_overridden_by_a_trigger(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    job = runner_for(novita, dry_run=True).run(trigger=JobTrigger.MANUAL, dry_run=False)
    assert job.dry_run is True and novita.state.migrate_calls == []


def test_max_migrations_limits_the_job(tables, novita):
    novita.state.add(*(novita_instance(f"inst-{n}") for n in range(5)))
    job = runner_for(novita).run(trigger=JobTrigger.MANUAL, max_migrations=2)
    assert len(novita.state.migrated) == 2
    assert job.summary.eligible_instances == 5 and job.summary.migrated_instances == 2


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_never_exceeds_the_limit(tables, novita, limit):
    novita.state.add(*(novita_instance(f"inst-{n:02d}") for n in range(8)))
    novita.state.migrate_delay = 0.15
    job = runner_for(novita, max_concurrent=limit).run(trigger=JobTrigger.SCHEDULED)
    assert job.summary.migrated_instances == 8
    assert novita.state.max_in_flight_migrations == limit


def test_failed_migrations_are_retried(tables, novita):
    novita.state.add(novita_instance("inst-flaky"), novita_instance("inst-ok"))
    novita.state.migrate_failures["inst-flaky"] = 2  # two 500s, then success
    job = runner_for(novita, retry_failed=True).run(trigger=JobTrigger.SCHEDULED)
    flaky = next(o for o in job.outcomes if o.instance_id == "inst-flaky")
    assert flaky.outcome is OutcomeKind.MIGRATED and flaky.attempts == 3
    assert novita.state.migrate_calls.count("inst-flaky") == 3
    assert job.summary.error_count == 0


def test_without_retry_a_failure_is_recorded(tables, novita):
    novita.state.add(novita_instance("inst-flaky"), novita_instance("inst-ok"))
    novita.state.migrate_failures["inst-flaky"] = 1
    job = runner_for(novita, retry_failed=False).run(trigger=JobTrigger.SCHEDULED)
    flaky = next(o for o in job.outcomes if o.instance_id == "inst-flaky")
    assert flaky.outcome is OutcomeKind.FAILED and flaky.attempts == 1
    assert "500" in (flaky.error or "")
    assert job.status is JobStatus.COMPLETED and job.summary.error_count == 1
    assert job.summary.migrated_instances == 1


def test_permanent_errors_are_not_retried(tables, novita):
    novita.state.add(novita_instance("inst-rejected"))
    novita.state.migrate_always_fails["inst-rejected"] = 400
    job = runner_for(novita, retry_failed=True).run(trigger=JobTrigger.SCHEDULED)
    assert job.outcomes[0].outcome is OutcomeKind.FAILED and job.outcomes[0].attempts == 1


def test_rate_limiting_is_waited_out(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    novita.state.rate_limit_next = 2  # the list call gets 429 twice (Retry-After: 0)
    job = runner_for(novita).run(trigger=JobTrigger.SCHEDULED)
    assert job.status is JobStatus.COMPLETED and novita.state.migrated == ["inst-1"]


def test_list_server_errors_are_retried(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    novita.state.list_failures = 2  # 503 twice, then the page
    job = runner_for(novita).run(trigger=JobTrigger.SCHEDULED)
    assert job.status is JobStatus.COMPLETED and novita.state.migrated == ["inst-1"]
    assert len(novita.state.list_calls) == 3


def test_list_keeps_failing_fails_the_job(tables, novita):
    novita.state.list_failures = 10
    job = runner_for(novita).run(trigger=JobTrigger.SCHEDULED)
    assert job.status is JobStatus.FAILED and "503" in job.errors[0]


def test_wrong_api_key_fails_the_job_with_its_reason(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    provider = NovitaProvider(NovitaClient(novita.url, "sk_wrong"))
    job = MigrationJobRunner(provider, JobStore(), MigrationJobSettings(), publish=lambda k, d: True).run(
        trigger=JobTrigger.SCHEDULED
    )
    assert job.status is JobStatus.FAILED
    assert "401" in job.errors[0] and "INVALID_API_KEY" in job.errors[0]
    assert JobStore().statistics().failed_executions == 1


def test_job_stops_at_its_timeout(tables, novita):
    novita.state.add(*(novita_instance(f"inst-{n}") for n in range(5)))
    novita.state.migrate_delay = 0.6  # five migrations one at a time need 3 s; the budget is 1.2 s
    job = runner_for(novita, max_concurrent=1).run(trigger=JobTrigger.SCHEDULED, timeout_ms=1_200)
    assert job.duration_ms < 1_200 + 300  # stopped at the deadline, not after all five
    assert job.status is JobStatus.TIMED_OUT
    kinds = [o.outcome for o in job.outcomes]
    assert len(kinds) == 5
    assert kinds.count(OutcomeKind.NOT_STARTED) >= 2
    assert kinds.count(OutcomeKind.TIMED_OUT) == 1  # the one in flight at the deadline
    assert any("timeout" in e for e in job.errors)
    time.sleep(0.7)  # let the in-flight call finish before counting
    started_calls = kinds.count(OutcomeKind.MIGRATED) + kinds.count(OutcomeKind.TIMED_OUT)
    assert len(novita.state.migrate_calls) == started_calls  # nothing started after the deadline


def test_history_pages_newest_first(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    ids = [runner_for(novita).run(trigger=JobTrigger.MANUAL, dry_run=True).job_id for _ in range(5)]
    store = JobStore()
    pages = [store.history(limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert [len(p.jobs) for p in pages] == [2, 2, 1, 0]
    assert all(p.total == 5 for p in pages)
    assert [j.job_id for p in pages for j in p.jobs] == list(reversed(ids))


def test_overlapping_jobs_never_migrate_an_instance_twice(tables, novita):
    """A scheduled and a manual job at the same time: the claim lets only one migrate each."""
    novita.state.add(*(novita_instance(f"inst-{n}") for n in range(4)))
    novita.state.migrate_delay = 0.3
    jobs = []
    barrier = threading.Barrier(2)

    def run(trigger):
        runner = runner_for(novita, max_concurrent=4)
        barrier.wait()
        jobs.append(runner.run(trigger=trigger))

    threads = [threading.Thread(target=run, args=(t,)) for t in (JobTrigger.SCHEDULED, JobTrigger.MANUAL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(novita.state.migrate_calls) == [f"inst-{n}" for n in range(4)]  # each exactly once
    migrated = sum(job.summary.migrated_instances for job in jobs)
    assert migrated == 4
    skipped = [o for job in jobs for o in job.outcomes if o.outcome is OutcomeKind.SKIPPED]
    assert all(job.summary.error_count == 0 for job in jobs)
    assert len(skipped) + migrated == sum(len(job.outcomes) for job in jobs)


def test_a_failed_instance_is_released_for_the_next_job(tables, novita):
    novita.state.add(novita_instance("inst-1"))
    novita.state.migrate_failures["inst-1"] = 1
    first = runner_for(novita, retry_failed=False).run(trigger=JobTrigger.SCHEDULED)
    assert first.outcomes[0].outcome is OutcomeKind.FAILED
    second = runner_for(novita, retry_failed=False).run(trigger=JobTrigger.SCHEDULED)
    assert second.outcomes[0].outcome is OutcomeKind.MIGRATED


# ------------------------------------------------------------------ settings (the seed's env vars and ranges)
def test_settings_read_the_seed_environment_variables(monkeypatch):
    for name, value in {
        "MIGRATION_ENABLED": "false",
        "MIGRATION_INTERVAL_MINUTES": "5",
        "MIGRATION_JOB_TIMEOUT_MS": "300000",
        "MIGRATION_MAX_CONCURRENT": "10",
        "MIGRATION_DRY_RUN": "true",
        "MIGRATION_RETRY_FAILED": "false",
        "MIGRATION_LOG_LEVEL": "WARN",
        "MIGRATION_PROVIDER": "novita",
    }.items():
        monkeypatch.setenv(name, value)
    settings = MigrationJobSettings()
    assert settings.describe() == {
        "intervalMinutes": 5,
        "jobTimeoutMs": 300000,
        "maxConcurrent": 10,
        "dryRun": True,
        "retryFailed": False,
        "logLevel": "warn",
        "provider": "novita",
    }
    assert settings.enabled is False and settings.max_attempts == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MIGRATION_INTERVAL_MINUTES", "0"),
        ("MIGRATION_INTERVAL_MINUTES", "61"),
        ("MIGRATION_JOB_TIMEOUT_MS", "59999"),
        ("MIGRATION_JOB_TIMEOUT_MS", "1800001"),
        ("MIGRATION_MAX_CONCURRENT", "0"),
        ("MIGRATION_MAX_CONCURRENT", "21"),
        ("MIGRATION_LOG_LEVEL", "verbose"),
        ("MIGRATION_PROVIDER", "gcp"),
    ],
)
def test_settings_out_of_the_seed_ranges_fail_at_start(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name):
        MigrationJobSettings()
