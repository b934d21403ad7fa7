"""Agent and task logs shipped to CloudWatch Logs (moto): one stream per instance, the message
id on each task line, flushed at exit, and never blocking the work when CloudWatch is slow."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import boto3
import pytest
from botocore.config import Config
from spotguard_agent import cloudlogs
from spotguard_agent.execution import WorkloadConfig
from spotguard_core.contracts import Metric

from tests.support.http_stub import QuietHandler, serving
from tests.support.workload_env import (
    Workers,
    World,
    agent_config,
    wait_for,
    write_tree,
)

pytestmark = pytest.mark.integration
INSTANCE = "i-0logs000000000001"
GROUP = "/spotguard/test/agent"


@pytest.fixture
def world(world: World) -> World:
    """The shared world (conftest) and the agent's log group."""
    boto3.client("logs").create_log_group(logGroupName=GROUP)
    return world


def shipped_lines(stream: str) -> list[dict[str, Any]]:
    events = boto3.client("logs").get_log_events(logGroupName=GROUP, logStreamName=stream, startFromHead=True)
    return [json.loads(event["message"]) for event in events["events"]]


def test_agent_and_task_lines_reach_the_instance_stream_with_the_message_id(
    world: World, workers: Workers, tmp_path
):
    directory = write_tree(tmp_path / "workload", {"say.sh": "#!/bin/sh\necho 'hello from the task'\n"})
    workload = WorkloadConfig(workload_dir=directory, command="./say.sh", log_group=GROUP)
    message_id = world.send("hi")
    running = workers.start(agent_config(world), workload, INSTANCE)
    wait_for(lambda: running.worker.counters[Metric.TASKS_COMPLETED] == 1)
    running.worker.request_stop()
    assert running.join() == 0
    handler = running.worker.cloud_logs
    assert handler is not None
    try:
        # At the agent's exit logging.shutdown() ships the last lines; here: a flush.
        assert handler.ship(timeout=10)
    finally:
        cloudlogs.detach(handler)
    lines = shipped_lines(INSTANCE)
    task_lines = [line for line in lines if line["logger"] == "spotguard.task"]
    assert task_lines == [
        {
            "level": "INFO",
            "logger": "spotguard.task",
            "message_id": message_id,
            "message": f"[{message_id}] hello from the task",
        }
    ]
    assert any(line["message"].startswith("worker started") for line in lines), "the agent's own lines too"
    assert any(line["message"].startswith("worker stopped") for line in lines), "flushed at exit"


class SlowLogs(QuietHandler):
    """A CloudWatch Logs endpoint (on 127.0.0.1) that holds every call until the test releases it,
    so "CloudWatch is slow" lasts exactly as long as the test needs, however loaded the machine."""

    arrived = threading.Event()
    release = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        SlowLogs.arrived.set()
        SlowLogs.release.wait(30)
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_slow_cloudwatch_never_blocks_logging_and_drops_are_counted():
    SlowLogs.arrived.clear()
    SlowLogs.release.clear()
    with serving(SlowLogs) as url:
        client = boto3.client(
            "logs", endpoint_url=url, config=Config(retries={"max_attempts": 1}, read_timeout=40)
        )
        handler = cloudlogs.CloudLogsHandler(client, group=GROUP, stream=INSTANCE)
        logger = logging.getLogger("spotguard.test-slow")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            # The shipping thread takes the first line and is then stuck in a call CloudWatch
            # does not answer: from here on nothing leaves the queue.
            logger.warning("line before the flood")
            handler.ship_now()
            assert SlowLogs.arrived.wait(10), "the shipping thread called CloudWatch"
            flood = threading.Thread(
                target=lambda: [logger.warning("line %d", n) for n in range(cloudlogs.QUEUE_LIMIT + 500)]
            )
            flood.start()
            flood.join(20)
            assert not flood.is_alive(), "logging waited for CloudWatch, which has not answered yet"
            assert not SlowLogs.release.is_set()
            assert handler.dropped >= 500, "the queue is bounded: the overflow is dropped and counted"
            assert handler.ship(timeout=0.5) is False, "a bounded flush does not wait for a slow CloudWatch"
        finally:
            SlowLogs.release.set()
            logger.removeHandler(handler)
