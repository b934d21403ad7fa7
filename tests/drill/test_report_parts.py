"""The drill's bookkeeping: seeded plans, the ledger, latencies and the report table."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spotguard_tools.drill import task
from spotguard_tools.drill.config import DrillConfig, add_arguments, cli_fields, config_from_arguments
from spotguard_tools.drill.drill_report import (
    Interruption,
    build_report,
    format_table,
    percentile,
    requeue_latencies,
    tasks_resumed_from_checkpoint,
    work_redone_seconds,
)
from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.ledger import (
    CHECKPOINT,
    CHECKPOINT_EVERY_ENV,
    DONE,
    LEDGER_ENV,
    RELEASED,
    START,
    Ledger,
    append,
)
from spotguard_tools.drill.plan import ChaosKind, build_plan, choose, task_durations


def test_plan_is_reproducible_from_its_seed() -> None:
    config = DrillConfig(seed=11, spot_warnings=3, hard_kills=2, rebalances=2, bootstrap_failures=1)
    assert build_plan(config) == build_plan(DrillConfig(seed=11, spot_warnings=3, hard_kills=2, rebalances=2))
    assert build_plan(config) != build_plan(DrillConfig(seed=12, spot_warnings=3, hard_kills=2, rebalances=2))
    kinds = [action.kind for action in build_plan(config)]
    assert kinds.count(ChaosKind.SPOT_WARNING) == 3
    assert kinds.count(ChaosKind.HARD_KILL) == 2
    assert kinds.count(ChaosKind.REBALANCE) == 2
    assert kinds.count(ChaosKind.BOOTSTRAP_FAILURE) == 1
    timed = [a for a in build_plan(config) if a.kind != ChaosKind.BOOTSTRAP_FAILURE]
    assert all(config.chaos_start_seconds <= a.at <= config.chaos_end_seconds for a in timed)
    assert task_durations(config) == task_durations(DrillConfig(seed=11))


@given(st.lists(st.integers(), min_size=1, max_size=50), st.floats(min_value=0, max_value=0.999999))
def test_choose_always_picks_a_candidate(candidates: list[int], pick: float) -> None:
    assert choose(candidates, pick) in candidates


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200))
def test_percentiles_are_ordered_and_bounded(values: list[float]) -> None:
    p50, p95, p99 = (percentile(values, q) for q in (50, 95, 99))
    assert min(values) <= p50 <= p95 <= p99 <= max(values)
    assert percentile(values, 100) == max(values)


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([], 95) == 0.0


def write_ledger(path: Path, table: str) -> None:
    """Append the records of ``table`` with the drill's own ``append``, one a line:
    ``EVENT TASK INSTANCE T`` and any ``KEY=SECONDS`` fields; ``#`` starts a comment line."""
    for line in table.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        event, task, instance, at, *fields = line.split()
        assert event in (START, DONE, RELEASED, CHECKPOINT), event
        record: dict[str, object] = {"ev": event, "task": task, "instance": instance, "t": float(at)}
        record.update((key, float(value)) for key, value in (field.split("=") for field in fields))
        append(path, record, durable=False)


def test_ledger_counts_done_duplicated_and_survives_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_ledger(
        path,
        """
        start      a                i-1   1.0
        done       a                i-1   2.0
        start      b                i-1   1.0
        start      b                i-2   5.0
        done       b                i-2   6.0
        start      a                i-2   7.0
        done       a                i-2   8.0
        start      c                i-3   1.0
        released   c                i-3   3.0
        """,
    )
    with path.open("a") as out:
        out.write('{"ev": "done", "task": "c", "ins')  # a SIGKILL mid-write
    ledger = Ledger.read(path)
    assert ledger.done == {"a", "b"}
    assert ledger.duplicated == 1
    [released] = [a for a in ledger.attempts if a.task_id == "c"]
    assert released.released_at == 3.0
    assert released.finished_at is None


