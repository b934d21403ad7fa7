"""The drill runs the user's own workload directory on the simulated instances, in both
modes (python handler, command), and counts completions from what the agents did (a task
is done when its agent deleted the message after success), not from the user's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from spotguard_tools.drill import Drill

from tests.drill.configs import short_config

pytestmark = [pytest.mark.drill, pytest.mark.xdist_group("drill")]

HANDLER_MODULE = """
import json, os, pathlib, time

def handle(body, context):
    task = json.loads(body)
    end = time.monotonic() + float(task["seconds"])
    while time.monotonic() < end:
        if context.released.wait(0.05):
            return
    # proof that the user's code ran with the drill's environment
    pathlib.Path(os.environ["WORKLOAD_PROOF_DIR"], task["task_id"]).touch()
"""

COMMAND_SCRIPT = """
import json, os, pathlib, sys, time
task = json.load(sys.stdin)
time.sleep(float(task["seconds"]))
pathlib.Path(os.environ["WORKLOAD_PROOF_DIR"], task["task_id"]).touch()
"""


def _workload(tmp_path: Path) -> Path:
    directory = tmp_path / "my-worker"
    directory.mkdir()
    (directory / "tasks.py").write_text(HANDLER_MODULE)
    (directory / "work.py").write_text(COMMAND_SCRIPT)
    return directory


@pytest.mark.parametrize("mode", ["handler", "command"])
def test_the_users_workload_runs_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    proof = tmp_path / "proof"
    proof.mkdir()
    monkeypatch.setenv("WORKLOAD_PROOF_DIR", str(proof))
    run = {"handler": "tasks:handle"} if mode == "handler" else {"command": f"{sys.executable} work.py"}
    config = short_config(
        tmp_path / "out",
        instances=2,
        tasks=16,
        long_task_fraction=0.0,
        spot_warnings=1,
        hard_kills=1,
        rebalances=0,
        bootstrap_failures=0,
        chaos_start_seconds=2.0,
        chaos_end_seconds=5.0,
        workload=_workload(tmp_path),
        **run,
    )
    report = Drill(config).run()
    assert not report["timed_out"]
    assert report["tasks_lost"] == 0
    assert report["tasks_done"] == report["tasks_total"] == 16
    assert report["tasks_in_dlq"] == 0
    # the user's code ran (and saw the drill's environment) for every task the agents completed
    assert {p.name for p in proof.iterdir()} >= {f"task-{i:05d}" for i in range(16)}
