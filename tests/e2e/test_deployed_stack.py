"""The staging stack, deployed by ``cdk deploy`` to MiniStack, driven with the staging test events.

Only deployed resources are used: stack outputs, the stack's own resources (by type, from the
emulator's CloudFormation) and the agent's configuration parameter the stack wrote. Nothing
is created by hand except EC2 instances launched from the stack's launch template, and the
work messages those "workers" hold. Tests run in file order (one scenario); each step asserts
what the control plane did.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import pytest
from spotguard_agent.fleet_reporter import FleetReporter
from spotguard_core import contracts
from spotguard_core.aws import ClientFactory
from spotguard_core.contracts import EndReason, InstanceState
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore

from tests.e2e.conftest import Deployment
from tests.e2e.emulator import ACCOUNT, FLEET, REGION, STACK_NAME, run_cli
from tests.support.control_plane_env import lease_of

pytestmark = pytest.mark.e2e

T = TypeVar("T")
#: "Made visible again at once": a requeued message must be receivable within this.
REQUEUE_SECONDS = 8.0
SIGNAL_SECONDS = 20.0


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = SIGNAL_SECONDS) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Worker:
    """One fleet instance and the messages its agent holds (leases written)."""

    instance_id: str
    message_ids: list[str]


@dataclass
class Fleet:
    agent_config: dict[str, str]
    managed: list[Worker]
    unmanaged: Worker
    leases: LeaseStore
    records: FleetStore
    sqs: Any

    @property
    def queue_url(self) -> str:
        return self.agent_config[contracts.Env.WORK_QUEUE_URL.value]


# ------------------------------------------------------------------------------ helpers
def send(deployment: Deployment, kind: str, instance_id: str, *extra: str) -> str:
    result = run_cli(
        ["send-test-event", kind, "--instance", instance_id, "--fleet", FLEET, *extra], deployment.env
    )
    assert result.returncode == 0, f"send-test-event {kind} failed:\n{result.stderr}"
    return result.stderr.strip().rsplit(" ", 1)[-1]  # "sent to bus default as event <id>"


def record_of(fleet: Fleet, instance_id: str) -> contracts.FleetRecord | None:
    return fleet.records.get(instance_id)


def wait_for_signal(fleet: Fleet, instance_id: str, event_id: str) -> contracts.FleetRecord:
    """The fleet record once it shows ``event_id`` as its last signal."""

    def probe() -> contracts.FleetRecord | None:
        record = record_of(fleet, instance_id)
        if record is not None and (record.last_signal or {}).get("event_id") == event_id:
            return record
        return None

    return wait_for(f"the dispatcher to record event {event_id} on {instance_id}", probe)


def receivable(fleet: Fleet, expected: set[str], timeout: float = REQUEUE_SECONDS) -> set[str]:
    """Receive until every expected message id was seen (each received one is hidden again
    for 60 s so it is counted once), or the timeout passes; returns what was seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not expected <= seen:
        response = fleet.sqs.receive_message(
            QueueUrl=fleet.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=60
        )
        seen |= {m["MessageId"] for m in response.get("Messages", [])}
    return seen


def log_messages(group: str) -> list[str]:
    paginator = boto3.client("logs").get_paginator("filter_log_events")
    return [e["message"] for page in paginator.paginate(logGroupName=group) for e in page["events"]]


def processed(deployment: Deployment, event_id: str) -> dict[str, Any]:
    """The dispatcher's logged outcome ("signal processed") of the event ``event_id``."""
    group = _log_group(deployment, "Dispatcher")

    def probe() -> dict[str, Any] | None:
        for message in log_messages(group):
            if "signal processed" not in message:
                continue
            try:
                outcome = json.loads(message)["outcome"]
            except (ValueError, KeyError):
                continue
            if outcome["signal"]["event_id"] == event_id:
                return dict(outcome)
        return None

    return wait_for(f"the dispatcher's outcome of event {event_id}", probe)


def api_url(deployment: Deployment) -> str:
    """The stage URL from the outputs, addressed through the emulator (path-style)."""
    api_id = deployment.outputs["ApiUrl"].split("//", 1)[1].split(".", 1)[0]
    return f"{deployment.emulator.endpoint}/_aws/execute-api/{api_id}/v1/"


