"""Command mode and Python handler processes, run by the real worker against the moto server."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from spotguard_agent.checkpoint import CheckpointStore
from spotguard_agent.execution import WorkloadConfig, WorkloadError, build_execution
from spotguard_agent.worker import TaskContext, Worker
from spotguard_core.contracts import DEFAULT_HANDLER, Metric, TaskEnv, checkpoint_key

from tests.support.workload_env import (
    BUCKET,
    FLEET,
    Workers,
    World,
    agent_config,
    process_alive,
    spot_signal,
    wait_for,
    write_tree,
)

pytestmark = pytest.mark.integration
INSTANCE = "i-0workload00000001"


COMMAND_SCRIPT = """#!/bin/sh
# test workload: echo what the agent gave us, then act on the body
body=$(cat)
echo "body=$body"
echo "to stderr" >&2
printf '%s' "$body" > "$RESULTS/$SPOTGUARD_MESSAGE_ID.body"
env > "$RESULTS/$SPOTGUARD_MESSAGE_ID.env"
pwd > "$RESULTS/$SPOTGUARD_MESSAGE_ID.cwd"
case "$body" in
  fail) exit 3 ;;
  deadline)
    trap 'cat "$SPOTGUARD_DEADLINE_FILE" > "$RESULTS/deadline.seen"; exit 0' TERM
    echo $$ > "$RESULTS/deadline.pid"
    while true; do sleep 0.1; done ;;
  polite)
    sleep 300 & echo $! > "$RESULTS/polite.child"
    trap 'echo "got TERM"; exit 0' TERM
    echo $$ > "$RESULTS/polite.pid"
    while true; do sleep 0.1; done ;;
  stubborn)
    sleep 300 & echo $! > "$RESULTS/stubborn.child"
    trap '' TERM
    echo $$ > "$RESULTS/stubborn.pid"
    while true; do sleep 0.1; done ;;
