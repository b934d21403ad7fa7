"""Bad input never acts, never poisons the batch, and each case says so in a log line and a metric."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spotguard_core.contracts import (
    Env,
    InstanceState,
    Metric,
)
from spotguard_core.fleet_store import FleetStore
from spotguard_core.lease_store import LeaseStore

from tests.integration.control_plane_helpers import Output, dispatch, sample_event, seed_record

pytestmark = pytest.mark.integration


def test_unmanaged_instance_is_acknowledged_once_looked_up_and_never_touched(cp, capfd, caplog):
    foreign = cp.run_instance(tags={"team": "someone-else"})
    cp.lease_messages(foreign, 2)  # even leases in our table (a stray write) are not requeued
    warning = sample_event("spot_interruption_warning", foreign)
    ended = sample_event("state_change_terminated", foreign)

    response = dispatch(warning, ended, sample_event("rebalance_recommendation", foreign))

    assert response == {"batchItemFailures": []}  # acknowledged, never retried
    assert FleetStore().get(foreign) is None
    assert cp.instance_state(foreign) == "running"
    assert len(LeaseStore().for_instance(foreign)) == 2
    assert cp.receive_all() == []
    from spotguard_functions import dispatcher  # noqa: PLC0415 - imported once the env is set

    # Three events, one DescribeTags: the answer is cached in-process.
    assert dispatcher.runtime().control_plane.managed_check.tag_lookups == 1
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.SIGNALS_UNMANAGED) == 3
    assert sum("unmanaged instance" in m for m in caplog.messages) == 3


def test_bad_records_are_rejected_while_the_good_one_in_the_batch_succeeds(cp, capfd, caplog):
    [instance] = cp.launch_in_asg(1)
    seed_record(instance)
    good = sample_event("spot_interruption_warning", instance)
    wrong_account = sample_event("spot_interruption_warning", instance, account="999999999999")
    wrong_region = sample_event("spot_interruption_warning", instance, region="eu-west-1")
    unknown = sample_event("spot_interruption_warning", instance, **{"detail-type": "EC2 Fleet Error"})
    missing = sample_event("state_change_terminated", instance)
    del missing["detail"]["state"]
    garbage = "{not json"

    response = dispatch(wrong_account, garbage, good, wrong_region, unknown, missing)

    assert response == {"batchItemFailures": []}
    record = FleetStore().get(instance)
    assert record is not None and record.state is InstanceState.DRAINING  # only the good one acted
    assert record.last_signal is not None and record.last_signal["event_id"] == good["id"]
    out = Output(capfd.readouterr().out)
    assert out.metric(Metric.SIGNALS_REJECTED) == 5
    rejected = [m for m in caplog.messages if m.startswith("signal rejected")]
    assert len(rejected) == 5
    assert any("wrong account/region" in m for m in rejected)
    assert any("unknown detail-type" in m for m in rejected)
    assert any("not JSON" in m for m in rejected)
    assert any("detail.state" in m for m in rejected)


def test_transient_failure_is_reported_for_retry_and_rejections_are_not(cp, monkeypatch):
    [instance] = cp.launch_in_asg(1)
    monkeypatch.setenv(Env.FLEET_TABLE.value, "no-such-table")  # every AWS read fails
    good = sample_event("spot_interruption_warning", instance)

    event_response = dispatch("garbage", good)

    failures = event_response["batchItemFailures"]
    assert len(failures) == 1  # only the good record, whose failure is transient


MUTATIONS = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=30),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
FIELDS = ["id", "detail-type", "source", "account", "time", "region", "resources", "detail", "version"]
DETAIL_FIELDS = ["instance-id", "instance-action", "state", "EC2InstanceId", "affectedEntities", "startTime"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_events_never_raise_and_never_act_on_unmanaged(cp, data):
    foreign = getattr(cp, "_foreign", None)
    if foreign is None:
        foreign = cp.run_instance(tags={"team": "other"})
        cp._foreign = foreign  # type: ignore[attr-defined]
    kind = data.draw(
        st.sampled_from(
            [
                "spot_interruption_warning",
                "state_change_terminated",
                "rebalance_recommendation",
                "lifecycle_launch",
                "lifecycle_terminate",
                "health_scheduled_change",
            ]
        )
    )
    event = copy.deepcopy(sample_event(kind, foreign, second_instance_id=foreign))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        if data.draw(st.booleans()) and isinstance(event.get("detail"), dict):
            event["detail"][data.draw(st.sampled_from(DETAIL_FIELDS))] = data.draw(MUTATIONS)
        else:
            key = data.draw(st.sampled_from(FIELDS))
            if data.draw(st.booleans()):
                event.pop(key, None)
            else:
                event[key] = data.draw(MUTATIONS)
    body = json.dumps(event)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(min_value=0, max_value=len(body)))
        body = body[:cut]

    response = dispatch(body)

    assert response == {"batchItemFailures": []}
    assert FleetStore().get(foreign) is None
    assert cp.instance_state(foreign) == "running"