def cli_json(deployment: Deployment, *args: str) -> dict[str, Any]:
    result = run_cli([*args, "--api-url", api_url(deployment), "--json"], deployment.env)
    assert result.returncode == 0, f"spotguard {' '.join(args)} failed:\n{result.stderr}"
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fleet(deployment: Deployment) -> Fleet:
    ec2 = boto3.client("ec2")
    ssm = boto3.client("ssm")
    sqs = boto3.client("sqs")
    # The agent's configuration, exactly as the stack wrote it for the instances.
    (parameter,) = [
        pid for pid in deployment.physical_ids("AWS::SSM::Parameter") if pid.endswith("agent-config")
    ]
    agent_config = json.loads(ssm.get_parameter(Name=parameter)["Parameter"]["Value"])
    (launch_template,) = deployment.physical_ids("AWS::EC2::LaunchTemplate")

    def launch(tags: dict[str, str]) -> str:
        options: dict[str, Any] = {}
        if tags:
            options["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ]
        response = ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": launch_template, "Version": "$Latest"},
            MinCount=1,
            MaxCount=1,
            **options,
        )
        return str(response["Instances"][0]["InstanceId"])

    fleet_tag = {contracts.FLEET_TAG_KEY: FLEET}
    managed_ids = [launch(fleet_tag) for _ in range(2)]
    # Carries the fleet tag but is no member of the fleet's ASG and never reported: a tag
    # alone (anyone may set it) must not make an instance managed.
    unmanaged_id = launch(fleet_tag)
    fleet_table = agent_config[contracts.Env.FLEET_TABLE.value]
    for instance_id in managed_ids:
        # What the agent does once its bootstrap is verified (spotguard_agent.cli): the fleet
        # record says ready. (The emulator's RunInstances instances are no ASG members, so
        # the record is what makes them managed here; on AWS the ASG membership does too.)
        reporter = FleetReporter(
            ClientFactory(REGION),
            instance_id=instance_id,
            fleet=FLEET,
            fleet_table=fleet_table,
            arn_prefix=agent_config[contracts.Env.INSTANCE_ARN_PREFIX.value],
        )
        assert reporter.ready(instance_type="m7i.large", availability_zone=f"{REGION}a")
    leases = LeaseStore(
        agent_config[contracts.Env.LEASE_TABLE.value],
        arn_prefix=agent_config[contracts.Env.INSTANCE_ARN_PREFIX.value],
    )
    queue_url = agent_config[contracts.Env.WORK_QUEUE_URL.value]
    workers = []
    for instance_id in [*managed_ids, unmanaged_id]:
        # What the worker does per message (Worker._start): receive, then write the lease.
        for n in range(2):
            sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"task": n, "for": instance_id}))
        taken: list[str] = []
        while len(taken) < 2:
            response = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=2 - len(taken),
                WaitTimeSeconds=1,
                VisibilityTimeout=600,
            )
            for message in response.get("Messages", []):
                leases.put(lease_of(message, instance_id=instance_id, queue_url=queue_url, at=time.time()))
                taken.append(message["MessageId"])
        workers.append(Worker(instance_id, taken))
    deployment.facts["instances"] = ", ".join(w.instance_id for w in workers)
    return Fleet(
        agent_config=agent_config,
        managed=workers[:2],
        unmanaged=workers[2],
        leases=leases,
        records=FleetStore(fleet_table, arn_prefix=agent_config[contracts.Env.INSTANCE_ARN_PREFIX.value]),
        sqs=sqs,
    )


# ------------------------------------------------------------------------------ the deploy
def test_every_template_resource_is_deployed(deployment: Deployment) -> None:
    status = boto3.client("cloudformation").describe_stacks(StackName=STACK_NAME)["Stacks"][0]["StackStatus"]
    assert status == "CREATE_COMPLETE"
    expected = {k: v["Type"] for k, v in deployment.template["Resources"].items()}
    deployed = {k: t for k, (t, _) in deployment.resources.items()}
    missing = {k: t for k, t in expected.items() if k not in deployed}
    assert not missing, f"not deployed: {missing}"
    assert all(pid for _, pid in deployment.resources.values()), "a resource has no physical id"
    assert set(deployment.outputs) >= {"ApiUrl", "WorkQueueUrl", "FleetTableName", "AutoScalingGroupName"}
    deployment.facts["resource_types"] = len(set(expected.values()))