def test_requeue_latency_runs_from_interruption_to_next_pick_up(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_ledger(
        path,
        """
        start      killed           i-1  10.0
        start      finished-in-time i-1  11.0
        done       finished-in-time i-1  12.0
        start      killed           i-2  21.5
        done       killed           i-2  23.0
        start      never-again      i-1  19.0
        """,
    )
    ledger = Ledger.read(path)
    kill = Interruption("i-1", ChaosKind.HARD_KILL.value, 20.0)
    assert requeue_latencies(ledger, [kill]) == [(ChaosKind.HARD_KILL.value, 1.5)]
    # a rebalance keeps the instance: its tasks are not interrupted
    assert requeue_latencies(ledger, [Interruption("i-1", ChaosKind.REBALANCE.value, 20.0)]) == []

    report = build_report(
        mode="spotguard",
        config={},
        task_ids=["killed", "finished-in-time", "never-again"],
        ledger=ledger,
        journal=Journal(),
        interruptions=[kill],
        control_plane_log=[{"fn": "dispatcher", "records": 2, "failed": ["x"]}, {"fn": "watchdog"}],
        initial_instances=1,
        launched_instances=2,
        bootstrap_failure_ids=[],
        tasks_in_dlq=0,
        wall_s=30.0,
        drill_s=25.0,
    )
    assert report["tasks_done"] == 2
    assert report["tasks_lost"] == 1
    assert report["hard_killed_in_flight"] == 2
    assert report["replacements"] == 1
    assert report["requeue_latency_s"]["max"] == 1.5
    assert report["control_plane"] == {
        "dispatcher_invocations": 1,
        "signals_handled": 2,
        "signals_failed": 1,
        "dispatcher_errors": 0,
        "watchdog_runs": 1,
        "watchdog_errors": 0,
    }
    json.dumps(report)  # serialisable as is
    table = format_table([report, {**report, "mode": "baseline"}])
    assert table.splitlines()[0].split() == ["spotguard", "baseline"]
    assert "tasks lost" in table


def test_redone_work_counts_only_what_no_checkpoint_saved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_ledger(
        path,
        """
        # long-1: 4 s on i-1, checkpointed at 3 s of work, instance killed at t=14
        start      long-1           i-1  10.0
        checkpoint long-1           i-1  13.0  done=3.0
        start      long-1           i-2  15.0  from=3.0
        done       long-1           i-2  20.0
        # long-2: released after 2 s without a checkpoint: all of it is done again
        start      long-2           i-3  10.0
        released   long-2           i-3  12.0
        start      long-2           i-2  12.5
        done       long-2           i-2  30.0
        # never picked up again: lost, not redone
        start      lost             i-1  11.0
        """,
    )
    journal = Journal()
    journal.record(Mark.HARD_KILL, "i-1", at=14.0)
    ledger = Ledger.read(path)
    [resumed] = [a for a in ledger.attempts if a.resumed_from is not None]
    assert resumed.resumed_from == 3.0
    assert tasks_resumed_from_checkpoint(ledger) == 1
    # long-1: 4 s run, 3 s saved -> 1 s; long-2: 2 s, nothing saved -> 2 s
    assert work_redone_seconds(ledger, journal) == 3.0


def test_every_documented_config_field_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = config_from_arguments(parser.parse_args([]))
    assert defaults == DrillConfig()
    args = parser.parse_args(
        ["--instances", "3", "--visibility-timeout", "12", "--no-checkpoints", "--aws-faults", "0.05",
         "--rebalance-policy", "drain", "--out-dir", "elsewhere", "--health-events", "2"]
    )  # fmt: skip
    config = config_from_arguments(args)
    assert (config.instances, config.visibility_timeout_seconds, config.checkpoints) == (3, 12, False)
    assert (config.aws_faults, config.rebalance_policy, config.health_events) == (0.05, "drain", 2)
    assert config.out_dir == Path("elsewhere")
    flags = {action.dest for action in parser._actions}
    assert {f"drill_{spec.name}" for spec in cli_fields()} <= flags
    assert "drill_requeue_enabled" not in flags  # --baseline / --compare


def test_workload_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DrillConfig(workload=Path(), handler="tasks:handle", command="true")
    with pytest.raises(ValueError, match="name the directory"):
        DrillConfig(command="true")
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        DrillConfig(workload=Path(), handler="tasks")


def test_the_task_handler_checkpoints_at_the_configured_interval(tmp_path: Path, monkeypatch) -> None:
    """The benchmark's fleet checkpoints less often than the drill's default (the emulator's
    capacity): the task handler takes the interval from the drill's environment."""
    ledger_path = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger_path))
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "0.2")
    saved: list[bytes] = []

    class Context:
        receive_count = 1
        resumed = None
        released = threading.Event()

        def checkpoint(self, data: bytes) -> bool:
            saved.append(data)
            return True

    task.handle(json.dumps({"task_id": "t-1", "seconds": 0.9}), Context())
    assert len(saved) == 4, saved  # at 0.2, 0.4, 0.6 and 0.8 s of work
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "2")
    saved.clear()
    task.handle(json.dumps({"task_id": "t-2", "seconds": 0.9}), Context())
    assert saved == []
