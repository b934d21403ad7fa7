"""The pure decision functions: one per signal kind, by state, never by arrival order."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spotguard_core.contracts import (
    BootstrapStatus,
    EndReason,
    FleetRecord,
    InstanceState,
    NotificationType,
    RebalancePolicy,
    Signal,
    SignalKind,
    SignalSource,
)
from spotguard_core.control_settings import ControlSettings, SettingsError
from spotguard_core.decisions import (
    CorrectEndReason,
    Notify,
    RecordDraining,
    RecordEnded,
    RecordLaunching,
    RequestReplacement,
    RequeueLeases,
    TerminateInstance,
    counts_as_interruption,
    decide,
)
from spotguard_core.managed import TtlLru
from spotguard_tools.cli import main

INSTANCE = "i-1234567890abcdef0"
NOW = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
SETTINGS = ControlSettings(fleet="render", asg_name="spotguard-render")


def signal(
    kind: SignalKind,
    *,
    source: SignalSource = SignalSource.EVENTBRIDGE,
    event_id: str = "e",
    event_time: datetime | None = NOW,
    **fields,
) -> Signal:
    """A signal about ``INSTANCE`` received at ``NOW`` (an EventBridge event of that time by
    default); ``fields``: the rest of ``Signal``'s (``state``, ``deadline``, ``attributes`` …)."""
    return Signal(
        instance_id=INSTANCE,
        kind=kind,
        source=source,
        event_id=event_id,
        received_at=NOW,
        event_time=event_time,
        **fields,
    )


def record(state: InstanceState, **kwargs) -> FleetRecord:
    return FleetRecord(instance_id=INSTANCE, fleet="render", state=state, **kwargs)


def names(actions) -> list[str]:
    return [a.name for a in actions]


def test_warning_drains_replaces_notifies_and_does_not_requeue():
    actions = decide(
        signal(SignalKind.SPOT_INTERRUPTION, deadline=NOW + timedelta(minutes=2)),
        record(InstanceState.READY),
        SETTINGS,
    )
    assert names(actions) == ["RecordDraining", "RequestReplacement", "Notify"]
    draining = actions[0]
    assert isinstance(draining, RecordDraining)
    assert draining.drain_deadline_at == (NOW + timedelta(minutes=2)).timestamp()
    assert isinstance(actions[2], Notify) and actions[2].notification is NotificationType.INSTANCE_INTERRUPTED
    assert not any(isinstance(a, RequeueLeases) for a in actions)


def test_warning_without_early_replacement():
    settings_ = ControlSettings(fleet="render", asg_name="g", early_replacement=False)
    actions = decide(signal(SignalKind.SPOT_INTERRUPTION), record(InstanceState.READY), settings_)
    assert names(actions) == ["RecordDraining", "Notify"]


def test_duplicate_warning_does_nothing_more():
    # Every fact of a handled warning is in the record: draining, replacement, notice sent.
    current = record(
        InstanceState.DRAINING,
        interrupted_at=NOW.timestamp(),
        replacement_requested_at=1.0,
        interruption_notified_at=2.0,
    )
    assert decide(signal(SignalKind.SPOT_INTERRUPTION), current, SETTINGS) == []


def test_warning_retried_after_a_failed_detach_redoes_only_what_did_not_happen():
    """Issue 12: the draining write succeeded, DetachInstances failed (throttled): the retry
    must still request the replacement and send the notice, and not write draining again."""
    after_failed_detach = record(InstanceState.DRAINING, interrupted_at=NOW.timestamp())
    actions = decide(signal(SignalKind.SPOT_INTERRUPTION), after_failed_detach, SETTINGS)
    assert names(actions) == ["RequestReplacement", "Notify"]
    detached_not_notified = record(InstanceState.DRAINING, interrupted_at=1.0, replacement_requested_at=2.0)
    assert names(decide(signal(SignalKind.SPOT_INTERRUPTION), detached_not_notified, SETTINGS)) == ["Notify"]


def test_capacity_reservation_warning_is_decided_like_a_spot_warning():
    warning = signal(SignalKind.CAPACITY_RESERVATION_INTERRUPTION, deadline=NOW + timedelta(minutes=2))
    actions = decide(warning, record(InstanceState.READY), SETTINGS)
    assert names(actions) == ["RecordDraining", "RequestReplacement", "Notify"]
    late = decide(warning, record(InstanceState.ENDED, end_reason=EndReason.TERMINATED), SETTINGS)
    assert isinstance(late[0], CorrectEndReason)
    assert late[0].end_reason is EndReason.CAPACITY_RESERVATION_RECLAIM