esac
exit 0
"""


def command_workload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[WorkloadConfig, Path]:
    directory = write_tree(tmp_path / "workload", {"run.sh": COMMAND_SCRIPT})
    results = tmp_path / "results"
    results.mkdir()
    # The agent passes its own environment through (the drill relies on that).
    monkeypatch.setenv("RESULTS", str(results))
    monkeypatch.setenv("SPOTGUARD_TEST_PASSED_THROUGH", "yes")
    settings: dict[str, Any] = {"workload_dir": directory, "command": "./run.sh", "stop_grace_seconds": 1.5}
    settings.update(overrides)
    return WorkloadConfig(**settings), results


def environment_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_command_gets_the_body_on_stdin_its_environment_and_its_output_is_logged(
    world: World, workers: Workers, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    workload, results = command_workload(tmp_path, monkeypatch)
    message_id = world.send({"task_id": "t1", "seconds": 0})
    running = workers.start(agent_config(world), workload, INSTANCE)
    wait_for(lambda: running.worker.counters[Metric.TASKS_COMPLETED] == 1)
    assert (results / f"{message_id}.body").read_text() == json.dumps({"task_id": "t1", "seconds": 0})
    env = environment_of(results / f"{message_id}.env")
    assert env[TaskEnv.MESSAGE_ID.value] == message_id
    assert env[TaskEnv.RECEIVE_COUNT.value] == "1"
    assert Path(env[TaskEnv.CHECKPOINT_DIR.value]).name == "checkpoint"
    assert TaskEnv.DEADLINE.value not in env, "set only while the agent drains"
    assert env["SPOTGUARD_TEST_PASSED_THROUGH"] == "yes"
    assert (results / f"{message_id}.cwd").read_text().strip() == str(workload.workload_dir)
    assert not Path(env[TaskEnv.CHECKPOINT_DIR.value]).exists(), "the task's scratch space is removed"
    # stdout and stderr, line by line, with the message id.
    assert f'[{message_id}] body={{"task_id": "t1", "seconds": 0}}' in caplog.text
    assert f"[{message_id}] to stderr" in caplog.text
    assert "checkpoints disabled" in caplog.text, "no bucket: one clear line"
    wait_for(lambda: world.receive() == [] and world.leases(INSTANCE) == [])


def test_a_command_exiting_non_zero_is_a_genuine_failure_released_with_backoff(
    world: World, workers: Workers, tmp_path, monkeypatch, caplog
):
    workload, _ = command_workload(tmp_path, monkeypatch)
    message_id = world.send("fail")
    running = workers.start(agent_config(world, failure_backoff_seconds=3.0), workload, INSTANCE)
    wait_for(lambda: running.worker.counters[Metric.TASKS_FAILED] == 1)
    running.worker.request_stop()
    assert running.join() == 0
    assert "command exited with code 3" in caplog.text
    assert running.worker.counters[Metric.TASKS_COMPLETED] == 0
    assert world.receive() == [], "backoff: not visible at once"
    assert world.leases(INSTANCE) == []
    (again,) = wait_for(world.receive, timeout=10)
    assert again["MessageId"] == message_id
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"


def test_a_released_command_gets_sigterm_and_one_ignoring_it_is_killed_after_the_grace_time(
    world: World, workers: Workers, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    workload, results = command_workload(tmp_path, monkeypatch, stop_grace_seconds=2.0)
    polite_id = world.send("polite")
    stubborn_id = world.send("stubborn")
    running = workers.start(agent_config(world, concurrency=2), workload, INSTANCE)
    wait_for(lambda: (results / "polite.pid").exists() and (results / "stubborn.pid").exists())
    pids = {name: int((results / f"{name}.pid").read_text()) for name in ("polite", "stubborn")}
    children = {name: int((results / f"{name}.child").read_text()) for name in ("polite", "stubborn")}
    released_at = time.monotonic()
    running.worker.drain(spot_signal(INSTANCE, 60))  # no expected duration: neither fits
    # The messages go back at once; the processes are stopped after that.
    seen: set[str] = set()

    def both_back() -> bool:
        seen.update(message["MessageId"] for message in world.receive(visibility=60))
        return seen == {polite_id, stubborn_id}

    wait_for(both_back, timeout=5)
    assert time.monotonic() - released_at < 3
    wait_for(lambda: not process_alive(pids["polite"]), timeout=5)
    polite_stopped = time.monotonic() - released_at
    wait_for(lambda: not process_alive(pids["stubborn"]), timeout=10)
    stubborn_stopped = time.monotonic() - released_at
    assert polite_stopped < 1.9, "SIGTERM stops a command that handles it"
    assert 1.9 <= stubborn_stopped < 6, "SIGKILL after the 2 s grace time"
    # The whole process group goes, not only the shell.
    wait_for(
        lambda: not process_alive(children["polite"]) and not process_alive(children["stubborn"]), timeout=5
    )
    assert f"[{polite_id}] got TERM" in caplog.text
    assert running.join() == 0
    assert running.worker.counters[Metric.TASKS_KILLED] == 1
    assert running.worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 2
    assert running.worker.counters[Metric.TASKS_FAILED] == 0, "a released task is not a failure"


def test_a_running_command_reads_the_interruption_time_from_its_deadline_file(
    world: World, workers: Workers, tmp_path, monkeypatch
):
    """SPOTGUARD_DEADLINE cannot reach a process started before the drain; the file can."""
    workload, results = command_workload(tmp_path, monkeypatch, stop_grace_seconds=3.0)
    world.send("deadline")
    running = workers.start(agent_config(world), workload, INSTANCE)
    wait_for((results / "deadline.pid").exists)
    env = environment_of(next(results.glob("*.env")))
    assert Path(env[TaskEnv.DEADLINE_FILE.value]).name == "deadline"
    assert not Path(env[TaskEnv.DEADLINE_FILE.value]).exists(), "no drain yet: no deadline"
    notice = spot_signal(INSTANCE, 60)
    running.worker.drain(notice)  # no expected duration: released, SIGTERM
    seen = wait_for(
        lambda: (results / "deadline.seen").read_text() if (results / "deadline.seen").exists() else None
    )
    assert notice.deadline is not None
    assert seen.strip().endswith("Z"), "ISO 8601 UTC, like SPOTGUARD_DEADLINE"
    assert abs(datetime.fromisoformat(seen.strip()).timestamp() - notice.deadline.timestamp()) < 0.01
    assert running.join() == 0


STUBBORN_HANDLER = """
import json, os, time

