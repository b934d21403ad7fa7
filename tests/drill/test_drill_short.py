"""A short drill end to end: real moto server, real agents, real dispatcher and watchdog.

Tens of tasks, each kind of interruption, a bootstrap that never finishes. Every
completion is counted from the drill's ledger, so "no task lost" is a fact, not a hope.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spotguard_tools.cli import main as spotguard
from spotguard_tools.drill import Drill

from tests.drill.configs import short_config

pytestmark = [pytest.mark.drill, pytest.mark.xdist_group("drill")]

REPORT_FIELDS = {
    "tasks_total",
    "tasks_done",
    "tasks_lost",
    "tasks_duplicated",
    "requeue_latency_s",
    "interruptions",
    "replacements",
    "terminated_by_watchdog",
    "wall_s",
}


@pytest.fixture(scope="module")
def short_drill(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("drill")
    json_path = out / "report.json"
    timeline = out / "timeline.png"
    config = short_config(out)
    drill = Drill(config)
    report = drill.run()
    drill.draw_timeline(timeline)
    json_path.write_text(json.dumps(report))
    return {"report": report, "json": json_path, "timeline": timeline, "drill": drill}


def test_no_task_is_lost(short_drill: dict[str, object]) -> None:
    report = short_drill["report"]
    assert isinstance(report, dict)
    assert not report["timed_out"]
    assert report["tasks_total"] == 48
    assert report["tasks_lost"] == 0
    assert report["tasks_done"] == 48
    assert report["tasks_in_dlq"] == 0


def test_every_kind_of_interruption_happened(short_drill: dict[str, object]) -> None:
    report = short_drill["report"]
    assert isinstance(report, dict)
    assert report["interruptions"] == {
        "bootstrap_failure": 1,
        "hard_kill": 2,
        "rebalance": 1,
        "spot_warning": 1,
    }
    # replacements join: the ASG replaces reclaimed, killed and detached instances
    assert report["replacements"] >= 3
    assert report["control_plane"]["dispatcher_errors"] == 0
    assert report["control_plane"]["watchdog_runs"] > 0


def test_duplicates_only_from_hard_killed_in_flight_tasks(short_drill: dict[str, object]) -> None:
    report = short_drill["report"]
    assert isinstance(report, dict)
    assert report["tasks_duplicated"] <= report["hard_killed_in_flight"] + report["reclaimed_in_flight"]


def test_interrupted_tasks_come_back_fast(short_drill: dict[str, object]) -> None:
    report = short_drill["report"]
    assert isinstance(report, dict)
    latency = report["requeue_latency_s"]
    assert latency["count"] >= 1  # the hard kills had tasks in flight
    # spotguard requeues on the interruption; the visibility timeout (20 s) never has to expire
    assert latency["max"] < 15


def test_bootstrap_failure_terminated_by_watchdog(short_drill: dict[str, object]) -> None:
    report = short_drill["report"]
    assert isinstance(report, dict)
    [hung] = report["bootstrap_failure_ids"]
    assert hung in report["terminated_by_watchdog_ids"]
    assert report["bootstrap_failures_terminated"] == 1
    record = report["fleet_records"][hung]
    assert record["state"] == "ended"
    assert record["end_reason"] == "bootstrap_deadline"


def test_json_report_and_timeline(short_drill: dict[str, object]) -> None:
    path = short_drill["json"]
    assert isinstance(path, Path)
    document = json.loads(path.read_text())
    assert set(document) >= REPORT_FIELDS
    assert set(document["requeue_latency_s"]) >= {"p50", "p95", "p99", "max"}
    timeline = short_drill["timeline"]
    assert isinstance(timeline, Path)
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_non_zero_when_tasks_are_lost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped long before its tasks can finish, the drill reports them lost and fails."""
    json_path = tmp_path / "cli.json"
    code = spotguard(
        [
            "drill",
            "--instances", "1",
            "--tasks", "30",
            "--spot-warnings", "0",
            "--hard-kills", "0",
            "--rebalances", "0",
            "--bootstrap-failures", "0",
            "--timeout", "1",
            "--no-timeline",
            "--quiet",
            "--out-dir", str(tmp_path),
            "--json", str(json_path),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "tasks lost" in captured.out
    assert "lost" in captured.err
    report = json.loads(json_path.read_text())
    assert report["timed_out"] is True
    assert report["tasks_lost"] == report["tasks_total"] - report["tasks_done"] > 0