def test_notification_payload_is_camel_case():
    [*_, notify] = decide(signal(SignalKind.SPOT_INTERRUPTION), record(InstanceState.READY), SETTINGS)
    assert isinstance(notify, Notify)
    assert {"instanceId", "eventId", "kind", "deadline", "timestamp", "event"} <= set(notify.detail)
    assert not any("_" in key for key in notify.detail)


def test_late_warning_on_ended_record_only_corrects_the_reason():
    ended = record(InstanceState.ENDED, end_reason=EndReason.TERMINATED)
    actions = decide(signal(SignalKind.SPOT_INTERRUPTION), ended, SETTINGS)
    assert len(actions) == 1 and isinstance(actions[0], CorrectEndReason)
    already = record(InstanceState.ENDED, end_reason=EndReason.BOOTSTRAP_DEADLINE)
    assert decide(signal(SignalKind.SPOT_INTERRUPTION), already, SETTINGS) == []


@pytest.mark.parametrize(
    ("state", "current", "reason"),
    [
        ("terminated", record(InstanceState.DRAINING, interrupted_at=1.0), EndReason.SPOT_RECLAIM),
        ("stopped", record(InstanceState.DRAINING, interrupted_at=1.0), EndReason.SPOT_RECLAIM),
        ("stopping", record(InstanceState.READY), EndReason.STOPPED),
        ("shutting-down", None, EndReason.TERMINATED),
        (
            "terminated",
            record(InstanceState.DRAINING, last_signal={"kind": "lifecycle_terminate"}),
            EndReason.SCALE_IN,
        ),
    ],
)
def test_state_change_requeues_then_records_the_end(state, current, reason):
    actions = decide(signal(SignalKind.STATE_CHANGE, state=state), current, SETTINGS)
    assert names(actions) == ["RequeueLeases", "RecordEnded"]
    assert isinstance(actions[1], RecordEnded) and actions[1].end_reason is reason


@pytest.mark.parametrize(
    ("current", "counted"),
    [
        (record(InstanceState.DRAINING, interrupted_at=1.0), True),  # spot / capacity reservation
        (record(InstanceState.DRAINING, last_signal={"kind": "lifecycle_terminate"}), True),  # scale-in
        (record(InstanceState.DRAINING, drain_deadline_at=9.0), True),  # Health/rebalance drain order
        (record(InstanceState.DRAINING, replacement_requested_at=1.0), True),  # replaced early
        (record(InstanceState.READY), False),  # no notice: the message may have killed it
        (record(InstanceState.LAUNCHING, bootstrap_status=BootstrapStatus.FAILED), False),
        (None, False),
        (record(InstanceState.ENDED, end_reason=EndReason.SPOT_RECLAIM), True),
        (record(InstanceState.ENDED, end_reason=EndReason.HEARTBEAT_STALE), False),
    ],
)
def test_a_requeue_counts_as_interruption_only_after_a_notice(current, counted):
    [requeue, *_] = decide(signal(SignalKind.STATE_CHANGE, state="terminated"), current, SETTINGS)
    assert isinstance(requeue, RequeueLeases) and requeue.counts_as_interruption is counted
    assert counts_as_interruption(current) is counted


def test_watchdog_requeues_never_count_heartbeat_stale_or_bootstrap_as_interruptions():
    [stale, *_] = decide(signal(SignalKind.HEARTBEAT_STALE), record(InstanceState.READY), SETTINGS)
    assert isinstance(stale, RequeueLeases) and stale.counts_as_interruption is False
    boot = decide(signal(SignalKind.BOOTSTRAP_DEADLINE), record(InstanceState.LAUNCHING), SETTINGS)
    [requeue] = [a for a in boot if isinstance(a, RequeueLeases)]
    assert requeue.counts_as_interruption is False


