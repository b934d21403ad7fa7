"""The real watchdog handler against moto: deadlines, stale heartbeats, orphaned leases."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from spotguard_core.contracts import (
    FLEET_TAG_KEY,
    EndReason,
    Env,
    InstanceState,
    Lease,
    Metric,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore

from tests.integration.control_plane_helpers import Output, dispatch, run_watchdog, sample_event, seed_record
from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX, moto_fleet_key

pytestmark = pytest.mark.integration


def launching(instance_id: str, *, age: float) -> None:
    now = time.time()
    seed_record(
        instance_id, InstanceState.LAUNCHING, launched_at=now - age, bootstrap_deadline_at=now - age + 1200
    )


def test_past_deadline_not_ready_is_terminated_ready_and_unmanaged_untouched(cp, capfd):
    stuck, healthy = cp.launch_in_asg(2)
    launching(stuck, age=1500)
    now = time.time()
    seed_record(healthy, launched_at=now - 5000, bootstrap_deadline_at=now - 3800, heartbeat_at=now - 10)
    # An old instance without the fleet tag whose record claims it (a stray write): the
    # watchdog must refuse to terminate it.
    foreign = cp.run_instance(tags={"team": "other"})
    launching(foreign, age=5000)
    cp.lease_messages(stuck, 2)

    report = run_watchdog()

    assert cp.instance_state(stuck) in ("shutting-down", "terminated")
    record = FleetStore().get(stuck)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.BOOTSTRAP_DEADLINE
    assert len(cp.receive_all()) == 2  # its leased work is back on the queue
    assert cp.instance_state(healthy) == "running"
    assert FleetStore().get(healthy).state is InstanceState.READY  # type: ignore[union-attr]
    assert cp.instance_state(foreign) == "running"
    assert report["fleet_size"] == 3
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.WATCHDOG_HEARTBEAT) == 1
    assert out.metric(Metric.FLEET_SIZE) == 3
    assert out.metric(Metric.TERMINATED_BY_WATCHDOG) == 1
    assert out.metric(Metric.BOOTSTRAP_FAILURES) == 1


def test_stale_heartbeat_is_terminated(cp):
    [instance] = cp.launch_in_asg(1)
    now = time.time()
    seed_record(instance, ready_at=now - 3000, heartbeat_at=now - 600)
    run_watchdog()
    assert cp.instance_state(instance) in ("shutting-down", "terminated")
    assert FleetStore().get(instance).end_reason is EndReason.HEARTBEAT_STALE  # type: ignore[union-attr]


def test_orphaned_leases_are_released(cp):
    [gone] = cp.launch_in_asg(1)
    now = time.time()
    seed_record(gone, InstanceState.ENDED, ended_at=now - 300)
    leases = cp.lease_messages(gone, 3)
    # A lease of an instance with no record at all, stale for an hour.
    [other] = cp.lease_messages("i-0123456789abcdef0", 1)
    LeaseStore().put(
        Lease(
            instance_id=other.instance_id,
            message_id=other.message_id,
            receipt_handle=other.receipt_handle,
            queue_url=other.queue_url,
            leased_at=now - 3600,
            heartbeat_at=now - 3600,
        )
    )

    report = run_watchdog()

    assert report["orphan_leases_released"] == 4
    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in [*leases, other]}
    assert list(LeaseStore().scan_leases()) == []


def draining_with_leases(
    cp, *, heartbeat_age: float, deadline_age: float, interrupted_age: float
) -> tuple[str, list[Lease]]:
    """An ASG instance draining past its deadline (times given as seconds ago) holding four leases."""
    [instance] = cp.launch_in_asg(1)
    now = time.time()
    seed_record(
        instance,
        InstanceState.DRAINING,
        heartbeat_at=now - heartbeat_age,
        drain_deadline_at=now - deadline_age,
        interrupted_at=now - interrupted_age,
    )
    return instance, cp.lease_messages(instance, 4)


# Replaces ``test_draining_past_deadline_requeues``, which encoded the wrong promise (the
# watchdog requeued a live agent's running tasks every minute after the deadline: duplicate
# work while the first copy still ran). The promise now: a draining agent whose heartbeat is
# fresh keeps its tasks; only a gone agent's (stale heartbeat) are requeued.
def test_draining_past_deadline_never_takes_a_live_agents_tasks(cp):
    instance, leases = draining_with_leases(cp, heartbeat_age=5, deadline_age=30, interrupted_age=150)
    run_watchdog()
    run_watchdog()
    assert cp.receive_all() == []
    assert len(LeaseStore().for_instance(instance)) == len(leases)
    assert FleetStore().get(instance).state is InstanceState.DRAINING  # type: ignore[union-attr]


def test_draining_agent_that_is_gone_has_its_tasks_requeued_as_interruptions(cp):
    instance, leases = draining_with_leases(cp, heartbeat_age=600, deadline_age=400, interrupted_age=520)
    run_watchdog()
    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    record = FleetStore().get(instance)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.SPOT_RECLAIM  # it went away for the warning it had
    assert all(LeaseStore().requeue_count(lease.message_id) == 1 for lease in leases)


def test_unmanaged_instance_without_record_is_never_touched(cp):
    old = cp.run_instance(tags={FLEET_TAG_KEY: "another-fleet"})
    run_watchdog()
    assert cp.instance_state(old) == "running"
    assert FleetStore().get(old) is None


def test_baseline_mode_leaves_orphaned_leases_to_the_visibility_timeout(cp, monkeypatch):
    monkeypatch.setenv("SPOTGUARD_REQUEUE_ENABLED", "false")
    [gone] = cp.launch_in_asg(1)
    seed_record(gone, InstanceState.ENDED)
    cp.lease_messages(gone, 2)
    report = run_watchdog()
    assert report["orphan_leases_released"] == 0
    assert cp.receive_all() == []
    assert len(LeaseStore().for_instance(gone)) == 2


def test_detached_instance_drains_once_its_replacement_is_in_service_then_ends(cp, capfd):
    """Issue 12: a rebalance under ``replace`` detaches the instance; once its replacement is in
    service it gets a drain order on its fleet record, and once drained it is terminated."""
    [old] = cp.launch_in_asg(1)
    seed_record(old)
    cp.lease_messages(old, 1)
    dispatch(sample_event("rebalance_recommendation", old))
    [new] = cp.asg_instance_ids()  # moto launched the replacement into the group
    record = FleetStore().get(old)
    assert record is not None and record.state is InstanceState.READY and record.replacement_requested_at

    run_watchdog()  # the replacement has not bootstrapped yet: the old one keeps working
    assert FleetStore().get(old).state is InstanceState.READY  # type: ignore[union-attr]

    seed_record(new, launched_at=time.time())
    run_watchdog()
    record = FleetStore().get(old)
    assert record is not None and record.state is InstanceState.DRAINING and record.replaced_by == new
    assert record.drain_deadline_at is not None and record.drain_deadline_at > time.time()
    assert cp.instance_state(old) == "running"
    assert len(LeaseStore().for_instance(old)) == 1  # a draining live agent keeps its task

    FleetStore().update_fields(old, {"drained_at": time.time()})  # what the agent reports
    capfd.readouterr()
    run_watchdog()
    assert cp.instance_state(old) in ("shutting-down", "terminated")
    record = FleetStore().get(old)
    assert record is not None and record.end_reason is EndReason.RETIRED
    assert Output(capfd.readouterr().out).metric(Metric.INSTANCES_RETIRED) == 1
    assert cp.instance_state(new) == "running"


def test_replacements_dated_by_their_whole_second_launch_events_are_matched(cp):
    """Issue 12: the ASG launches the replacement during ``DetachInstances``, and its launch is
    dated by a lifecycle event with whole seconds: it looks launched just before the recorded
    request. Each detached instance must still be matched to its own replacement (a miss used
    to leave one detached instance running outside the ASG)."""
    first, second, other = cp.launch_in_asg(3)
    for instance in (first, second, other):
        seed_record(instance)
    dispatch(sample_event("rebalance_recommendation", first))
    dispatch(sample_event("rebalance_recommendation", second))
    replacements = sorted(set(cp.asg_instance_ids()) - {other})
    assert len(replacements) == 2
    for old, new in zip((first, second), replacements, strict=True):
        requested = FleetStore().get(old).replacement_requested_at  # type: ignore[union-attr]
        assert requested is not None
        seed_record(new, launched_at=float(int(requested)) - 1.0, ready_at=time.time())

    run_watchdog()

    records = {old: FleetStore().get(old) for old in (first, second)}
    assert all(r is not None and r.state is InstanceState.DRAINING for r in records.values())
    assert {r.replaced_by for r in records.values() if r is not None} == set(replacements)
    assert FleetStore().get(other).state is InstanceState.READY  # type: ignore[union-attr]


def test_replacement_in_service_publishes_instance_replaced_once(cp):
    queue = cp.bus_to_queue("replaced", '{"detail-type": ["instance.replaced"]}')
    old, new = cp.launch_in_asg(2)
    seed_record(old, replacement_requested_at=time.time() - 60)
    seed_record(new, launched_at=time.time())
    run_watchdog()
    run_watchdog()
    messages = cp.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
    assert len(messages) == 1
    detail = json.loads(messages[0]["Body"])["detail"]
    assert detail["instanceId"] == old and detail["replacementInstanceId"] == new


def test_detached_instance_past_its_drain_deadline_is_ended_only_if_tagged(cp):
    [ours] = cp.launch_in_asg(1)
    foreign = cp.run_instance(tags={"team": "other"})
    now = time.time()
    for instance in (ours, foreign):
        seed_record(
            instance, InstanceState.DRAINING, replacement_requested_at=now - 900, drain_deadline_at=now - 10
        )
    leases = cp.lease_messages(ours, 2)
    run_watchdog()
    assert cp.instance_state(ours) in ("shutting-down", "terminated")
    assert FleetStore().get(ours).end_reason is EndReason.RETIRED  # type: ignore[union-attr]
    assert cp.receive_all() == []  # not taken in the sweep that ends it: its agent was alive
    assert cp.instance_state(foreign) == "running"
    assert FleetStore().get(foreign).state is InstanceState.DRAINING  # type: ignore[union-attr]
    run_watchdog()  # now ended: the orphan sweep releases them, counted as interruptions
    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    assert all(LeaseStore().requeue_count(lease.message_id) == 1 for lease in leases)


def test_detached_instance_whose_replacement_never_comes_drains_after_the_wait(cp):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance, replacement_requested_at=time.time() - 7200)
    run_watchdog()
    record = FleetStore().get(instance)
    assert record is not None and record.state is InstanceState.DRAINING and record.drain_deadline_at


def test_unreadable_items_are_skipped_one_at_a_time_and_counted(cp, capfd):
    """Issue 13: one bad item never stops the sweep for the whole fleet."""
    broken, stale = cp.launch_in_asg(2)
    fleet_table = boto3.resource("dynamodb").Table(cp.tables[Env.FLEET_TABLE])
    fleet_table.put_item(Item={**moto_fleet_key(broken), "fleet": cp.fleet, "state": "exploded"})
    fleet_table.put_item(
        Item={**moto_fleet_key("i-0aaaaaaaaaaaaaaaa"), "state": "ready", "heartbeat_at": "soon"}
    )
    boto3.resource("dynamodb").Table(cp.tables[Env.LEASE_TABLE]).put_item(
        Item={
            "pk": f"{MOTO_INSTANCE_ARN_PREFIX}i-0bbbbbbbbbbbbbbbb",
            "sk": "lease#m1",
            "instance_id": "i-0bbbbbbbbbbbbbbbb",
        }
    )
    now = time.time()
    seed_record(stale, ready_at=now - 3000, heartbeat_at=now - 600)
    capfd.readouterr()

    report = run_watchdog()

    assert report["unreadable_items"] == 3 and report["errors"] == []
    assert cp.instance_state(stale) in ("shutting-down", "terminated")  # the sweep went on
    assert cp.instance_state(broken) == "running"
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.UNREADABLE_TABLE_ITEMS) == 3
    assert out.metric(Metric.WATCHDOG_HEARTBEAT) == 1


def test_a_reclaimed_instance_gone_before_its_replacement_is_ready_is_still_announced(cp):
    """The usual spot case: the warning's two minutes end before the replacement bootstraps."""
    queue = cp.bus_to_queue("replaced-late", '{"detail-type": ["instance.replaced"]}')
    [old] = cp.launch_in_asg(1)
    seed_record(old)
    dispatch(sample_event("spot_interruption_warning", old))
    dispatch(sample_event("state_change_terminated", old))
    [new] = cp.asg_instance_ids()
    seed_record(new, launched_at=time.time())

    run_watchdog()
    run_watchdog()

    record = FleetStore().get(old)
    assert record is not None and record.state is InstanceState.ENDED and record.replaced_by == new
    assert record.end_reason is EndReason.SPOT_RECLAIM
    messages = cp.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
    assert [json.loads(m["Body"])["detail"]["replacementInstanceId"] for m in messages] == [new]