def test_agent_config_names_the_deployed_queues_and_tables(deployment: Deployment, fleet: Fleet) -> None:
    config = fleet.agent_config
    assert config[contracts.Env.WORK_QUEUE_URL.value] == deployment.outputs["WorkQueueUrl"]
    assert config[contracts.Env.FLEET_TABLE.value] == deployment.outputs["FleetTableName"]
    assert config[contracts.Env.LEASE_TABLE.value] in deployment.physical_ids("AWS::DynamoDB::Table")
    for worker in [*fleet.managed, fleet.unmanaged]:
        assert {lease.message_id for lease in fleet.leases.for_instance(worker.instance_id)} == set(
            worker.message_ids
        )


# ------------------------------------------------------------------------------ test events
def test_the_agents_report_and_a_late_launch_event_changes_nothing(
    deployment: Deployment, fleet: Fleet
) -> None:
    for worker in fleet.managed:
        reported = record_of(fleet, worker.instance_id)
        assert reported is not None and reported.state is InstanceState.READY
        assert reported.bootstrap_status is contracts.BootstrapStatus.READY
        event_id = send(deployment, "lifecycle-launch", worker.instance_id)
        outcome = processed(deployment, event_id)
        assert outcome["managed"] is True
        assert outcome["actions"] == []
        assert record_of(fleet, worker.instance_id) == reported


def test_spot_interruption_marks_the_instance_draining(deployment: Deployment, fleet: Fleet) -> None:
    a = fleet.managed[0]
    event_id = send(deployment, "spot-interruption", a.instance_id)
    record = wait_for_signal(fleet, a.instance_id, event_id)
    assert record.state is InstanceState.DRAINING
    assert record.interrupted_at is not None
    assert record.drain_deadline_at is not None and record.drain_deadline_at > record.interrupted_at
    # The agent drains (it holds the leases); the control plane does not take them yet.
    assert {lease.message_id for lease in fleet.leases.for_instance(a.instance_id)} == set(a.message_ids)


def test_a_resent_warning_changes_nothing(deployment: Deployment, fleet: Fleet) -> None:
    a = fleet.managed[0]
    before = record_of(fleet, a.instance_id)
    assert before is not None
    send(deployment, "spot-interruption", a.instance_id)
    # The resend is a new EventBridge event: wait until the dispatcher has consumed it.
    signal_queue = _signal_queue_url(deployment)
    wait_for("the signal queue to drain", lambda: _queue_empty(fleet.sqs, signal_queue))
    after = record_of(fleet, a.instance_id)
    assert after is not None
    assert after.state is InstanceState.DRAINING
    assert after.interrupted_at == before.interrupted_at
    assert after.drain_deadline_at == before.drain_deadline_at
    assert {lease.message_id for lease in fleet.leases.for_instance(a.instance_id)} == set(a.message_ids)


def test_an_unmanaged_instance_is_ignored(deployment: Deployment, fleet: Fleet) -> None:
    u = fleet.unmanaged
    send(deployment, "spot-interruption", u.instance_id)
    send(deployment, "state-change", u.instance_id, "--state", "terminated")
    wait_for("the signal queue to drain", lambda: _queue_empty(fleet.sqs, _signal_queue_url(deployment)))
    assert record_of(fleet, u.instance_id) is None
    assert {lease.message_id for lease in fleet.leases.for_instance(u.instance_id)} == set(u.message_ids)
    assert not receivable(fleet, set(u.message_ids), timeout=3) & set(u.message_ids)


def test_termination_after_the_warning_requeues_the_leases_at_once(
    deployment: Deployment, fleet: Fleet
) -> None:
    a = fleet.managed[0]
    sent_at = time.monotonic()
    event_id = send(deployment, "state-change", a.instance_id, "--state", "terminated")
    record = wait_for_signal(fleet, a.instance_id, event_id)
    recorded_at = time.monotonic()
    assert record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.SPOT_RECLAIM
    seen = receivable(fleet, set(a.message_ids))
    deployment.facts["termination_event_to_requeued_messages_received_s"] = (
        f"{time.monotonic() - sent_at:.1f} (after the record: {time.monotonic() - recorded_at:.1f})"
    )
    assert set(a.message_ids) <= seen, f"not made visible again: {set(a.message_ids) - seen}"
    assert fleet.leases.for_instance(a.instance_id) == []


