"""The IMDS watcher against the emulator over HTTP: notices become signals within a poll."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from spotguard_agent.imds import ImdsClient
from spotguard_agent.watcher import Watcher
from spotguard_core.contracts import RebalancePolicy, Signal, SignalKind, SignalSource
from spotguard_tools.imds_emulator import ImdsEmulator, running_imds

POLL = 0.2


@pytest.fixture
def imds():
    with running_imds("i-0aaaabbbbccccdddd") as emulator:
        yield emulator


def start_watcher(imds: ImdsEmulator, policy: RebalancePolicy = RebalancePolicy.REPLACE):
    signals: queue.Queue[tuple[float, Signal]] = queue.Queue()
    client = ImdsClient(imds.url, timeout_seconds=0.2, attempts=2, retry_delay_seconds=0.01)
    watcher = Watcher(
        client, lambda s: signals.put((time.monotonic(), s)), poll_seconds=POLL, rebalance_policy=policy
    )
    return watcher.start(), signals


def test_spot_notice_reaches_the_drain_path_within_one_poll(imds: ImdsEmulator):
    watcher, signals = start_watcher(imds)
    try:
        time.sleep(3 * POLL)
        assert signals.empty()
        deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
        published_at = time.monotonic()
        imds.set_spot_action("terminate", deadline)
        seen_at, signal = signals.get(timeout=5)
        # One poll interval plus the requests themselves (slack for busy CI machines).
        assert seen_at - published_at <= POLL + 0.5
        assert signal.kind is SignalKind.SPOT_INTERRUPTION
        assert signal.source is SignalSource.IMDS
        assert signal.instance_id == "i-0aaaabbbbccccdddd"
        assert signal.deadline == deadline
        assert signal.state == "terminate"
        time.sleep(3 * POLL)
        assert signals.empty(), "a notice is handed over once"
    finally:
        watcher.stop()


def test_watcher_survives_errors_timeouts_and_token_expiry(imds: ImdsEmulator):
    watcher, signals = start_watcher(imds)
    try:
        time.sleep(2 * POLL)
        imds.fail_next(8, status=500)
        time.sleep(3 * POLL)
        imds.set_delay(0.5)  # every request times out
        time.sleep(4 * POLL)
        imds.set_delay(0)
        imds.expire_tokens()
        time.sleep(2 * POLL)
        assert watcher.errors >= 2
        assert watcher._thread is not None and watcher._thread.is_alive()
        published_at = time.monotonic()
        imds.set_target_lifecycle_state("Terminated")
        seen_at, signal = signals.get(timeout=5)
        assert seen_at - published_at <= POLL + 0.6
        assert signal.kind is SignalKind.LIFECYCLE_TERMINATE
        assert signal.deadline is None
        assert watcher.imds.tokens_fetched >= 2
    finally:
        watcher.stop()


def test_rebalance_drains_only_under_the_drain_policy(imds: ImdsEmulator):
    imds.set_rebalance()
    replace, replace_signals = start_watcher(imds, RebalancePolicy.REPLACE)
    drain, drain_signals = start_watcher(imds, RebalancePolicy.DRAIN)
    try:
        _, signal = drain_signals.get(timeout=5)
        assert signal.kind is SignalKind.REBALANCE
        assert signal.deadline is not None and signal.deadline > datetime.now(UTC)
        time.sleep(3 * POLL)
        assert replace_signals.empty()
    finally:
        replace.stop()
        drain.stop()


def test_watch_command_prints_one_json_line_per_notice(imds: ImdsEmulator):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spotguard_agent.cli",
            "watch",
            "--imds-url",
            imds.url,
            "--poll-seconds",
            "0.2",
            "--count",
            "2",
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        imds.set_spot_action("stop")
        imds.set_target_lifecycle_state("Terminated")
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert process.returncode == 0, err
    assert {line["kind"] for line in lines} == {"spot_interruption", "lifecycle_terminate"}
    assert all(line["instance_id"] == "i-0aaaabbbbccccdddd" for line in lines)
    spot = next(line for line in lines if line["kind"] == "spot_interruption")
    assert spot["deadline"] is not None and spot["state"] == "stop"


def start_watcher_with_notices(imds: ImdsEmulator):
    drains: queue.Queue[Signal] = queue.Queue()
    notices: queue.Queue[Signal] = queue.Queue()
    client = ImdsClient(imds.url, timeout_seconds=0.2, attempts=2, retry_delay_seconds=0.01)
    watcher = Watcher(client, drains.put, poll_seconds=POLL, on_notice=notices.put)
    return watcher.start(), drains, notices


def test_scheduled_stop_and_retirement_drain_by_not_before(imds: ImdsEmulator):
    watcher, drains, notices = start_watcher_with_notices(imds)
    try:
        not_before = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
        imds.schedule_maintenance("instance-stop", not_before)
        signal = drains.get(timeout=5)
        assert signal.kind is SignalKind.MAINTENANCE_SCHEDULED
        assert signal.source is SignalSource.IMDS
        assert signal.deadline == not_before
        assert signal.state == "instance-stop"
        assert signal.attributes["maintenance_event_id"].startswith("instance-event-")
        imds.schedule_maintenance("instance-retirement", not_before + timedelta(hours=1))
        retirement = drains.get(timeout=5)
        assert retirement.state == "instance-retirement"
        assert retirement.deadline == not_before + timedelta(hours=1)
        time.sleep(3 * POLL)
        assert drains.empty() and notices.empty(), "each event is handed over once"
    finally:
        watcher.stop()


@pytest.mark.parametrize("code", ["system-reboot", "instance-reboot", "system-maintenance"])
def test_scheduled_reboots_and_maintenance_are_recorded_not_drained(imds: ImdsEmulator, code: str):
    watcher, drains, notices = start_watcher_with_notices(imds)
    try:
        imds.schedule_maintenance(code)
        notice = notices.get(timeout=5)
        assert notice.kind is SignalKind.MAINTENANCE_SCHEDULED and notice.state == code
        time.sleep(3 * POLL)
        assert drains.empty(), "a reboot is not a termination"
        assert notices.empty()
    finally:
        watcher.stop()


def test_completed_and_canceled_events_are_history(imds: ImdsEmulator):
    imds.schedule_maintenance("instance-stop", state="completed")
    imds.schedule_maintenance("instance-retirement", state="canceled")
    watcher, drains, notices = start_watcher_with_notices(imds)
    try:
        time.sleep(4 * POLL)
        assert drains.empty() and notices.empty()
        assert watcher.polls >= 2 and watcher.errors == 0
    finally:
        watcher.stop()


def test_a_hibernate_warning_has_no_two_minute_lead(imds: ImdsEmulator):
    watcher, signals = start_watcher(imds)
    try:
        # Even when the notice's time lies ahead, hibernation starts when the notice is given.
        imds.set_spot_action("hibernate", datetime.now(UTC) + timedelta(minutes=2))
        seen_at = datetime.now(UTC)
        _, signal = signals.get(timeout=5)
        assert signal.state == "hibernate"
        assert signal.deadline is not None
        assert signal.deadline <= signal.received_at
        assert signal.deadline - seen_at < timedelta(seconds=2)
    finally:
        watcher.stop()
