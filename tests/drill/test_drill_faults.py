"""The short drill under injected AWS faults: 5 % of every process's AWS calls answered with
the service's throttling error or a 5xx, 20 ms added to each (issue 15).

Every retry path is exercised at once: the agents' receives, lease writes, counters,
deletes and visibility changes, the dispatcher's requeues, the watchdog's sweeps. Whatever
breaks under faults is a defect of spotguard: every task is still done, none is lost, none
ends in the DLQ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from spotguard_tools.drill import Drill

from tests.drill.configs import short_config

pytestmark = [pytest.mark.drill, pytest.mark.xdist_group("drill")]


def test_nothing_is_lost_under_aws_faults(tmp_path: Path) -> None:
    report = Drill(short_config(tmp_path, aws_faults=0.05, aws_latency_ms=20, timeout_seconds=150.0)).run()
    assert not report["timed_out"]
    assert report["aws_faults_injected"] > 0
    assert report["aws_calls_observed"] > report["aws_faults_injected"]
    assert report["tasks_lost"] == 0
    assert report["tasks_done"] == report["tasks_total"]
    assert report["tasks_in_dlq"] == 0
    assert report["requeue_latency_s"]["count"] >= 1  # interrupted work came back under faults
