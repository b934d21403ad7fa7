"""Lifecycle answers are not proof of a bootstrap (issue 13).

AWS has no condition key for the calling instance on ``CompleteLifecycleAction``: any instance
of the fleet's ASG may CONTINUE or ABANDON another's hook. The control plane therefore never
takes a lifecycle answer as a verified bootstrap; it checks each instance's own fleet record:

- CONTINUEd into service without its bootstrap report, the instance is a failed bootstrap at
  its deadline (terminated through the failed-bootstrap path, ``BootstrapFailures``), in any
  state short of ended and even when the launch event that sets the deadline never came;
- ABANDONed (terminated) while it holds leases, its work comes back through the requeue path.

moto answers ``CompleteLifecycleAction`` without acting on it, so the tests do to EC2 what the
ASG would (the instance is InService; ABANDON terminates it) and send the events AWS sends.
"""

from __future__ import annotations

import time

import pytest
from spotguard_core.contracts import BootstrapStatus, EndReason, InstanceState, Metric
from spotguard_core.lease_store import LeaseStore

from tests.integration.control_plane_helpers import (
    Output,
    dispatch,
    fleet_record,
    run_watchdog,
    sample_event,
    seed_record,
)

pytestmark = pytest.mark.integration


def _assert_failed_bootstrap(cp, instance: str, leases: int, out: Output) -> None:
    assert cp.instance_state(instance) in ("shutting-down", "terminated")
    record = fleet_record(instance)
    assert record is not None and record.state is InstanceState.ENDED
    assert record.end_reason is EndReason.BOOTSTRAP_DEADLINE
    assert len(cp.receive_all()) == leases
    assert LeaseStore().for_instance(instance) == []
    assert out.metric(Metric.BOOTSTRAP_FAILURES) == 1
    assert out.metric(Metric.TERMINATED_BY_WATCHDOG) == 1


def test_continued_by_another_and_drained_without_a_bootstrap_is_a_failed_bootstrap(cp, capfd):
    """A peer CONTINUEd its hook (InService, no bootstrap report), then the ASG scaled it in:
    the drain order moved the record past launching, which alone used to end every check."""
    [victim] = cp.launch_in_asg(1)
    now = time.time()
    seed_record(victim, InstanceState.LAUNCHING, launched_at=now - 1500, bootstrap_deadline_at=now - 300)
    dispatch(sample_event("lifecycle_terminate", victim))
    assert fleet_record(victim).state is InstanceState.DRAINING  # type: ignore[union-attr]
    cp.lease_messages(victim, 2)
    capfd.readouterr()

    run_watchdog()

    _assert_failed_bootstrap(cp, victim, 2, Output(capfd.readouterr().out))


def test_continued_without_a_recorded_deadline_is_checked_against_its_launch_time(cp, capfd):
    """The launch event that sets the deadline never came: the launch time and the configured
    bootstrap time decide."""
    [victim] = cp.launch_in_asg(1)
    seed_record(
        victim, InstanceState.LAUNCHING, launched_at=time.time() - 3 * 3600, bootstrap_deadline_at=None
    )
    capfd.readouterr()

    run_watchdog()

    _assert_failed_bootstrap(cp, victim, 0, Output(capfd.readouterr().out))


def test_a_verified_bootstrap_is_left_alone_in_every_state(cp):
    ready, draining = cp.launch_in_asg(2)
    now = time.time()
    seed_record(ready, launched_at=now - 5000, bootstrap_deadline_at=now - 3800)
    seed_record(draining, InstanceState.DRAINING, launched_at=now - 5000, bootstrap_deadline_at=now - 3800)
    young = cp.launch_in_asg(1)[0]
    seed_record(young, InstanceState.LAUNCHING, launched_at=now - 60, bootstrap_deadline_at=None)

    run_watchdog()

    for instance in (ready, draining, young):
        assert cp.instance_state(instance) == "running", instance
        record = fleet_record(instance)
        assert record is not None and record.state is not InstanceState.ENDED
    assert fleet_record(ready).bootstrap_status is BootstrapStatus.READY  # type: ignore[union-attr]


def test_abandoned_by_another_while_holding_leases_gets_its_work_requeued(cp, capfd):
    """A peer ABANDONed the hook of a busy instance: the ASG terminates it; the state change
    requeues what it held (the same path as any termination)."""
    [victim] = cp.launch_in_asg(1)
    seed_record(victim)
    leases = cp.lease_messages(victim, 3)
    cp.ec2.terminate_instances(InstanceIds=[victim])  # what ABANDON makes the ASG do
    capfd.readouterr()

    dispatch(sample_event("state_change_terminated", victim))

    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    assert LeaseStore().for_instance(victim) == []
    record = fleet_record(victim)
    assert record is not None and record.state is InstanceState.ENDED
    assert Output(capfd.readouterr().out).metric(Metric.MESSAGES_REQUEUED) == 3


def test_abandoned_with_the_state_change_lost_is_recovered_by_the_watchdog(cp):
    [victim] = cp.launch_in_asg(1)
    now = time.time()
    seed_record(victim, ready_at=now - 3000, heartbeat_at=now - 600)  # its agent went silent
    leases = cp.lease_messages(victim, 2)
    cp.ec2.terminate_instances(InstanceIds=[victim])

    run_watchdog()

    assert {m["MessageId"] for m in cp.receive_all()} == {lease.message_id for lease in leases}
    assert fleet_record(victim).end_reason is EndReason.HEARTBEAT_STALE  # type: ignore[union-attr]