def test_a_duplicate_delivery_is_handled_once(deployment: Deployment, fleet: Fleet) -> None:
    """EventBridge delivers at least once: the same event (same id) twice on the signal
    queue. The second is answered from the idempotency table, not acted on again."""
    a = fleet.managed[0]
    dry_run = run_cli(
        [
            *("send-test-event", "spot-interruption", "--instance", a.instance_id),
            *("--dry-run", "--account", ACCOUNT, "--region", REGION),
        ],
        deployment.env,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    event = json.loads(dry_run.stdout)
    signal_queue = _signal_queue_url(deployment)
    before = record_of(fleet, a.instance_id)
    fleet.sqs.send_message(QueueUrl=signal_queue, MessageBody=json.dumps(event))
    first = processed(deployment, event["id"])
    assert first["managed"] is True
    fleet.sqs.send_message(QueueUrl=signal_queue, MessageBody=json.dumps(event))
    group = _log_group(deployment, "Dispatcher")

    def duplicates() -> float:
        return sum(_emf_value(m, contracts.Metric.SIGNALS_DUPLICATE.value) for m in log_messages(group))

    assert wait_for("the duplicate to be recognised", duplicates) == 1
    assert record_of(fleet, a.instance_id) == before  # an ended instance stays as it was


def test_rebalance_and_health_events_request_a_replacement(deployment: Deployment, fleet: Fleet) -> None:
    b = fleet.managed[1]
    for kind in ("rebalance", "health"):
        event_id = send(deployment, kind, b.instance_id)
        outcome = processed(deployment, event_id)
        # rebalance_policy "replace": one replacement request, no drain. It is skipped here:
        # the emulator's instance is not an ASG member (no DetachInstances in the emulator).
        assert [a["action"] for a in outcome["results"]] == ["RequestReplacement"], outcome
        assert outcome["results"][0]["detached"] is False
        assert "not in" in outcome["results"][0]["skipped"]
        record = record_of(fleet, b.instance_id)
        assert record is not None and record.state is InstanceState.READY
        assert {lease.message_id for lease in fleet.leases.for_instance(b.instance_id)} == set(b.message_ids)


def test_scale_in_drains_then_the_stop_requeues(deployment: Deployment, fleet: Fleet) -> None:
    b = fleet.managed[1]
    event_id = send(deployment, "lifecycle-terminate", b.instance_id)
    record = wait_for_signal(fleet, b.instance_id, event_id)
    assert record.state is InstanceState.DRAINING
    event_id = send(deployment, "state-change", b.instance_id, "--state", "stopping")
    record = wait_for_signal(fleet, b.instance_id, event_id)
    assert record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.SCALE_IN
    seen = receivable(fleet, set(b.message_ids))
    assert set(b.message_ids) <= seen
    assert fleet.leases.for_instance(b.instance_id) == []


def test_no_signal_was_dead_lettered(deployment: Deployment, fleet: Fleet) -> None:
    sqs = fleet.sqs
    for url in _queue_urls(deployment):
        if "SignalDeadLetter" in url or "SignalDLQ" in url.replace("-", ""):
            attributes = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
            )
            assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0", url
    messages = log_messages(_log_group(deployment, "Dispatcher"))
    received = sum(_emf_value(m, contracts.Metric.SIGNALS_RECEIVED.value) for m in messages)
    unmanaged = sum(_emf_value(m, contracts.Metric.SIGNALS_UNMANAGED.value) for m in messages)
    rejected = sum(_emf_value(m, contracts.Metric.SIGNALS_REJECTED.value) for m in messages)
    duplicates = sum(_emf_value(m, contracts.Metric.SIGNALS_DUPLICATE.value) for m in messages)
    deployment.facts["dispatcher_signals"] = (
        f"received {received}, unmanaged {unmanaged}, rejected {rejected}"
    )
    assert received == 13  # 11 test events + one event delivered twice
    assert unmanaged == 2
    assert duplicates == 1
    assert rejected == 0


