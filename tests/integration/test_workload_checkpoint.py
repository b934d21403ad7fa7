"""Checkpoint and resume through S3 on the moto server: an interrupted task continues on a
second worker from its last checkpoint; the checkpoint is deleted on success; over the limit
is an error, never a truncation."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from typing import Any

import boto3
import pytest
from spotguard_agent.checkpoint import CheckpointStore
from spotguard_agent.execution import WorkloadConfig
from spotguard_core.contracts import Metric, checkpoint_key

from tests.support.workload_env import (
    BUCKET,
    FLEET,
    Workers,
    World,
    agent_config,
    spot_signal,
    wait_for,
    write_tree,
)

pytestmark = pytest.mark.integration
FIRST = "i-0checkpoint00001"
SECOND = "i-0checkpoint00002"


def interrupt(
    world: World, workers: Workers, workload: WorkloadConfig, *, after: float, **config: Any
) -> None:
    """Run the queue's task on FIRST for ``after`` seconds, then a spot warning it cannot fit."""
    first = workers.start(agent_config(world, **config), workload, FIRST)
    wait_for(lambda: world.leases(FIRST))
    time.sleep(after)
    # 1.5 s leaves 0.5 s after the drain margin (1 s): the task cannot fit even if it began
    # well before its lease was seen (with 3 s, a task that began 0.5 s earlier on a loaded
    # machine fitted, ran to the end, and nothing was released).
    first.worker.drain(spot_signal(FIRST, 1.5))
    assert first.join() == 0
    assert first.worker.counters[Metric.TASKS_RELEASED_ON_DRAIN] == 1


def test_a_python_task_resumes_on_a_second_worker_and_its_checkpoint_is_deleted_on_success(
    world: World, workers: Workers, caplog
):
    caplog.set_level(logging.INFO)
    workload = WorkloadConfig(checkpoint_bucket=BUCKET, stop_grace_seconds=3)
    message_id = world.send({"task_id": "long", "seconds": 4})
    # The sample handler saves its progress when it is released.
    interrupt(world, workers, workload, after=1.5)
    key = checkpoint_key(FLEET, message_id)
    stored = world.s3.get_object(Bucket=BUCKET, Key=key)
    progress = json.loads(stored["Body"].read())["done_seconds"]
    assert 1.0 <= progress < 4
    assert stored["Metadata"]["attempt"] == "1"

    second = workers.start(agent_config(world), workload, SECOND)
    wait_for(lambda: second.worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=20)
    assert second.worker.counters[Metric.TASKS_RESUMED] == 1
    assert f"[{message_id}] task long resumed at {progress:.1f} s of 4.0 s" in caplog.text
    assert world.object_keys() == [], "deleted once the task succeeded"
    assert world.receive() == []


RESUMABLE_COMMAND = """#!/bin/sh
# counts to 40 in 0.1 s steps; the count is its progress, kept in the checkpoint directory
n=0
state="$SPOTGUARD_CHECKPOINT_DIR/progress"
if [ -f "$state" ]; then n=$(cat "$state"); echo "resumed from $n"; fi
trap 'echo "stopping at $n"; exit 143' TERM
while [ "$n" -lt 40 ]; do
  n=$((n + 1)); echo "$n" > "$state"; sleep 0.1
done
echo "finished at $n"
"""


def test_command_checkpoint_files_are_saved_on_release_and_restored_on_the_next_attempt(
    world: World, workers: Workers, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    directory = write_tree(tmp_path / "workload", {"count.sh": RESUMABLE_COMMAND})
    workload = WorkloadConfig(workload_dir=directory, command="./count.sh", checkpoint_bucket=BUCKET)
    message_id = world.send("count")
    interrupt(world, workers, workload, after=1.5)
    stored = world.s3.get_object(Bucket=BUCKET, Key=checkpoint_key(FLEET, message_id))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(stored)) as archive:
        member = archive.extractfile("progress")
        assert member is not None
        saved = int(member.read())
    assert 5 <= saved < 40
    assert f"[{message_id}] stopping at" in caplog.text

    second = workers.start(agent_config(world), workload, SECOND)
    wait_for(lambda: second.worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=20)
    assert f"[{message_id}] resumed from {saved}" in caplog.text
    assert f"[{message_id}] finished at 40" in caplog.text
    assert second.worker.counters[Metric.TASKS_RESUMED] == 1
    assert world.object_keys() == []


