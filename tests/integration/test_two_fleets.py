"""Two fleets in one account, each with its own control plane (as ``SpotWorkerFleet`` deploys
them): EventBridge hands every ``aws.ec2`` event to both fleets' rules, so each dispatcher and
watchdog must act on its own fleet's instances, leases, records and ASG only."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import boto3
import pytest
from spotguard_core import aws
from spotguard_core.contracts import InstanceState, Metric
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore

from tests.integration.control_plane_helpers import Output, dispatch, run_watchdog, sample_event, seed_record
from tests.support import control_plane_env
from tests.support.control_plane_env import ControlPlaneEnv

pytestmark = pytest.mark.integration


@pytest.fixture
def fleets(moto_server, monkeypatch) -> Iterator[tuple[ControlPlaneEnv, ControlPlaneEnv]]:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    saved = control_plane_env.environment_snapshot()
    from spotguard_functions import dispatcher  # noqa: PLC0415

    try:
        render = control_plane_env.build(fleet="render")
        encode = control_plane_env.build(fleet="encode")
        yield render, encode
    finally:
        control_plane_env.restore_environment(saved)
        dispatcher.reset_runtime()


def use(cp: ControlPlaneEnv) -> None:
    """Run the next handler call as this fleet's function: its own environment, and a fresh
    dispatcher runtime (another fleet's function is another Lambda container)."""
    from spotguard_functions import dispatcher  # noqa: PLC0415 - import after the env is set

    os.environ.update(cp.env)
    aws.reset_clients()
    dispatcher.reset_runtime()


def ready(cp: ControlPlaneEnv, instance_id: str, *, heartbeat_age: float = 0) -> None:
    """A ready record of ``cp``'s fleet, bootstrapped an hour ago, its heartbeat ``heartbeat_age`` s old."""
    now = time.time()
    seed_record(
        instance_id,
        fleet=cp.fleet,
        launched_at=now - 4000,
        bootstrap_deadline_at=now - 2800,
        ready_at=now - 3900,
        heartbeat_at=now - heartbeat_age,
    )


def state_of(instance_id: str) -> str:
    reservations = boto3.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def test_a_spot_warning_reaches_both_dispatchers_and_only_its_fleet_acts(fleets, capfd):
    render, encode = fleets
    use(render)
    [render_instance] = render.launch_in_asg(1)
    ready(render, render_instance)
    render_leases = render.lease_messages(render_instance, 3)
    use(encode)
    [encode_instance] = encode.launch_in_asg(1)
    ready(encode, encode_instance)
    encode.lease_messages(encode_instance, 2)
    event = sample_event("spot_interruption_warning", render_instance)
    capfd.readouterr()

    # The encode fleet's dispatcher gets the same event (its rule sees every aws.ec2 event).
    use(encode)
    assert dispatch(event) == {"batchItemFailures": []}
    assert Output(capfd.readouterr().out).metric(Metric.SIGNALS_UNMANAGED) == 1
    assert FleetStore().get(render_instance) is None  # nothing written into encode's table
    assert FleetStore().get(encode_instance).state is InstanceState.READY  # type: ignore[union-attr]
    assert encode.asg_instance_ids() == [encode_instance]
    use(render)
    assert render.asg_instance_ids() == [render_instance]  # not detached by the other fleet
    assert len(LeaseStore().for_instance(render_instance)) == len(render_leases)
    assert FleetStore().get(render_instance).state is InstanceState.READY  # type: ignore[union-attr]

    # Its own dispatcher acts: drains, detaches from its own ASG only.
    assert dispatch(event) == {"batchItemFailures": []}
    assert FleetStore().get(render_instance).state is InstanceState.DRAINING  # type: ignore[union-attr]
    assert render_instance not in render.asg_instance_ids()
    use(encode)
    assert encode.asg_instance_ids() == [encode_instance]
    assert FleetStore().get(encode_instance).state is InstanceState.READY  # type: ignore[union-attr]
    assert len(LeaseStore().for_instance(encode_instance)) == 2


def test_a_state_change_requeues_only_the_owning_fleets_leases(fleets):
    render, encode = fleets
    use(render)
    [render_instance] = render.launch_in_asg(1)
    ready(render, render_instance)
    render.lease_messages(render_instance, 4)
    use(encode)
    [encode_instance] = encode.launch_in_asg(1)
    ready(encode, encode_instance)
    encode.lease_messages(encode_instance, 3)
    event = sample_event("state_change_terminated", render_instance)

    use(encode)
    dispatch(event)
    assert encode.receive_all() == []  # encode's in-flight work stays with its worker
    assert len(LeaseStore().for_instance(encode_instance)) == 3
    use(render)
    assert render.receive_all() == []  # and render's too: encode's dispatcher did not touch it

    dispatch(event)
    assert len(render.receive_all()) == 4  # requeued by its own control plane
    use(encode)
    assert encode.receive_all() == []


def test_a_watchdog_never_ends_another_fleets_instance(fleets):
    render, encode = fleets
    use(render)
    [render_instance] = render.launch_in_asg(1)
    ready(render, render_instance, heartbeat_age=3600)  # stale in its own fleet
    use(encode)
    [encode_instance] = encode.launch_in_asg(1)
    ready(encode, encode_instance)
    # A stray record in encode's table claims render's instance with a stale heartbeat.
    ready(encode, render_instance, heartbeat_age=3600)

    use(encode)
    run_watchdog()
    assert state_of(render_instance) == "running"  # tagged for render: not encode's to end
    assert state_of(encode_instance) == "running"
    use(render)
    assert render.asg_instance_ids() == [render_instance]

    run_watchdog()  # its own watchdog ends it
    assert state_of(render_instance) in {"shutting-down", "terminated"}
    assert state_of(encode_instance) == "running"