def handle(body, context):
    task = json.loads(body)
    if task.get("crash"):
        os._exit(7)
    if task.get("quick"):
        with open(task["path"], "w") as f:
            f.write(str(os.getpid()))
        return
    with open(task["path"] + ".pid", "w") as f:
        f.write(str(os.getpid()))
    while True:  # ignores context.released
        with open(task["path"], "a") as f:
            f.write("x")
        time.sleep(0.05)
"""


def test_a_released_python_handler_that_ignores_the_release_is_stopped(
    world: World, workers: Workers, tmp_path
):
    directory = write_tree(tmp_path / "workload", {"stubborn.py": STUBBORN_HANDLER})
    progress = tmp_path / "progress"
    workload = WorkloadConfig(workload_dir=directory, stop_grace_seconds=1.0)
    world.send({"path": str(progress)})
    running = workers.start(agent_config(world, handler="stubborn:handle"), workload, INSTANCE)
    wait_for(lambda: progress.exists() and Path(f"{progress}.pid").exists())
    host_pid = int(Path(f"{progress}.pid").read_text())
    running.worker.drain(spot_signal(INSTANCE, 60))
    wait_for(lambda: not process_alive(host_pid), timeout=6)
    size = progress.stat().st_size
    time.sleep(0.5)
    assert progress.stat().st_size == size, "no side effects after the stop"
    assert running.join() == 0
    assert running.worker.counters[Metric.TASKS_KILLED] == 1
    assert running.worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 1
    assert len(world.receive()) == 1, "the message is back on the queue"


def test_a_handler_process_that_dies_fails_the_task_and_a_fresh_one_takes_the_next(
    world: World, workers: Workers, tmp_path, caplog
):
    directory = write_tree(tmp_path / "workload", {"stubborn.py": STUBBORN_HANDLER})
    done = tmp_path / "done"
    workload = WorkloadConfig(workload_dir=directory)
    world.send({"crash": True})
    running = workers.start(agent_config(world, handler="stubborn:handle"), workload, INSTANCE)
    wait_for(lambda: running.worker.counters[Metric.TASKS_FAILED] == 1)
    assert "handler process exited with code 7" in caplog.text
    world.send({"quick": True, "path": str(done)})
    wait_for(lambda: running.worker.counters[Metric.TASKS_COMPLETED] == 1)
    assert done.read_text().isdigit()


def test_a_handler_that_cannot_be_imported_stops_the_worker_with_a_clear_reason(world: World, tmp_path):
    directory = write_tree(tmp_path / "workload", {"tasks.py": "import not_installed_anywhere\n"})
    with pytest.raises(WorkloadError, match="cannot load handler tasks:handle: ModuleNotFoundError"):
        Worker(
            agent_config(world, handler="tasks:handle"),
            instance_id=INSTANCE,
            workload=WorkloadConfig(workload_dir=directory),
        )


DEADLINE_HANDLER = """
import json, os, time


def expected_seconds(body):
    return 3.0


def handle(body, context):
    task = json.loads(body)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        if context.deadline is not None:
            with open(task["path"], "w") as f:
                seen = {"deadline": context.deadline.isoformat(), "env": os.environ.get("SPOTGUARD_DEADLINE")}
                json.dump(seen, f)
            return
        time.sleep(0.05)
    raise RuntimeError("no deadline seen")