# ------------------------------------------------------------------------------ the API
def test_health_fleet_trigger_and_history_through_the_operator_cli(
    deployment: Deployment, fleet: Fleet
) -> None:
    status = cli_json(deployment, "status")
    assert status["health"]["status"] in {"healthy", "ok", "degraded"}
    from spotguard_tools.api_client import OpsApiClient  # noqa: PLC0415 - the CLI's own client

    client = OpsApiClient(api_url(deployment))
    listed = client.request("GET", "/fleet")
    ids = {item["instanceId"]: item for item in listed["instances"]}
    for worker in fleet.managed:
        assert ids[worker.instance_id]["state"] == "ended"
    assert fleet.unmanaged.instance_id not in ids
    triggered = cli_json(deployment, "trigger", "--dry-run")
    job_id = triggered.get("jobId") or triggered.get("job", {}).get("jobId")
    assert job_id, triggered

    # The trigger starts the reconciler asynchronously; the job shows up when it has run.
    def finished() -> dict[str, Any] | None:
        jobs = {job["jobId"]: job for job in cli_json(deployment, "history")["jobs"]}
        return jobs.get(job_id) if jobs.get(job_id, {}).get("status") in {"completed", "failed"} else None

    job = wait_for(f"job {job_id} in the history", finished, timeout=30)
    assert job["dryRun"] is True
    assert job["status"] == "completed", job
    assert job["trigger"] == "manual"


def test_an_unsigned_call_is_refused(deployment: Deployment) -> None:
    request = urllib.request.Request(api_url(deployment) + "health", method="GET")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in {401, 403}


# ------------------------------------------------------------------------------ watchdog
def test_the_watchdog_runs_on_its_schedule_and_heartbeats(deployment: Deployment) -> None:
    group = _log_group(deployment, "Watchdog")

    def heartbeats() -> float:
        return sum(_emf_value(m, contracts.Metric.WATCHDOG_HEARTBEAT.value) for m in log_messages(group))

    # rate(1 minute): the first run comes within about a minute of the deploy.
    assert wait_for("a scheduled watchdog run", heartbeats, timeout=90) >= 1


# ------------------------------------------------------------------------------ destroy
def test_destroy_removes_the_stack(deployment: Deployment) -> None:
    t0 = time.monotonic()
    result = deployment.cdk.run("destroy", STACK_NAME, "--force", synthesized=True)
    deployment.timings["destroy_s"] = time.monotonic() - t0
    deployment.destroyed = True
    assert result.returncode == 0, result.stderr[-3000:]
    stacks = boto3.client("cloudformation").list_stacks()["StackSummaries"]
    live = [s for s in stacks if s["StackName"] == STACK_NAME and s["StackStatus"] != "DELETE_COMPLETE"]
    assert not live, live


# ------------------------------------------------------------------------------ internals
def _queue_urls(deployment: Deployment) -> list[str]:
    return deployment.physical_ids("AWS::SQS::Queue")


def _signal_queue_url(deployment: Deployment) -> str:
    (url,) = [u for u in _queue_urls(deployment) if "SignalQueue" in u]
    return url


def _queue_empty(sqs: Any, url: str) -> bool:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return (
        attributes["ApproximateNumberOfMessages"] == "0"
        and attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    )


def _log_group(deployment: Deployment, function: str) -> str:
    """The deployed log group of a function (``Dispatcher`` -> spotguard_functions.dispatcher),
    as its template's LoggingConfig names it."""
    handler = f"spotguard_functions.{function.lower()}.handler"
    (config,) = [
        r["Properties"]["LoggingConfig"]
        for r in deployment.template["Resources"].values()
        if r["Type"] == "AWS::Lambda::Function" and r["Properties"].get("Handler") == handler
    ]
    return deployment.resources[config["LogGroup"]["Ref"]][1]


def _emf_value(message: str, metric: str) -> float:
    """The value of ``metric`` in one embedded-metric-format log line (0 if absent)."""
    if '"_aws"' not in message:
        return 0.0
    try:
        document = json.loads(message)
    except ValueError:
        return 0.0
    value = document.get(metric, 0)
    return float(sum(value) if isinstance(value, list) else value)