def test_a_bootstrap_that_failed_and_shut_itself_down_is_bootstrap_failed():
    failed = record(
        InstanceState.LAUNCHING, bootstrap_status=BootstrapStatus.FAILED, bootstrap_reason="no bundle"
    )
    actions = decide(signal(SignalKind.STATE_CHANGE, state="shutting-down"), failed, SETTINGS)
    assert names(actions) == ["RequeueLeases", "RecordEnded", "Notify"]
    assert isinstance(actions[1], RecordEnded) and actions[1].end_reason is EndReason.BOOTSTRAP_FAILED
    assert isinstance(actions[2], Notify) and actions[2].notification is NotificationType.BOOTSTRAP_FAILED
    assert actions[2].detail["reason"] == "no bundle"


def test_state_change_on_ended_record_still_requeues_but_never_reopens():
    actions = decide(
        signal(SignalKind.STATE_CHANGE, state="terminated"), record(InstanceState.ENDED), SETTINGS
    )
    assert names(actions) == ["RequeueLeases"]


def test_running_state_does_nothing():
    assert (
        decide(signal(SignalKind.STATE_CHANGE, state="running"), record(InstanceState.READY), SETTINGS) == []
    )


def test_requeue_disabled_removes_requeues():
    baseline = ControlSettings(fleet="render", asg_name="g", requeue_enabled=False)
    actions = decide(
        signal(SignalKind.STATE_CHANGE, state="terminated"), record(InstanceState.READY), baseline
    )
    assert names(actions) == ["RecordEnded"]


@pytest.mark.parametrize("kind", [SignalKind.REBALANCE, SignalKind.HEALTH_SCHEDULED])
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RebalancePolicy.IGNORE, []),
        (RebalancePolicy.REPLACE, ["RequestReplacement"]),
        (RebalancePolicy.DRAIN, ["RecordDraining", "RequestReplacement"]),
    ],
)
def test_rebalance_and_health_follow_the_policy(kind, policy, expected):
    settings_ = ControlSettings(fleet="render", asg_name="g", rebalance_policy=policy)
    assert names(decide(signal(kind), record(InstanceState.READY), settings_)) == expected


def test_a_drain_decision_is_a_drain_order_with_a_deadline():
    drain = ControlSettings(fleet="render", asg_name="g", rebalance_policy=RebalancePolicy.DRAIN)
    start = NOW + timedelta(days=2)
    [order, _] = decide(
        signal(SignalKind.HEALTH_SCHEDULED, deadline=start), record(InstanceState.READY), drain
    )
    assert isinstance(order, RecordDraining) and order.drain_deadline_at == start.timestamp()
    [order, _] = decide(signal(SignalKind.REBALANCE), record(InstanceState.READY), drain)
    assert isinstance(order, RecordDraining)
    assert order.drain_deadline_at == NOW.timestamp() + drain.retire_drain_seconds
    # replace: detach now and remember the latest time it must drain by.
    [replace] = decide(
        signal(SignalKind.HEALTH_SCHEDULED, deadline=start), record(InstanceState.READY), SETTINGS
    )
    assert isinstance(replace, RequestReplacement) and replace.drain_deadline_at == start.timestamp()


def test_a_health_change_for_an_instance_already_replaced_early_is_a_drain_order_by_its_start():
    """Issue 12: a rebalance under ``replace`` detached it (no drain order yet); the later
    Health change must still reach it as a drain order with the start time as deadline."""
    start = NOW + timedelta(days=2)
    health = signal(SignalKind.HEALTH_SCHEDULED, deadline=start)
    detached = record(InstanceState.READY, replacement_requested_at=NOW.timestamp() - 60)
    [order] = decide(health, detached, SETTINGS)
    assert isinstance(order, RecordDraining) and order.drain_deadline_at == start.timestamp()
    # Already draining by a later deadline: tightened to the start; by an earlier one: kept.
    later = record(
        InstanceState.DRAINING, replacement_requested_at=1.0, drain_deadline_at=start.timestamp() + 600
    )
    [order] = decide(health, later, SETTINGS)
    assert isinstance(order, RecordDraining) and order.drain_deadline_at == start.timestamp()
    earlier = record(InstanceState.DRAINING, replacement_requested_at=1.0, drain_deadline_at=NOW.timestamp())
    assert decide(health, earlier, SETTINGS) == []
    # A second rebalance (no deadline) changes nothing; AWS's own reclaims keep their end.
    assert decide(signal(SignalKind.REBALANCE), detached, SETTINGS) == []
    warned = record(InstanceState.DRAINING, interrupted_at=1.0, replacement_requested_at=1.0)
    assert decide(health, warned, SETTINGS) == []