"""


def test_a_handler_that_fits_the_drain_deadline_goes_on_and_is_told_the_deadline(
    world: World, workers: Workers, tmp_path
):
    directory = write_tree(tmp_path / "workload", {"fits.py": DEADLINE_HANDLER})
    seen = tmp_path / "seen.json"
    world.send({"path": str(seen)})
    running = workers.start(
        agent_config(world, handler="fits:handle"), WorkloadConfig(workload_dir=directory), INSTANCE
    )
    wait_for(lambda: world.leases(INSTANCE))
    time.sleep(0.3)  # the handler process reported expected_seconds = 3
    notice = spot_signal(INSTANCE, 30)
    running.worker.drain(notice)
    assert running.join() == 0
    assert running.worker.counters[Metric.TASKS_COMPLETED] == 1, "it fits: not released"
    assert running.worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 0
    told = json.loads(seen.read_text())
    assert notice.deadline is not None
    assert abs(datetime.fromisoformat(told["deadline"]).timestamp() - notice.deadline.timestamp()) < 0.01
    assert told["env"].endswith("Z"), "SPOTGUARD_DEADLINE: ISO 8601 UTC"


# ---------------------------------------------------------------------- checkpoint requests
def counted_s3(world: World) -> tuple[Any, Counter[str]]:
    """An S3 client on the moto server and the operations it sent (one count per attempt)."""
    client = world.s3
    calls: Counter[str] = Counter()
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    return client, calls


def test_checkpoints_after_an_attempts_first_are_one_conditional_put_each(world: World):
    """A task that checkpoints every second must not pay a HeadObject per checkpoint."""
    s3, calls = counted_s3(world)
    store = CheckpointStore(s3, bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    assert store.save("m-1", b"1 s done", attempt=1)
    assert calls == {"HeadObject": 1, "PutObject": 1}, "the first save looks before it writes"
    for second in range(2, 6):
        assert store.save("m-1", f"{second} s done".encode(), attempt=1)
    assert calls == {"HeadObject": 1, "PutObject": 5}
    assert store.load("m-1") == b"5 s done"


def test_a_later_attempts_checkpoint_written_between_two_saves_is_kept(world: World):
    """The released attempt's next save finds someone else's object (412): it looks again,
    sees the later attempt and stores nothing; the later attempt's own saves go on."""
    earlier = CheckpointStore(world.s3, bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    later = CheckpointStore(world.s3, bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    assert earlier.save("m-1", b"attempt 1: 3 s", attempt=1)
    assert later.save("m-1", b"attempt 2: 4 s", attempt=2)
    assert not earlier.save("m-1", b"attempt 1: 5 s, released, late", attempt=1)
    assert later.save("m-1", b"attempt 2: 5 s", attempt=2)
    assert world.s3.get_object(Bucket=BUCKET, Key=checkpoint_key(FLEET, "m-1"))["Metadata"] == {
        "attempt": "2"
    }
    assert earlier.load("m-1") == b"attempt 2: 5 s"


def test_a_checkpoint_deleted_under_a_running_attempt_is_written_again(world: World):
    store = CheckpointStore(world.s3, bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    assert store.save("m-1", b"1 s", attempt=1)
    world.s3.delete_object(Bucket=BUCKET, Key=checkpoint_key(FLEET, "m-1"))
    assert store.save("m-1", b"2 s", attempt=1)
    assert store.load("m-1") == b"2 s"


def test_finished_messages_checkpoints_are_deleted_in_one_request(world: World):
    s3, calls = counted_s3(world)
    store = CheckpointStore(s3, bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    for index in range(10):
        assert store.save(f"m-{index}", b"progress", attempt=1)
    calls.clear()
    store.delete_many([f"m-{index}" for index in range(10)] + ["m-never-saved"])
    assert calls == {"DeleteObjects": 1}
    assert world.object_keys() == []


def handler_host_children() -> list[int]:
    """Handler host processes this test process started (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X") and b"handler_host" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_every_slot_has_its_handler_process_before_its_first_task(world: World):
    """A requeued task landing on a fresh instance must not wait for a process start: the
    hosts of all slots start with the agent, and tasks take them instead of starting more."""
    execution = build_execution(
        handler=DEFAULT_HANDLER,
        workload=WorkloadConfig(),
        s3=None,
        fleet=FLEET,
        deadline=lambda: None,
        count=lambda _metric: None,
        slots=3,
    )
    try:
        wait_for(lambda: len(handler_host_children()) == 3)
        started = set(handler_host_children())
        message = {"MessageId": "m-1", "ReceiptHandle": "r-1", "Body": json.dumps({"seconds": 0})}
        for _ in range(3):
            execution.run(
                SimpleNamespace(
                    message=message, message_id="m-1", receive_count=1, context=TaskContext("m-1", 1, {})
                )
            )
        assert set(handler_host_children()) == started, "the tasks ran on the hosts started with the agent"
    finally:
        execution.close()
    wait_for(lambda: not handler_host_children())
