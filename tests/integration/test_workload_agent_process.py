"""The real agent process (``spotguard-agent run``) and the user's work: when the agent is
killed without a chance to stop its tasks (a crash, SIGKILL, the drill's hard kill), no task
keeps running — its message is requeued elsewhere, a copy running on would duplicate work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from spotguard_core.contracts import Env
from spotguard_tools.imds_emulator import running_imds

from tests.support.workload_env import World, process_alive, wait_for, write_tree

pytestmark = pytest.mark.integration

STUBBORN_COMMAND = """#!/bin/sh
sleep 300 & echo $! > "$RESULTS/child.pid"
echo $$ > "$RESULTS/task.pid"
trap '' TERM
while true; do sleep 0.1; done
"""
STUBBORN_HANDLER = """
import os, time


def handle(body, context):
    with open(os.path.join(os.environ["RESULTS"], "task.pid"), "w") as f:
        f.write(str(os.getpid()))
    while True:  # ignores context.released
        time.sleep(0.05)
"""


@pytest.mark.parametrize("mode", ["command", "handler"])
def test_a_hard_killed_agent_leaves_no_task_running(
    world: World, moto_server: Any, tmp_path: Path, mode: str
):
    directory = write_tree(
        tmp_path / "workload", {"stubborn.sh": STUBBORN_COMMAND, "stubborn.py": STUBBORN_HANDLER}
    )
    results = tmp_path / "results"
    results.mkdir()
    workload = (
        {Env.COMMAND.value: "./stubborn.sh"} if mode == "command" else {Env.HANDLER.value: "stubborn:handle"}
    )
    world.send("work")
    with running_imds("i-0hardkill0000001") as imds:
        env = {
            **os.environ,
            **moto_server.environment(),
            Env.FLEET_NAME.value: "test",
            Env.WORK_QUEUE_URL.value: world.queue_url,
            Env.LEASE_TABLE.value: world.lease_table,
            Env.FLEET_TABLE.value: world.fleet_table,
            Env.IMDS_URL.value: imds.url,
            Env.HEALTH_PORT.value: "0",
            Env.WORKLOAD_DIR.value: str(directory),
            Env.STOP_GRACE_SECONDS.value: "1",
            "RESULTS": str(results),
            **workload,
        }
        env.pop(Env.HANDLER.value if mode == "command" else Env.COMMAND.value, None)
        agent = subprocess.Popen(
            [sys.executable, "-m", "spotguard_agent.cli", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            task_pid = int(
                wait_for(lambda: (results / "task.pid").exists() and (results / "task.pid").read_text(), 40)
            )
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(timeout=5)
            killed_at = time.monotonic()
            wait_for(lambda: not process_alive(task_pid), timeout=5)
            assert time.monotonic() - killed_at < 4
            if mode == "command":
                child = int((results / "child.pid").read_text())
                wait_for(lambda: not process_alive(child), timeout=5)
        finally:
            agent.kill()
    assert len(world.leases("i-0hardkill0000001")) == 1, "the lease stays for the control plane's requeue"