def test_under_drain_a_later_deadline_tightens_the_drain_order_never_loosens_it():
    drain = ControlSettings(fleet="render", asg_name="g", rebalance_policy=RebalancePolicy.DRAIN)
    start = NOW + timedelta(minutes=3)
    draining = record(
        InstanceState.DRAINING,
        replacement_requested_at=1.0,
        drain_deadline_at=NOW.timestamp() + drain.retire_drain_seconds,
    )
    [order] = decide(signal(SignalKind.HEALTH_SCHEDULED, deadline=start), draining, drain)
    assert isinstance(order, RecordDraining) and order.drain_deadline_at == start.timestamp()
    assert decide(signal(SignalKind.REBALANCE), draining, drain) == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("instance-stop", ["RequestReplacement"]),
        ("instance-retirement", ["RequestReplacement"]),
        ("system-reboot", []),
        ("instance-reboot", []),
        ("system-maintenance", []),
    ],
)
def test_imds_maintenance_is_decided_by_its_code(code, expected):
    maintenance = signal(
        SignalKind.MAINTENANCE_SCHEDULED,
        source=SignalSource.IMDS,
        event_id="m",
        event_time=None,
        attributes={"code": code},
    )
    assert names(decide(maintenance, record(InstanceState.READY), SETTINGS)) == expected


def test_replacement_in_service_records_announces_and_sends_the_drain_order():
    detached = record(InstanceState.READY, replacement_requested_at=NOW.timestamp() - 300)
    in_service = signal(
        SignalKind.REPLACEMENT_IN_SERVICE,
        source=SignalSource.WATCHDOG,
        event_id="w",
        attributes={"replacement": "i-0bbbbbbbbbbbbbbbb"},
    )
    actions = decide(in_service, detached, SETTINGS)
    assert names(actions) == ["RecordReplacement", "Notify", "RecordDraining"]
    assert isinstance(actions[1], Notify) and actions[1].notification is NotificationType.INSTANCE_REPLACED
    assert actions[1].detail["replacementInstanceId"] == "i-0bbbbbbbbbbbbbbbb"
    assert isinstance(actions[2], RecordDraining)
    assert actions[2].drain_deadline_at == NOW.timestamp() + SETTINGS.retire_drain_seconds
    # Spot-warned: announced, but AWS ends it at its own deadline (no new drain order).
    warned = record(InstanceState.DRAINING, interrupted_at=1.0, replacement_requested_at=1.0)
    assert names(decide(in_service, warned, SETTINGS)) == ["RecordReplacement", "Notify"]


def test_drained_or_late_drain_orders_end_the_instance_but_aws_and_the_asg_end_their_own():
    ordered = record(InstanceState.DRAINING, replacement_requested_at=1.0, drained_at=2.0)
    for kind in (SignalKind.DRAINED, SignalKind.DRAIN_DEADLINE):
        actions = decide(signal(kind), ordered, SETTINGS)
        assert names(actions) == ["TerminateInstance", "RecordEnded"]
        assert isinstance(actions[1], RecordEnded) and actions[1].end_reason is EndReason.RETIRED
        assert not any(isinstance(a, RequeueLeases) for a in actions)  # the agent is alive
    spot = record(InstanceState.DRAINING, interrupted_at=1.0, drained_at=2.0)
    scale_in = record(InstanceState.DRAINING, last_signal={"kind": "lifecycle_terminate"}, drained_at=2.0)
    assert decide(signal(SignalKind.DRAINED), spot, SETTINGS) == []
    assert decide(signal(SignalKind.DRAIN_DEADLINE), scale_in, SETTINGS) == []


def test_lifecycle_launch_sets_deadline_and_late_launch_changes_nothing():
    [action] = decide(signal(SignalKind.LIFECYCLE_LAUNCH), None, SETTINGS)
    assert isinstance(action, RecordLaunching)
    assert action.bootstrap_deadline_at - action.launched_at == SETTINGS.bootstrap_deadline_seconds
    assert decide(signal(SignalKind.LIFECYCLE_LAUNCH), record(InstanceState.READY), SETTINGS) == []


def test_lifecycle_terminate_is_bookkeeping():
    assert names(decide(signal(SignalKind.LIFECYCLE_TERMINATE), record(InstanceState.READY), SETTINGS)) == [
        "RecordDraining"
    ]