LIMIT_HANDLER = """
import json

def handle(body, context):
    task = json.loads(body)
    try:
        context.checkpoint(b"x" * 101)
    except Exception as error:
        with open(task["path"], "w") as f:
            f.write(f"{type(error).__name__}: {error}")
    assert context.checkpoint(b"y" * 10) is True
    raise RuntimeError("fail, so the checkpoint stays for the next attempt")
"""


def test_a_checkpoint_over_the_limit_is_an_error_and_nothing_is_truncated(
    world: World, workers: Workers, tmp_path, caplog
):
    directory = write_tree(tmp_path / "workload", {"limited.py": LIMIT_HANDLER})
    outcome = tmp_path / "outcome"
    workload = WorkloadConfig(workload_dir=directory, checkpoint_bucket=BUCKET, checkpoint_max_bytes=100)
    message_id = world.send({"path": str(outcome)})
    running = workers.start(agent_config(world, handler="limited:handle"), workload, FIRST)
    wait_for(lambda: running.worker.counters[Metric.TASKS_FAILED] == 1)
    assert outcome.read_text().startswith(
        "CheckpointTooLarge: checkpoint of 101 bytes is over the limit of 100"
    )
    assert f"checkpoint of {message_id} rejected: 101 bytes is over the limit of 100 bytes" in caplog.text
    assert running.worker.counters[Metric.CHECKPOINTS_REJECTED] == 1
    assert running.worker.counters[Metric.CHECKPOINTS_SAVED] == 1
    stored = world.s3.get_object(Bucket=BUCKET, Key=checkpoint_key(FLEET, message_id))["Body"].read()
    assert stored == b"y" * 10, "the rejected one was neither stored nor cut"


def test_command_checkpoint_files_over_the_limit_are_rejected_whole(
    world: World, workers: Workers, tmp_path, caplog
):
    script = """#!/bin/sh
head -c 4000 /dev/urandom > "$SPOTGUARD_CHECKPOINT_DIR/state"
trap 'exit 143' TERM
while true; do sleep 0.1; done
"""
    directory = write_tree(tmp_path / "workload", {"big.sh": script})
    workload = WorkloadConfig(
        workload_dir=directory, command="./big.sh", checkpoint_bucket=BUCKET, checkpoint_max_bytes=1000
    )
    message_id = world.send("big")
    first = workers.start(agent_config(world), workload, FIRST)
    wait_for(lambda: world.leases(FIRST))
    time.sleep(0.5)
    first.worker.drain(spot_signal(FIRST, 3))
    assert first.join() == 0
    assert first.worker.counters[Metric.CHECKPOINTS_REJECTED] == 1
    assert f"checkpoint of {message_id} rejected" in caplog.text
    assert world.object_keys() == []


def test_checkpoint_round_trip_is_whole_or_absent_per_message(world: World, tmp_path):
    """The store itself: a later attempt's checkpoint is never replaced by an earlier one."""
    store = CheckpointStore(boto3.client("s3"), bucket=BUCKET, fleet=FLEET, max_bytes=1000)
    assert store.load("m-1") is None
    assert store.save("m-1", b"attempt 2", attempt=2)
    assert not store.save("m-1", b"attempt 1, late", attempt=1), "a released attempt saving late"
    assert store.load("m-1") == b"attempt 2"
    restored = tmp_path / "restored"
    source = write_tree(tmp_path / "source", {"a.txt": "A", "sub/b.bin": "B"})
    (source / "link").symlink_to("/etc/passwd")  # links are not saved
    assert store.save_directory("m-2", source, attempt=1)
    assert store.restore_directory("m-2", restored)
    assert sorted(str(p.relative_to(restored)) for p in restored.rglob("*")) == ["a.txt", "sub", "sub/b.bin"]
    store.delete("m-1")
    store.delete("m-2")
    assert (restored / "a.txt").read_text() == "A"
    assert world.object_keys() == []