def test_watchdog_kinds():
    launching = record(InstanceState.LAUNCHING)
    actions = decide(signal(SignalKind.BOOTSTRAP_DEADLINE), launching, SETTINGS)
    assert isinstance(actions[0], TerminateInstance) and actions[0].reason is EndReason.BOOTSTRAP_DEADLINE
    assert "Notify" in names(actions)
    failed = record(InstanceState.LAUNCHING, bootstrap_status=BootstrapStatus.FAILED)
    [terminate, *_] = decide(signal(SignalKind.BOOTSTRAP_DEADLINE), failed, SETTINGS)
    assert isinstance(terminate, TerminateInstance) and terminate.reason is EndReason.BOOTSTRAP_FAILED
    ready = record(InstanceState.LAUNCHING, bootstrap_status=BootstrapStatus.READY)
    assert decide(signal(SignalKind.BOOTSTRAP_DEADLINE), ready, SETTINGS) == []
    stale = decide(signal(SignalKind.HEARTBEAT_STALE), record(InstanceState.READY), SETTINGS)
    assert names(stale) == ["RequeueLeases", "TerminateInstance", "RecordEnded"]
    # The drain deadline never takes a live agent's tasks (issue 12): it ends the instance.
    assert names(decide(signal(SignalKind.DRAIN_DEADLINE), record(InstanceState.DRAINING), SETTINGS)) == [
        "TerminateInstance",
        "RecordEnded",
    ]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(SignalKind)),
    state=st.sampled_from(["pending", "running", "stopping", "stopped", "shutting-down", "terminated", None]),
    end_reason=st.sampled_from(list(EndReason)),
)
def test_an_ended_record_is_never_moved_back(kind, state, end_reason):
    ended = record(InstanceState.ENDED, end_reason=end_reason)
    for action in decide(signal(kind, state=state), ended, SETTINGS):
        assert not isinstance(action, RecordDraining | RecordLaunching | RecordEnded | RequestReplacement)
        assert not isinstance(action, TerminateInstance)


def test_settings_from_env_validate_with_a_message():
    with pytest.raises(SettingsError, match="SPOTGUARD_FLEET_NAME"):
        ControlSettings.from_env({})
    with pytest.raises(SettingsError, match="ignore, replace, drain"):
        ControlSettings.from_env({"SPOTGUARD_FLEET_NAME": "f", "SPOTGUARD_REBALANCE_POLICY": "panic"})
    with pytest.raises(SettingsError, match="true or false"):
        ControlSettings.from_env({"SPOTGUARD_FLEET_NAME": "f", "SPOTGUARD_REQUEUE_ENABLED": "maybe"})
    parsed = ControlSettings.from_env({"SPOTGUARD_FLEET_NAME": "f", "SPOTGUARD_REQUEUE_ENABLED": "false"})
    assert parsed.asg_name == "spotguard-f" and parsed.requeue_enabled is False


def test_ttl_lru_expires_and_evicts():
    now = [0.0]
    cache = TtlLru(maxsize=2, ttl=10, clock=lambda: now[0])
    cache.put("a", True)
    cache.put("b", False)
    assert cache.get("a") is True
    cache.put("c", True)  # evicts b (least recently used)
    assert cache.get("b") is None and len(cache) == 2
    now[0] = 11
    assert cache.get("a") is None


EVENTS = Path(__file__).resolve().parents[1] / "events"


def test_explain_prints_signal_and_actions_without_aws(capsys, monkeypatch):
    monkeypatch.delenv("SPOTGUARD_FLEET_TABLE", raising=False)
    code = main(["explain", str(EVENTS / "state_change_terminated.json"), "--fleet", "render"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["signals"][0]["kind"] == "state_change" and out["signals"][0]["state"] == "terminated"
    assert [a["action"] for a in out["actions"]] == ["RequeueLeases", "RecordEnded"]
    assert out["notes"]


def test_explain_rejects_malformed_with_non_zero_exit(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"detail-type": "EC2 Spot Instance Interruption Warning"}')
    code = main(["explain", str(bad)])
    captured = capsys.readouterr()
    assert code != 0
    assert json.loads(captured.out)["rejected"] is True
    assert "rejected: malformed envelope" in captured.err
